"""Training-data extraction (Carlini et al. 2021, "Extracting Training Data from Large Language Models").

Generate many samples from the model, rank them by membership metrics that single out text the model
finds surprisingly likely, and check each for verbatim training text with an n-gram index over the
whole training split. The precision of each metric's top 100 says how well it finds memorised text.

A sample is memorised when it repeats at least k_chars characters of training text verbatim (the token length
is derived from the tokenizer's characters per token on the training text, so "50 characters" means the same
on a character model and on a BPE one), or when it contains a known canary (a planted secret: a leak, however
short). Precision comes with an exact (Clopper-Pearson) interval, and the comparison of rankings is flagged as
uninformative when the samples hold too few memorised ones to tell the rankings apart.

Metrics (higher = more likely memorised), with L(x) = -mean_t log p(x_t | x_<t) the log-perplexity:

    perplexity   -L(x)
    zlib         H_zlib(x) / L(x)          H_zlib = bytes of zlib.compress(x)
    lowercase    L(lower(x)) / L(x)
    window       -min over sliding windows w of L(w)
    reference    L_ref(x) / L(x)           (a second, usually smaller, model)
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmlab.generate.causal import GenerationConfig, generate_ids
from llmlab.security.privacy.common import Callback, PrivacyError, Stage, batch_logprobs, quiet
from llmlab.security.targets import WhiteBox
from llmlab.stats import rate_ci

# ----------------------------------------------------------------------------- the n-gram index


class NgramIndex:
    """Every n-gram of token ids in a set of sequences, hashed to 64 bits and sorted, for fast verbatim
    look-ups over a whole training split. The hash of a window w is sum_j w_j * R_j mod 2^64 with random
    odd multipliers R_j; hits are verified against the stored text, so collisions never count."""

    def __init__(self, seqs: Sequence[Sequence[int]], n: int, seed: int = 0):
        if n < 1:
            raise PrivacyError(f"the n-gram length must be at least 1, got {n}")
        self.n = n
        rng = np.random.default_rng(seed)
        self.mult = rng.integers(1, 2**63 - 1, n, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self.seqs = [np.asarray(s, dtype=np.int64) for s in seqs]
        hashes, where = [], []
        for k, s in enumerate(self.seqs):
            if len(s) < n:
                continue
            h = self.hash_windows(s)
            hashes.append(h)
            where.append(np.stack([np.full(len(h), k), np.arange(len(h))], 1))
        if hashes:
            allh = np.concatenate(hashes)
            allw = np.concatenate(where)
            order = np.argsort(allh, kind="stable")
            self.hashes, self.where = allh[order], allw[order]
        else:
            self.hashes, self.where = np.zeros(0, np.uint64), np.zeros((0, 2), np.int64)

    def __len__(self) -> int:
        return len(self.hashes)

    def hash_windows(self, s: np.ndarray, chunk: int = 65536) -> np.ndarray:
        """(len(s) - n + 1,) hashes of every window of n ids."""
        s = np.asarray(s, dtype=np.uint64)
        if len(s) < self.n:
            return np.zeros(0, np.uint64)
        win = np.lib.stride_tricks.sliding_window_view(s, self.n)  # (W, n)
        out = np.empty(len(win), dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, len(win), chunk):
                out[i:i + chunk] = (win[i:i + chunk] * self.mult).sum(axis=1)  # wraps mod 2^64
        return out

    def hits(self, seq: Sequence[int]) -> np.ndarray:
        """(W,) bool: which windows of n ids of seq occur verbatim in the indexed sequences."""
        s = np.asarray(seq, dtype=np.int64)
        h = self.hash_windows(s)
        if not len(h) or not len(self.hashes):
            return np.zeros(len(h), bool)
        pos = np.searchsorted(self.hashes, h)
        cand = np.zeros(len(h), bool)
        inside = pos < len(self.hashes)
        cand[inside] = self.hashes[pos[inside]] == h[inside]
        ok = np.zeros(len(h), bool)
        for i in np.nonzero(cand)[0]:
            j = pos[i]
            while j < len(self.hashes) and self.hashes[j] == h[i]:
                k, p = self.where[j]
                if np.array_equal(self.seqs[k][p:p + self.n], s[i:i + self.n]):
                    ok[i] = True
                    break
                j += 1
        return ok

    def longest_match(self, seq: Sequence[int]) -> tuple[int, int]:
        """(length, start) of the longest run of seq covered by consecutive verbatim n-gram hits; length 0
        when no n-gram of seq is in the index."""
        ok = self.hits(seq)
        best, start, run, run_start = 0, 0, 0, 0
        for i, v in enumerate(ok):
            if v:
                if run == 0:
                    run_start = i
                run += 1
                if run > best:
                    best, start = run, run_start
            else:
                run = 0
        return (best + self.n - 1 if best else 0), start


# ----------------------------------------------------------------------------- metrics


def zlib_entropy(text: str) -> int:
    """H_zlib: bytes of the zlib-compressed UTF-8 text."""
    return len(zlib.compress(text.encode("utf-8")))


def min_window_nll(lp: torch.Tensor, window: int) -> float:
    """Lowest mean NLL over sliding windows of `window` tokens (the whole sequence when shorter)."""
    nll = -lp.double()
    if nll.numel() <= window:
        return float(nll.mean())
    return float(nll.unfold(0, window, 1).mean(1).min())


METRICS = ("perplexity", "zlib", "lowercase", "window", "reference")


@dataclass
class ExtractConfig:
    """A training-data extraction run (Carlini et al. 2021 used 200,000 samples of 256 tokens, top-40)."""

    samples: int = 200
    length: int = 128  # new tokens per sample (cut to the model's context)
    top_k: int = 40
    temperature: float = 1.0
    prefixes: str = "empty"  # empty | train | val | a text file
    prefix_tokens: int = 16
    k_chars: int = 50  # verbatim characters that count as memorised (Carlini et al. 2023: 50 BPE tokens)
    k: int = 0  # the same in tokens; 0 = derived from k_chars and the tokenizer's characters per token
    min_distinct: int = 5  # a verbatim span with fewer distinct tokens is repetitive (e.g. "=====") and not counted
    window: int = 32  # sliding-window size of the window metric
    top: int = 100
    batch_size: int = 32
    seed: int = 0


@dataclass
class ExtractResult:
    config: ExtractConfig
    n_samples: int
    n_unique: int
    index_ngrams: int
    memorised_fraction: float
    precision: dict[str, float]
    samples: list[dict[str, Any]] = field(default_factory=list)
    memorised: list[dict[str, Any]] = field(default_factory=list)
    k_tokens: int = 0
    chars_per_token: float = 0.0
    precision_ci: dict[str, dict[str, Any]] = field(default_factory=dict)
    leaks: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""


def _prompts(wb: WhiteBox, cfg: ExtractConfig, prefix_docs: Sequence[str], rng: random.Random) -> list[list[int]]:
    tok = wb.tokenizer
    if cfg.prefixes == "empty":
        start = [tok.eos_id] if tok.eos_id is not None else wb.encode("\n")
        return [start] * cfg.samples
    pool = [wb.encode(d) for d in prefix_docs]
    pool = [p for p in pool if len(p) > cfg.prefix_tokens]
    if not pool:
        raise PrivacyError(f"no prefix document is longer than {cfg.prefix_tokens} tokens; give longer text or "
                           "use --prefixes empty")
    out = []
    for _ in range(cfg.samples):
        p = rng.choice(pool)
        s = rng.randrange(len(p) - cfg.prefix_tokens)
        out.append(p[s:s + cfg.prefix_tokens])
    return out


def _score(wb: WhiteBox, prompts: Sequence[Sequence[int]], new: Sequence[Sequence[int]], batch_size: int,
           stage: Stage) -> list[torch.Tensor]:
    """log p of each sample's generated tokens, given its prompt."""
    seqs = [list(p) + list(n) for p, n in zip(prompts, new)]
    lps = batch_logprobs(wb, seqs, batch_size=batch_size, stage=stage)
    return [lp["logp"][len(p) - 1:] for lp, p in zip(lps, prompts)]


