"""llmlab: build transformer language models from their parts, train them, look inside them, and
measure how they break."""

from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.interop import export_gpt2, load

__version__ = "0.1.0"
__all__ = ["ModelConfig", "LlmlabError", "load", "export_gpt2", "__version__"]
