"""The privacy lab: memorisation (canaries and exposure), training-data extraction, membership inference,
and the defences measured by the same attacks (deduplication, DP-SGD)."""

from llmlab.security.privacy.common import PrivacyError, run_splits

__all__ = ["PrivacyError", "run_splits"]
