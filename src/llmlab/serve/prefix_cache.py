"""Automatic prefix caching: the keys and values of recent prompts, kept so that a prompt starting with the
same tokens as one seen before prefills only the rest (as vLLM's automatic prefix caching and llama.cpp's
prompt cache do).

A decoder's keys and values at position t depend only on tokens 0..t (the causal mask), so the cache of a
shared prefix is the cache that prefilling the new prompt would compute — up to float rounding, since a
longer matrix product may sum in another order. A scan sends the same system prompt and attack under several
defences (the sandwich defence only appends a reminder), and a chat client resends the whole conversation
each turn: both prefill mostly what was prefilled before.

Entries are whole prompts (their per-layer keys and values), evicted least recently used when the stored
tokens would pass the budget. A lookup compares the new prompt with every entry (NumPy, a few microseconds
per entry) and takes the longest common prefix."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from llmlab.attention import KVCache


class PrefixCache:
    """Keys and values of up to `max_tokens` prompt tokens in all. A hit needs at least `min_shared` tokens in
    common; `hits`, `misses` and `tokens_saved` count what the cache did."""

    def __init__(self, max_tokens: int = 32768, min_shared: int = 16):
        if max_tokens < 1 or min_shared < 1:
            raise ValueError("max_tokens and min_shared must be at least 1")
        self.max_tokens, self.min_shared = max_tokens, min_shared
        self.entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, list[tuple[torch.Tensor, torch.Tensor]]]] = (
            OrderedDict())
        self.tokens = 0
        self.hits = self.misses = self.tokens_saved = 0

    @staticmethod
    def tokens_for_memory(model: torch.nn.Module, megabytes: float) -> int:
        """How many prompt tokens' keys and values of `model` fit in `megabytes` (float32)."""
        c = model.config
        per_token = c.n_layer * 2 * c.kv_heads * c.head_dim * 4
        return max(1, int(megabytes * 2**20 // per_token))

    @classmethod
    def for_model(cls, model: torch.nn.Module, megabytes: float) -> PrefixCache | None:
        """A cache holding up to `megabytes` of `model`'s keys and values, or None when megabytes is 0 (off)."""
        return cls(cls.tokens_for_memory(model, megabytes)) if megabytes > 0 else None

    def lookup(self, prompt: Sequence[int]) -> tuple[int, list[KVCache] | None]:
        """(P, caches): fresh caches holding the keys and values of prompt[:P], the longest prefix shared with a
        stored prompt (P < len(prompt), so the last prompt token is always computed: its logits give the first
        new token), or (0, None)."""
        want = np.asarray(prompt, dtype=np.int64)
        best, best_key = 0, None
        for key, (arr, _) in self.entries.items():
            n = min(len(arr), len(want) - 1)
            if n <= best:
                continue
            diff = np.flatnonzero(arr[:n] != want[:n])
            shared = int(diff[0]) if diff.size else n
            if shared > best:
                best, best_key = shared, key
        if best_key is None or best < self.min_shared:
            self.misses += 1
            return 0, None
        self.entries.move_to_end(best_key)
        self.hits += 1
        self.tokens_saved += best
        caches = []
        for k, v in self.entries[best_key][1]:
            c = KVCache(dtype=k.dtype)
            c.append(k[:, :, :best].clone(), v[:, :, :best].clone())
            caches.append(c)
        return best, caches

    def store(self, prompt: Sequence[int], caches: Sequence[KVCache]) -> None:
        """Keep the keys and values of `prompt` (caches of one row holding exactly its tokens)."""
        key = tuple(prompt)
        n = len(key)
        if n > self.max_tokens or n < self.min_shared or any(c.length != n for c in caches):
            return
        if key in self.entries:
            self.entries.move_to_end(key)
            return
        while self.entries and self.tokens + n > self.max_tokens:
            old, (arr, _) = self.entries.popitem(last=False)
            self.tokens -= len(arr)
        kv = [(c.k[:, :, :n].clone(), c.v[:, :, :n].clone()) for c in caches]
        self.entries[key] = (np.asarray(key, dtype=np.int64), kv)
        self.tokens += n

    def stats(self) -> dict[str, int]:
        """Entries, tokens stored, hits, misses and prompt tokens not prefilled thanks to the cache."""
        return {"entries": len(self.entries), "tokens": self.tokens, "hits": self.hits, "misses": self.misses,
                "tokens_saved": self.tokens_saved}
