"""What the supply-chain modules share: their errors and the Finding record."""

from __future__ import annotations

from dataclasses import dataclass

from llmlab.errors import LlmlabError
from llmlab.signing import SigningError, VerificationError  # noqa: F401 - re-exported beside the others

SEVERITIES = ("error", "warning", "info")  # error and warning make an audit "findings"; info is context


class AuditError(LlmlabError):
    """The audit could not run: a missing or unreadable path, a folder without model files, a corrupt archive."""






class ConvertError(LlmlabError):
    """A file that cannot be converted to safetensors (not a PyTorch checkpoint, no tensors, existing output)."""


class LabError(LlmlabError):
    """A lab that cannot run: an --out folder that is not empty and not an earlier lab, an unknown payload."""


@dataclass
class Finding:
    """One thing an audit check found: severity ("error", "warning" or "info"), the check that found it, and a
    message naming the problem."""

    severity: str
    check: str
    message: str

    @property
    def counts(self) -> bool:
        """Whether this finding makes the audit fail (errors and warnings do, info does not)."""
        return self.severity in ("error", "warning")
