"""Evaluations that can run on every training checkpoint (`llmlab train --eval-every-checkpoint NAME,...`).

CHECKPOINT_EVALS maps a name to fn(model, tokenizer) -> {metric: float}; each works on any llmlab causal model
(GPT family) and takes well under a second on a small one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from llmlab.errors import LlmlabError
from llmlab.inspect.induction import _second_copy, prefix_matching, repeated_batch


def induction_eval(model: torch.nn.Module, tokenizer: Any = None, n: int = 16, half: int = 16,
                   seed: int = 0) -> dict[str, float]:
    """In-context learning score (loss on the repeated copy minus the first copy) and the best prefix-matching
    score of any head, per layer and overall, on repeated random token strings (Olsson et al. 2022)."""
    V = getattr(tokenizer, "vocab_size", None) or model.config.vocab_size
    half = min(half, model.config.block_size // 2)
    x, lengths, starts = repeated_batch(n, V, half, torch.Generator().manual_seed(seed))
    w: dict[str, list[torch.Tensor]] = {}
    was = model.training
    model.eval()
    with torch.no_grad():
        logits = model(x[:, :-1], weights=w)
    model.train(was)
    loss = F.cross_entropy(logits[..., :V].float().transpose(1, 2), x[:, 1:], reduction="none")
    first, second = (m[:, :-1] for m in _second_copy(lengths, starts, x.size(1)))
    out = {"icl_score": float(loss[second].mean() - loss[first].mean())}
    best = 0.0
    for i, a in enumerate(w.get("self", [])):
        s = float(prefix_matching(a.float(), lengths, starts).max())
        out[f"prefix_matching_L{i}"] = s
        best = max(best, s)
    out["prefix_matching_max"] = best
    return out


def attention_entropy_eval(model: torch.nn.Module, tokenizer: Any = None, seed: int = 0) -> dict[str, float]:
    """Mean entropy (nats) of the attention rows of each layer on random tokens: heads sharpening over training."""
    V = getattr(tokenizer, "vocab_size", None) or model.config.vocab_size
    T = min(32, model.config.block_size)
    x = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(seed))
    w: dict[str, list[torch.Tensor]] = {}
    was = model.training
    model.eval()
    with torch.no_grad():
        model(x, weights=w)
    model.train(was)
    return {f"attention_entropy_L{i}": float(-(a * a.clamp(min=1e-12).log()).sum(-1).mean())
            for i, a in enumerate(w.get("self", []))}


CHECKPOINT_EVALS: dict[str, Callable[..., dict[str, float]]] = {
    "induction": induction_eval,
    "attention_entropy": attention_entropy_eval,
}


def resolve_evals(names: str | list[str]) -> list[tuple[str, Callable[..., dict[str, float]]]]:
    """'induction,attention_entropy' -> [(name, fn)]; an unknown name is one clear error."""
    items = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    bad = [n for n in items if n not in CHECKPOINT_EVALS]
    if bad:
        raise LlmlabError(f"unknown checkpoint evaluation {', '.join(bad)}; choose from "
                          f"{', '.join(sorted(CHECKPOINT_EVALS))}")
    return [(n, CHECKPOINT_EVALS[n]) for n in items]


def run_checkpoint_evals(evals: list[tuple[str, Callable[..., dict[str, float]]]], model: torch.nn.Module,
                         tokenizer: Any = None) -> dict[str, float]:
    """Every evaluation on one checkpoint, metrics prefixed by the evaluation's name: {"induction/icl_score": ...}."""
    out: dict[str, float] = {}
    for name, fn in evals:
        out.update({f"{name}/{k}": v for k, v in fn(model, tokenizer).items()})
    return out
