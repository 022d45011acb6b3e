"""Errors a user can cause. The CLI prints them as one line and exits with status 2."""

from __future__ import annotations


class LlmlabError(Exception):
    """A problem caused by user input (a path, a config, a request); its message names the fix."""


class ConfigError(LlmlabError):
    """An invalid model or training configuration."""


class ModelLoadError(LlmlabError):
    """A missing, malformed, corrupt or incompatible model folder or checkpoint."""


class TokenizerError(LlmlabError):
    """Text or a tokenizer folder that cannot be handled."""


class DataError(LlmlabError):
    """A corpus or data file that cannot be used."""
