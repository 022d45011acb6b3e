"""Scoring text with a causal LM: per-token log-probabilities, loss and perplexity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from llmlab.errors import LlmlabError


@torch.inference_mode()
def token_logprobs(model: torch.nn.Module, ids: Sequence[int]) -> torch.Tensor:
    """l_t = log p(x_t | x_<t) for t = 1..n-1 of one token sequence (n-1 values), scored in consecutive
    windows of the model's context."""
    block = model.config.block_size
    x = torch.tensor(list(ids), dtype=torch.long)
    parts = []
    for start in range(0, x.numel() - 1, block):
        window = x[start:start + block + 1]  # (<= block+1,)
        logp = F.log_softmax(model(window[None, :-1])[0].float(), -1)  # (T, V)
        parts.append(logp.gather(1, window[1:, None])[:, 0])
    return torch.cat(parts) if parts else torch.empty(0)


def perplexity(model: torch.nn.Module, docs: Sequence[str]) -> dict[str, float]:
    """Mean loss (nats/token) and perplexity of a causal LM over documents."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise LlmlabError("this model has no tokenizer; use a run folder or a Hugging Face folder with one")
    if getattr(model.config, "arch", "gpt") != "gpt":
        raise LlmlabError("perplexity needs a decoder-only (gpt) model")
    total, count = 0.0, 0
    for d in docs:
        ids = tok.encode(d)
        if len(ids) < 2:
            continue
        lp = token_logprobs(model, ids)
        total -= float(lp.sum())
        count += lp.numel()
    if count == 0:
        raise LlmlabError("the text has fewer than two tokens; give more text")
    loss = total / count
    return {"tokens": count, "loss": loss, "perplexity": math.exp(loss)}
