"""The two interfaces security experiments see a model through.

- WhiteBox: a causal LM and its tokenizer — logits for token ids, per-token log-probabilities, and input
  embeddings (for gradients with respect to the prompt, as GCG needs). llmlab runs and imported Hugging
  Face GPT-2 folders provide it.
- ChatTarget: text in, text out, optionally with a system prompt. llmlab chat models and any
  OpenAI-compatible endpoint provide it (implementations live with the scanner).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LlmlabError


class WhiteBox:
    """A causal LM with its tokenizer, seen from the inside."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "model", path: str | Path | None = None):  # noqa: ANN001
        if getattr(model.config, "arch", "gpt") != "gpt":
            raise LlmlabError(f"{name} is a {model.config.arch} model; this experiment needs a decoder-only GPT")
        if tokenizer is None:
            raise LlmlabError(f"{name} has no tokenizer; use a run folder or a Hugging Face folder with one")
        self.model, self.tokenizer, self.name, self.path = model.eval(), tokenizer, name, path

    @classmethod
    def load(cls, path: str | Path) -> WhiteBox:
        """A WhiteBox for an llmlab run folder or a local Hugging Face GPT-2 folder."""
        from ..interop import load

        model = load(path)
        return cls(model, model.tokenizer, name=str(path), path=path)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits."""
        return self.model(ids, attention_mask=attention_mask)

    def embedding_matrix(self) -> torch.Tensor:
        """(V, C) token embeddings; one-hot (B, T, V) @ this = input embeddings."""
        return self.model.wte.weight

    def logits_from_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, T, C) input embeddings -> (B, T, V) logits (differentiable)."""
        return self.model(inputs_embeds=embeds)

    @torch.no_grad()
    def token_logprobs(self, ids: Sequence[int]) -> torch.Tensor:
        """l_t = log p(x_t | x_<t) for t = 1..n-1 of one sequence, in windows of the context."""
        from ..evaluate import token_logprobs

        return token_logprobs(self.model, ids)

    @torch.no_grad()
    def batch_token_stats(self, seqs: Sequence[Sequence[int]]) -> list[dict[str, torch.Tensor]]:
        """For each sequence (cut to the context): l_t, and the mean mu_t and standard deviation sigma_t of
        log p(. | x_<t) over the vocabulary (as Min-K%++ needs). One padded forward pass for the batch."""
        seqs = [list(s)[: self.block_size + 1] for s in seqs]
        T = max(len(s) for s in seqs) - 1
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s) - 1] = torch.tensor(s[:-1])
        logp = F.log_softmax(self.model(ids).float(), -1)  # (B, T, V); right padding is harmless when causal
        p = logp.exp()
        mu = (p * logp).sum(-1)  # E_{z~p}[log p(z)]
        sigma = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
        out = []
        for i, s in enumerate(seqs):
            n = len(s) - 1
            tgt = torch.tensor(s[1:])
            out.append({"logp": logp[i, torch.arange(n), tgt], "mu": mu[i, :n], "sigma": sigma[i, :n]})
        return out


class ChatTarget:
    """Text in, text out. Subclasses implement `chat`."""

    name: str = "target"

    def chat(self, user: str, system: str | None = None, max_tokens: int = 128, temperature: float = 0.0,
             seed: int | None = None) -> str:
        raise NotImplementedError
