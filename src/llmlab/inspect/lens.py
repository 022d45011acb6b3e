"""Looking inside a model: the attention weights of every layer and head for one text, and the words
a query attends to. Works for GPT, BERT (e.g. the real MiniLM) and seq2seq models."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from llmlab.errors import LlmlabError


@dataclass
class AttentionMaps:
    """Attention weights of one text: weights[layer, head, query, key] (for seq2seq `cross` holds the
    decoder's cross-attention, queries = target tokens, keys = source tokens)."""

    tokens: list[str]
    offsets: list[tuple[int, int]]
    special: list[bool]
    weights: torch.Tensor  # (L, H, T, T)
    text: str
    arch: str
    cross: torch.Tensor | None = None  # (L, H, T_tgt, T_src)
    target_tokens: list[str] = field(default_factory=list)

    @property
    def n_layers(self) -> int:
        return self.weights.size(0)

    @property
    def n_heads(self) -> int:
        return self.weights.size(1)

    def to_json(self) -> dict:
        out = {"tokens": self.tokens, "weights": self.weights.tolist()}
        if self.cross is not None:
            out["target_tokens"] = self.target_tokens
            out["cross_weights"] = self.cross.tolist()
        return out


def compute_attention(model: torch.nn.Module, text: str, target: str | None = None) -> AttentionMaps:
    """Run model on text and collect attention weights of every layer and head."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise LlmlabError("this model has no tokenizer; give a run folder or a Hugging Face folder with one")
    if not text.strip():
        raise LlmlabError("the sentence is empty; give some text to look at")
    arch = model.config.arch
    ids, offsets = tok.encode_with_offsets(text, add_special_tokens=(arch == "bert"))
    if not ids:
        raise LlmlabError("the sentence produced no tokens; give some text to look at")
    block = model.config.block_size
    if len(ids) > block:
        raise LlmlabError(f"the sentence is {len(ids)} tokens, longer than the model's context of {block}; shorten it")
    specials = set(tok.special_tokens.values())
    x = torch.tensor([ids])
    w: dict[str, list[torch.Tensor]] = {}
    target_tokens: list[str] = []
    with torch.no_grad():
        if arch == "seq2seq":
            tgt_ids = [tok.bos_id if tok.bos_id is not None else tok.eos_id or 0]
            if target:
                tgt_ids += tok.encode(target)
            target_tokens = [tok.id_to_token(i) for i in tgt_ids]
            model(x, torch.tensor([tgt_ids]), weights=w)
        else:
            model(x, weights=w)
    n_enc = model.config.n_layer
    self_maps = w["self"][:n_enc] if arch == "seq2seq" else w["self"]
    maps = torch.stack([m[0] for m in self_maps])  # (L, H, T, T)
    cross = torch.stack([m[0] for m in w["cross"]]) if arch == "seq2seq" else None
    return AttentionMaps(tokens=[tok.id_to_token(i) for i in ids], offsets=list(offsets),
                         special=[i in specials and o == (0, 0) for i, o in zip(ids, offsets)],
                         weights=maps, text=text, arch=arch, cross=cross, target_tokens=target_tokens)


def word_positions(maps: AttentionMaps, word: str) -> list[int]:
    """Token positions that make up the first occurrence of `word` (case-insensitive, whole word)."""
    m = re.search(rf"(?<!\w){re.escape(word)}(?!\w)", maps.text, flags=re.IGNORECASE)
    if m is None:
        m = re.search(re.escape(word), maps.text, flags=re.IGNORECASE)
    if m is None:
        words = sorted(set(re.findall(r"\w+", maps.text)))
        raise LlmlabError(f"{word!r} is not in the sentence; choose one of: {', '.join(words)}")
    s, e = m.span()
    pos = [i for i, (a, b) in enumerate(maps.offsets) if not maps.special[i] and a < e and b > s]
    if not pos:
        raise LlmlabError(f"{word!r} maps to no token of the sentence; choose another word")
    return pos


def query_rows(maps: AttentionMaps, query: str) -> torch.Tensor:
    """(L, H, T): attention from the query word to every key, averaged over the word's tokens."""
    return maps.weights[:, :, word_positions(maps, query), :].mean(2)


def without_special(weights: torch.Tensor, special: Sequence[bool]) -> torch.Tensor:
    """Attention weights (..., T_q, T_k) with the special-token keys ([CLS], [SEP] ...) set to 0 and each
    query's row renormalised to sum to 1: what `--no-special` figures are computed on."""
    keep = torch.tensor([not s for s in special], dtype=weights.dtype)
    w = weights * keep
    return w / w.sum(-1, keepdim=True).clamp(min=1e-12)


def top_keys(maps: AttentionMaps, query: str, k: int = 5, skip_special: bool = False,
             layer: int | None = None, head: int | None = None) -> list[tuple[int, str, float]]:
    """The k keys the query attends to most: [(position, token, weight)], averaged over every layer and
    head unless one is chosen. With skip_special, special tokens are left out and the rest renormalised."""
    rows = query_rows(maps, query)
    if layer is not None:
        rows = rows[layer : layer + 1]
    if head is not None:
        rows = rows[:, head : head + 1]
    avg = rows.mean((0, 1))
    if skip_special:
        keep = torch.tensor([not s for s in maps.special])
        avg = torch.where(keep, avg, torch.zeros_like(avg))
        avg = avg / avg.sum().clamp(min=1e-12)
    order = torch.argsort(avg, descending=True)[:k].tolist()
    return [(i, maps.tokens[i], float(avg[i])) for i in order]


def rank_heads(maps: AttentionMaps, query: str, key: str, skip_special: bool = False
               ) -> list[tuple[int, int, float]]:
    """Every (layer, head, weight) ranked by how much the query word attends to the key word."""
    rows = query_rows(maps, query)  # (L, H, T)
    if skip_special:
        keep = torch.tensor([not s for s in maps.special], dtype=rows.dtype)
        rows = rows * keep
        rows = rows / rows.sum(-1, keepdim=True).clamp(min=1e-12)
    kp = word_positions(maps, key)
    score = rows[:, :, kp].sum(-1)  # (L, H)
    flat = [(layer, head, float(score[layer, head])) for layer in range(score.size(0))
            for head in range(score.size(1))]
    return sorted(flat, key=lambda t: -t[2])




def cross_attention_rows(maps: Any, top: int = 3) -> list[tuple[str, list[tuple[str, float]]]]:
    """For each output token, the source tokens its prediction attended to most (cross-attention averaged
    over every decoder layer and head): [(output token, [("token@position", weight)])]. Decoder position i reads
    target token i and predicts token i + 1, so row i is where output token i + 1 was chosen."""
    mean = maps.cross.mean((0, 1))  # (T_tgt, T_src)
    out = []
    for i in range(len(maps.target_tokens) - 1):
        w = mean[i]
        best = torch.argsort(w, descending=True)[:top].tolist()
        out.append((maps.target_tokens[i + 1], [(f"{maps.tokens[j]}@{j}", float(w[j])) for j in best]))
    return out