def _text_nll(wb: WhiteBox, texts: Sequence[str], batch_size: int, stage: Stage) -> list[float]:
    """L(x) of texts scored alone (after a line break)."""
    lead = wb.encode("\n")
    seqs = [(lead + wb.encode(t))[: wb.block_size + 1] for t in texts]
    lps = batch_logprobs(wb, seqs, batch_size=batch_size, stage=stage)
    return [float(-lp["logp"][len(lead) - 1:].double().mean()) for lp in lps]


MIN_MEMORISED_FOR_COMPARISON = 10  # fewer memorised samples than this cannot tell the rankings apart


def run_extract(wb: WhiteBox, train_docs: Sequence[str], cfg: ExtractConfig, reference: WhiteBox | None = None,
                prefix_docs: Sequence[str] = (), callback: Callback | None = None,
                canaries: Sequence[str] = ()) -> ExtractResult:
    """Sample, rank by each metric, check verbatim memorisation against the training split; report the
    precision of every metric's top `cfg.top` samples (with exact intervals) and the memorised samples found.
    `canaries` are planted secrets: a sample containing one is a leak, and memorised."""

    cb = callback or quiet
    if cfg.samples < 1 or cfg.k < 0 or cfg.k_chars < 1:
        raise PrivacyError("--samples, -k and --k-chars must be positive")
    rng = random.Random(cfg.seed)
    tok = wb.tokenizer
    with Stage(cb, "index training text", len(train_docs)) as st:
        seqs = []
        for d in train_docs:
            seqs.append(wb.encode(d))
            st.advance()
        chars, toks = sum(len(d) for d in train_docs), sum(len(x) for x in seqs)
        cpt = chars / max(1, toks)
        k_tokens = cfg.k or max(2, round(cfg.k_chars / max(cpt, 1e-9)))
        index = NgramIndex(seqs, k_tokens)
    prompts = _prompts(wb, cfg, prefix_docs, rng)
    length = max(1, min(cfg.length, wb.block_size - max(len(p) for p in prompts)))
    pad = tok.pad_id if tok.pad_id is not None else 0
    new: list[list[int]] = []
    with Stage(cb, "generate", cfg.samples) as st:
        for b in range(0, cfg.samples, cfg.batch_size):
            g = GenerationConfig(max_new_tokens=length, temperature=cfg.temperature, top_k=cfg.top_k,
                                 seed=cfg.seed + b, stop_at_eos=False)
            new.extend(generate_ids(wb.model, prompts[b:b + cfg.batch_size], g, eos_id=tok.eos_id, pad_id=pad))
            st.advance(len(prompts[b:b + cfg.batch_size]))
    # keep unique samples (Carlini et al. de-duplicate before inspection)
    seen: dict[tuple[int, ...], int] = {}
    for i, n in enumerate(new):
        seen.setdefault(tuple(n), i)
    keep = sorted(seen.values())
    prompts = [prompts[i] for i in keep]
    new = [new[i] for i in keep]
    texts = [wb.decode(n) for n in new]
    n_score = len(new) * (3 if reference is None else 4)
    with Stage(cb, "score samples", n_score) as st:
        lps = _score(wb, prompts, new, cfg.batch_size, st)
        nll = [float(-lp.double().mean()) for lp in lps]
        alone = _text_nll(wb, texts, cfg.batch_size, st)
        lower = _text_nll(wb, [t.lower() for t in texts], cfg.batch_size, st)
        ref = _text_nll(reference, texts, cfg.batch_size, st) if reference is not None else None
    rows = []
    for i, (text, ids) in enumerate(zip(texts, new)):
        L = max(nll[i], 1e-6)
        la = max(alone[i], 1e-6)
        length_m, start = index.longest_match(ids)
        span = ids[start:start + length_m]
        repetitive = bool(length_m) and len(set(span)) < cfg.min_distinct
        leaked = [c for c in canaries if c and c in text]
        row = {"text": text, "tokens": len(ids), "nll": nll[i], "leaked_canaries": leaked,
               "scores": {"perplexity": -nll[i], "zlib": zlib_entropy(text) / L, "lowercase": lower[i] / la,
                          "window": -min_window_nll(lps[i], cfg.window)},
               "verbatim_tokens": length_m, "memorised": (length_m >= k_tokens and not repetitive) or bool(leaked),
               "repetitive": repetitive, "verbatim_text": wb.decode(span) if length_m else ""}
        if ref is not None:
            row["scores"]["reference"] = ref[i] / la
        rows.append(row)
    precision, precision_ci = {}, {}
    top = min(cfg.top, len(rows))
    for m in METRICS:
        if m not in rows[0]["scores"]:
            continue
        order = sorted(range(len(rows)), key=lambda i: -rows[i]["scores"][m])
        for r, i in enumerate(order):
            rows[i].setdefault("rank", {})[m] = r + 1
        hits = sum(rows[i]["memorised"] for i in order[:top])
        precision[m] = hits / top
        precision_ci[m] = rate_ci(hits, top).to_dict()
    memorised = sorted((r for r in rows if r["memorised"]), key=lambda r: -r["verbatim_tokens"])
    n_mem = len(memorised)
    note = ""
    if n_mem < MIN_MEMORISED_FOR_COMPARISON:
        note = (f"only {n_mem} of {len(rows)} unique samples are memorised: too few to tell the rankings apart "
                f"(every ranking's top {top} holds at most {n_mem}); draw more samples (--samples) or train a model "
                "that memorises more before comparing them")
    elif top >= len(rows):
        note = f"the top {top} is every sample: precision is the same for every ranking; raise --samples"
    leaks = [r for r in rows if r["leaked_canaries"]]
    return ExtractResult(cfg, cfg.samples, len(keep), len(index), n_mem / len(rows), precision, rows, memorised,
                         k_tokens, cpt, precision_ci, leaks, note)
