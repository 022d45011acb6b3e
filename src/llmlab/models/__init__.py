"""The three model families, built from the same blocks."""

from __future__ import annotations

import torch
import torch.nn as nn

from llmlab.config import ModelConfig
from llmlab.models.bert import Bert
from llmlab.models.gpt import GPT
from llmlab.models.seq2seq import Seq2Seq

__all__ = ["GPT", "Bert", "Seq2Seq", "build_model", "from_weights"]


def build_model(cfg):  # noqa: ANN001, ANN201 - tiny dispatcher
    """A freshly initialised model of the family `cfg.arch` names."""
    return {"gpt": GPT, "bert": Bert, "seq2seq": Seq2Seq}[cfg.arch](cfg)


def from_weights(cfg: ModelConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """A model of the family `cfg.arch` holding the tensors of `state` (parameter name -> tensor, taken as they
    are, dtype included), built without random initialisation: the layers are made on the meta device and
    the given tensors put in place, which for a 135M-parameter model saves a second over build + load.
    Raises KeyError naming missing weights, ValueError for a tensor of the wrong shape."""
    with torch.device("meta"):
        model = build_model(cfg)
    expected = dict(model.named_parameters())
    for name, t in state.items():
        if name in expected and tuple(t.shape) != tuple(expected[name].shape):
            raise ValueError(f"weight {name} has shape {tuple(t.shape)}, the config needs "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if missing:
        raise KeyError(f"weights missing for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    return model
