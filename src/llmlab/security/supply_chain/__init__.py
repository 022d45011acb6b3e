"""Supply chain: poisoned model files, the scanners and their blind spots, signing and tamper detection.

- `audit(path)`: formats from content, header-only structural checks of safetensors and GGUF, the real pickle
  scanners (picklescan, modelscan, fickling) and torch.load(weights_only=True) side by side, in child processes.
- `run_lab(out)`: harmless payloads (a marker file is their only effect) against every scanner and loader; the
  detection matrix with each tool's exact finding.
- `sign_folder` / `verify_folder`: OpenSSF model_signing with a local EC key, offline.
- `convert_to_safetensors(file)`: a PyTorch pickle checkpoint to safetensors, only after a clean audit and only
  through weights_only=True in a child process.

llmlab itself never unpickles a file it did not write: the scanners analyse statically, and the only loads of
these files happen in child processes (weights_only=True, and the lab's deliberate weights_only=False)."""

from llmlab.security.supply_chain.audit import (
    AuditResult,
    FileAudit,
    ToolVerdict,
    audit,
    audit_dict,
    write_audit_report,
)
from llmlab.security.supply_chain.common import (
    AuditError,
    ConvertError,
    Finding,
    LabError,
    SigningError,
    VerificationError,
)
from llmlab.security.supply_chain.convert import ConvertResult, convert_to_safetensors
from llmlab.security.supply_chain.lab import Cell, LabConfig, LabResult, run_lab
from llmlab.signing import (
    KeyPair,
    SignResult,
    VerifyResult,
    generate_keypair,
    sign_folder,
    verify_folder,
)

__all__ = ["AuditError", "AuditResult", "Cell", "ConvertError", "ConvertResult", "FileAudit", "Finding", "KeyPair",
           "LabConfig", "LabError", "LabResult", "SignResult", "SigningError", "ToolVerdict", "VerificationError",
           "VerifyResult", "audit", "audit_dict", "convert_to_safetensors", "generate_keypair", "run_lab",
           "sign_folder", "verify_folder", "write_audit_report"]
