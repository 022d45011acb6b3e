"""A small retrieval-augmented generation pipeline for indirect-injection probes: documents embedded with
the real all-MiniLM-L6-v2 (llmlab's own BERT), the nearest ones to the question by cosine similarity
handed to the model as context."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

from llmlab.interop import load


@lru_cache(maxsize=1)
def _minilm() -> Any:

    return load("minilm")


class RagIndex:
    """Documents and their normalised MiniLM sentence embeddings."""

    def __init__(self, docs: Sequence[str], encoder: Any = None):
        self.docs = list(docs)
        self.encoder = encoder if encoder is not None else _minilm()
        self.emb = self.embed(self.docs)  # (N, C)

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised mean-pooled embeddings (N, C) of texts (cut to the encoder's context)."""
        tok, block = self.encoder.tokenizer, self.encoder.config.block_size
        seqs = [tok.encode(t, add_special_tokens=True)[:block] for t in texts]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        return self.encoder.sentence_embedding(ids, mask)  # (N, C)

    def search(self, query: str, k: int = 2) -> list[tuple[int, float]]:
        """The k nearest documents to the query: (index, cosine similarity), best first.

        cos(q, d) = q . d / (|q| |d|) = q . d for the normalised embeddings."""
        q = self.embed([query])[0]  # (C,)
        sims = self.emb @ q  # (N,)
        top = torch.topk(sims, min(k, len(self.docs)))
        return [(int(i), float(s)) for s, i in zip(top.values, top.indices)]

    def context(self, query: str, k: int = 2) -> tuple[str, list[int]]:
        """The retrieved documents joined as one context string, and their indices."""
        hits = self.search(query, k)
        return " ".join(self.docs[i] for i, _ in hits), [i for i, _ in hits]


_INDEXES: dict[tuple[str, ...], RagIndex] = {}


def index_for(docs: Sequence[str]) -> RagIndex:
    """A cached index per corpus (a scan embeds each corpus once)."""
    key = tuple(docs)
    if key not in _INDEXES:
        _INDEXES[key] = RagIndex(docs)
    return _INDEXES[key]


@torch.no_grad()
def embed_texts(texts: Sequence[str], encoder: Any, max_tokens: int = 128, batch: int = 32) -> list[Any]:
    """L2-normalised MiniLM sentence embeddings of texts as NumPy vectors, each text cut to max_tokens tokens,
    in batches sorted by length (little padding)."""
    tok = encoder.tokenizer
    limit = min(max_tokens, encoder.config.block_size)
    seqs = [tok.encode(t, add_special_tokens=True)[:limit] for t in texts]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[Any] = [None] * len(seqs)
    for k in range(0, len(order), batch):
        idx = order[k:k + batch]
        T = max(len(seqs[i]) for i in idx)
        ids = torch.zeros(len(idx), T, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, :len(seqs[i])] = 1
        emb = encoder.sentence_embedding(ids, mask).float().numpy()  # (b, C)
        for r, i in enumerate(idx):
            out[i] = emb[r]
    return out
