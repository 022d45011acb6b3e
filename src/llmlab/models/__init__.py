"""The three model families, built from the same blocks."""

from .bert import Bert
from .gpt import GPT
from .seq2seq import Seq2Seq

__all__ = ["GPT", "Bert", "Seq2Seq", "build_model"]


def build_model(cfg):  # noqa: ANN001, ANN201 - tiny dispatcher
    """A freshly initialised model of the family `cfg.arch` names."""
    return {"gpt": GPT, "bert": Bert, "seq2seq": Seq2Seq}[cfg.arch](cfg)
