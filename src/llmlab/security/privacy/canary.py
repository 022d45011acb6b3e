"""Canaries and exposure (Carlini, Liu, Erlingsson, Kos, Song, "The Secret Sharer", USENIX Security 2019).

A canary format such as "my PIN is {d}{d}{d}{d}{d}{d}" defines a space R of candidate secrets. Random
secrets from it are inserted into a training corpus a chosen number of times; after training, each
canary's exposure says how much more likely the model finds it than the other candidates:

    Px(s)       = -sum_i log2 p(x_i | x_<i)                     (log-perplexity in bits)
    rank(s[r])  = |{ r' in R : Px(s[r']) <= Px(s[r]) }|
    exposure    = log2 |R| - log2 rank(s[r])                    (0 .. log2 |R|)

The rank is exact when |R| is small enough to score every candidate (a batched walk of the candidate
tree with the KV cache: all candidates share the prefix and each further character is one batched
step), and otherwise estimated from a sample with a skew-normal fit of the Px distribution (§4.3).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from llmlab.attention import KVCache
from llmlab.checkpoint import atomic_write_bytes, atomic_write_json
from llmlab.data import load_corpus, split_corpus
from llmlab.generate.causal import GenerationConfig, generate_ids
from llmlab.security.privacy.common import Callback, PrivacyError, Stage, batch_logprobs, quiet
from llmlab.security.privacy.dedup import dedup_docs
from llmlab.security.privacy.dp import DPConfig, train_dp
from llmlab.security.targets import WhiteBox
from llmlab.train.config import resolve_config
from llmlab.train.loop import TrainingInterrupted, last_checkpoint, load_run_for_resume, run_finished, train

SLOTS = {"d": "0123456789", "l": "abcdefghijklmnopqrstuvwxyz", "L": "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
SLOT_RE = re.compile(r"\{([^{}]*)\}")
DEFAULT_FORMAT = "my PIN is {d}{d}{d}{d}{d}{d}"
EXACT_LIMIT = 10**6
LN2 = math.log(2.0)
LEAD = "\n"  # canaries are inserted as lines, so a line break is their context


# ----------------------------------------------------------------------------- formats


@dataclass(frozen=True)
class CanaryFormat:
    """A canary format: literal text with slots {d} (digit), {l} (lowercase letter), {L} (uppercase).

    `prefix` is the literal text before the first slot; `template` lists, for every character after it,
    the characters allowed there (one for a literal). A secret is the string of slot characters."""

    text: str
    prefix: str
    template: tuple[str, ...]
    slots: tuple[int, ...]  # positions in template that are slots

    @classmethod
    def parse(cls, fmt: str) -> CanaryFormat:
        parts: list[str] = []  # one alphabet per character of the whole canary
        is_slot: list[bool] = []
        pos = 0
        for m in SLOT_RE.finditer(fmt):
            for ch in fmt[pos:m.start()]:
                parts.append(ch)
                is_slot.append(False)
            name = m.group(1)
            if name not in SLOTS:
                raise PrivacyError(f"canary format {fmt!r}: unknown slot {{{name}}}; use {{d}} for a digit, "
                                   "{l} for a lowercase letter or {L} for an uppercase letter")
            parts.append(SLOTS[name])
            is_slot.append(True)
            pos = m.end()
        for ch in fmt[pos:]:
            parts.append(ch)
            is_slot.append(False)
        if not any(is_slot):
            raise PrivacyError(f"canary format {fmt!r} has no secret slot; add slots such as {{d}} (digit) or "
                               "{l} (letter), e.g. 'my PIN is {d}{d}{d}{d}'")
        if "\n" in fmt:
            raise PrivacyError("a canary format must be one line; remove the line break")
        first = is_slot.index(True)
        prefix = "".join(parts[:first])
        template = tuple(parts[first:])
        slots = tuple(i for i, s in enumerate(is_slot[first:]) if s)
        return cls(fmt, prefix, template, slots)

    @property
    def space_size(self) -> int:
        """|R|: the number of candidate secrets."""
        return math.prod(len(self.template[i]) for i in self.slots)

    @property
    def radices(self) -> list[int]:
        return [len(self.template[i]) for i in self.slots]

    def secret_at(self, index: int) -> str:
        """The secret with this index (mixed radix, first slot most significant)."""
        chars = []
        for r, i in zip(reversed(self.radices), reversed(self.slots)):
            index, d = divmod(index, r)
            chars.append(self.template[i][d])
        return "".join(reversed(chars))

    def index_of(self, secret: str) -> int:
        if len(secret) != len(self.slots):
            raise PrivacyError(f"secret {secret!r} does not fit the format {self.text!r}")
        idx = 0
        for ch, i in zip(secret, self.slots):
            alphabet = self.template[i]
            if ch not in alphabet:
                raise PrivacyError(f"secret {secret!r} does not fit the format {self.text!r}")
            idx = idx * len(alphabet) + alphabet.index(ch)
        return idx

    def suffix(self, secret: str) -> str:
        """The canary text after the prefix, with the secret filled in."""
        it = iter(secret)
        return "".join(next(it) if j in self.slots else self.template[j] for j in range(len(self.template)))

    def fill(self, secret: str) -> str:
        return self.prefix + self.suffix(secret)

    def random_secret(self, rng: random.Random) -> str:
        return self.secret_at(rng.randrange(self.space_size))


@dataclass
class Canary:
    """One inserted (or control, repeats = 0) canary."""

    secret: str
    text: str
    repeats: int


def draw_canaries(fmt: CanaryFormat, repeats: Sequence[int], controls: int, seed: int) -> list[Canary]:
    """Distinct random secrets: one per entry of repeats, then `controls` never-inserted ones."""
    counts = [int(r) for r in repeats] + [0] * controls
    if len(counts) > fmt.space_size:
        raise PrivacyError(f"{len(counts)} canaries do not fit a space of {fmt.space_size} secrets; add slots")
    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    for r in counts:
        s = fmt.random_secret(rng)
        while s in seen:
            s = fmt.random_secret(rng)
        seen.add(s)
        out.append(Canary(s, fmt.fill(s), r))
    return out


def insert_canaries(docs: Sequence[str], canaries: Sequence[Canary], seed: int) -> list[str]:
    """Copies of the documents with each canary inserted `repeats` times as its own line, at random line
    starts of random documents."""
    rng = random.Random(seed)
    inserts: dict[int, list[tuple[int, str]]] = {}
    for c in canaries:
        for _ in range(c.repeats):
            d = rng.randrange(len(docs))
            n_lines = docs[d].count("\n") + 1
            inserts.setdefault(d, []).append((rng.randrange(n_lines), c.text))
    out = list(docs)
    for d, items in inserts.items():
        lines = docs[d].split("\n")
        for line_no, text in sorted(items, key=lambda x: -x[0]):
            lines.insert(line_no, text)
        out[d] = "\n".join(lines)
    return out


def canary_corpus(data: str | None, max_chars: int, val_fraction: float, min_docs: int = 10, split: str = "chunks",
                  seed: int = 0, text_field: str = "text", encoding_errors: str = "strict"
                  ) -> tuple[list[str], list[str]]:
    """A corpus for a canary experiment, as (train docs, val docs): the documents of `data` (the built-in
    corpus when None), the first max_chars characters of them (0 = all), cut into at least min_docs
    documents at paragraph breaks, then split by llmlab.data.split_corpus: by default "chunks", i.i.d.
    pieces of characters, so the validation share holds in characters and members and non-members come
    from the same text (a split "by document" of a few long pages can hold half the text out)."""
    docs = [d for d in load_corpus(data, text_field, encoding_errors) if d]
    if max_chars:
        kept, total = [], 0
        for d in docs:
            if total >= max_chars:
                break
            kept.append(d[: max_chars - total])
            total += len(kept[-1])
        docs = kept
    if len(docs) < min_docs:
        text = "".join(docs)
        size = max(1, len(text) // min_docs)
        docs, start = [], 0
        while start < len(text):
            end = min(len(text), start + size)
            cut = text.find("\n", end)
            end = len(text) if cut < 0 or len(docs) == min_docs - 1 else cut + 1
            docs.append(text[start:end])
            start = end
        if len(docs) < min_docs:
            raise PrivacyError("the corpus is too short to split into 10 documents; give more text with --data")
    return split_corpus(docs, val_fraction, split, seed)


def write_corpus(path: str | Path, train: Sequence[str], val: Sequence[str]) -> float:
    """Write train + val documents as JSONL ({"text": ...} per line); return the val_fraction that makes
    llmlab.data.split_corpus give back exactly this split."""
    train = [d for d in train if d]  # split_corpus drops empty documents (e.g. emptied by dedup)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in [*train, *val])

    atomic_write_bytes(path, lines.encode())
    n = len(train) + len(val)
    return (len(val) - 0.5) / n  # split_corpus takes ceil(n * f) documents: exactly len(val)


# ----------------------------------------------------------------------------- scoring


def _is_char_aligned(wb: WhiteBox, fmt: CanaryFormat) -> bool:
    """Whether every candidate is its context's tokens plus one token per character (char tokenizers).
    Characters outside the vocabulary become the unknown token: candidates differing only there tie."""
    tok = wb.tokenizer
    if getattr(tok, "kind", "") != "char":
        return False
    return all(len(tok.encode(ch)) == 1 for alphabet in fmt.template for ch in alphabet)


def oov_chars(wb: WhiteBox, fmt: CanaryFormat) -> str:
    """Characters of the format the model's tokenizer does not know (they all read as one unknown token)."""
    unk = wb.tokenizer.special_tokens.get("unk")
    chars = sorted({ch for a in fmt.template for ch in a})
    return "".join(ch for ch in chars if unk is not None and wb.encode(ch) == [unk])


def _context_ids(wb: WhiteBox, fmt: CanaryFormat) -> list[int]:
    ctx = wb.encode(LEAD + fmt.prefix)
    room = wb.block_size - len(fmt.template)
    if room < 1:
        raise PrivacyError(f"the canary is longer than the model's context ({wb.block_size} tokens); use a "
                           "shorter format")
    return ctx[-room:]


def _select(caches: list[KVCache], rows: torch.Tensor) -> list[KVCache]:
    """KV caches holding the given batch rows, with room for one more position."""
    out = []
    for c in caches:
        n = KVCache()
        L = c.length
        k, v = c.k[:, :, :L].index_select(0, rows), c.v[:, :, :L].index_select(0, rows)  # (b, nh, L, hs)
        pad = k.new_zeros(k.size(0), k.size(1), 1, k.size(3))
        n.k, n.v, n.length = torch.cat([k, pad], 2), torch.cat([v, pad], 2), L
        out.append(n)
    return out


@torch.no_grad()
def score_space(wb: WhiteBox, fmt: CanaryFormat, max_rows: int = 2048, callback: Callback | None = None
                ) -> torch.Tensor:
    """Px (bits) of the part after the prefix, for every candidate secret in index order: (|R|,) float64.

    Walks the candidate tree breadth-first in chunks of at most max_rows nodes: a node at depth j holds
    the KV cache of context + j characters; one batched one-token forward gives the next-character
    distribution of every node, whose log-probabilities score all its children at once. A character
    model therefore needs sum_j (number of nodes at depth j < m) token steps instead of |R| * m."""
    model = wb.model
    tmpl = fmt.template
    m = len(tmpl)
    alph = [torch.tensor([wb.encode(ch)[0] for ch in a]) for a in tmpl]
    slot = [len(a) > 1 or j in fmt.slots for j, a in enumerate(tmpl)]
    out = torch.empty(fmt.space_size, dtype=torch.float64)
    ctx = torch.tensor([_context_ids(wb, fmt)])
    caches = model.new_caches()
    logp0 = F.log_softmax(model(ctx, caches=caches)[:, -1].double(), -1)  # (1, V)
    internal = sum(math.prod(len(tmpl[i]) for i in range(j)) for j in range(1, m))
    stage = Stage(callback, "score space", internal)

    def expand(j: int, caches: list[KVCache], logp: torch.Tensor, score: torch.Tensor, idx: torch.Tensor) -> None:
        a = alph[j]
        child = score[:, None] - logp[:, a] / LN2  # (B, k) bits
        k = a.numel()
        cidx = idx[:, None] * k + torch.arange(k) if slot[j] else idx[:, None]  # (B, k)
        if j == m - 1:
            out[cidx.reshape(-1)] = child.reshape(-1)
            return
        B = score.numel()
        parent = torch.arange(B).repeat_interleave(k)  # (B*k,)
        tokens = a.repeat(B)
        child, cidx = child.reshape(-1), cidx.reshape(-1)
        for s in range(0, B * k, max_rows):
            rows = slice(s, s + max_rows)
            sub = _select(caches, parent[rows])
            lg = model(tokens[rows, None], caches=sub)[:, -1]  # (b, V)
            stage.advance(int(tokens[rows].numel()))
            expand(j + 1, sub, F.log_softmax(lg.double(), -1), child[rows], cidx[rows])

    with stage:
        expand(0, caches, logp0, torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.long))
    return out


@torch.no_grad()
def score_texts(wb: WhiteBox, texts: Sequence[str], batch_size: int = 256, callback: Callback | None = None,
                name: str = "score samples") -> np.ndarray:
    """Px (bits) of each full canary text after a line break, by padded batched forwards: (N,)."""
    lead = len(wb.encode(LEAD))
    seqs = [wb.encode(LEAD + t)[-(wb.block_size + 1):] for t in texts]
    with Stage(callback, name, len(seqs)) as st:
        lps = batch_logprobs(wb, seqs, batch_size=batch_size, stage=st)
    return np.array([-float(lp["logp"][lead - 1:].double().sum()) / LN2 for lp in lps])


def prefix_bits(wb: WhiteBox, fmt: CanaryFormat) -> float:
    """Px (bits) of the prefix after a line break (shared by every candidate)."""
    ids = wb.encode(LEAD + fmt.prefix)
    lead = len(wb.encode(LEAD))
    if len(ids) <= lead:
        return 0.0
    lp = batch_logprobs(wb, [ids[-(wb.block_size + 1):]])[0]["logp"]
    return -float(lp[lead - 1:].double().sum()) / LN2


def exposure_from_rank(rank: int, space: int) -> float:
    """exposure = log2 |R| - log2 rank (Carlini et al. 2019, Definition 3)."""
    return math.log2(space) - math.log2(max(1, rank))


def skewnorm_exposure(sample_px: np.ndarray, px: float) -> tuple[float, dict[str, float]]:
    """Extrapolated exposure (Carlini et al. 2019, §4.3): fit a skew-normal to the Px of random
    candidates and take exposure ~ -log2 SkewNormCDF(Px(canary)); returns it and the fit."""
    from scipy import stats

    a, loc, scale = stats.skewnorm.fit(sample_px)
    logcdf = float(stats.skewnorm.logcdf(px, a, loc, scale))
    return -logcdf / LN2, {"shape": float(a), "loc": float(loc), "scale": float(scale)}


# ----------------------------------------------------------------------------- extraction


@torch.no_grad()
def beam_extract(wb: WhiteBox, fmt: CanaryFormat, beam: int) -> list[tuple[str, float]]:
    """The `beam` most likely secrets by beam search over the format from its prefix (beam = 1 is
    greedy decoding), constrained to the characters each position allows; (secret, Px bits), best first."""
    model = wb.model
    tmpl = fmt.template
    ctx = torch.tensor([_context_ids(wb, fmt)])
    caches = model.new_caches()
    logp = F.log_softmax(model(ctx, caches=caches)[:, -1].double(), -1)  # (1, V)
    seqs: list[str] = [""]
    score = torch.zeros(1, dtype=torch.float64)
    for j, a_chars in enumerate(tmpl):
        a = torch.tensor([wb.encode(ch)[0] for ch in a_chars])
        cand = (score[:, None] - logp[:, a] / LN2).reshape(-1)  # (B*k,) bits
        keep = torch.argsort(cand)[:beam]
        parent, choice = keep // a.numel(), keep % a.numel()
        seqs = [seqs[p] + a_chars[c] for p, c in zip(parent.tolist(), choice.tolist())]
        score = cand[keep]
        if j < len(tmpl) - 1:
            caches = _select(caches, parent)
            logp = F.log_softmax(model(a[choice][:, None], caches=caches)[:, -1].double(), -1)
    secrets = ["".join(s[i] for i in fmt.slots) for s in seqs]
    return list(zip(secrets, score.tolist()))


@torch.no_grad()
def greedy_free(wb: WhiteBox, fmt: CanaryFormat) -> str:
    """Unconstrained greedy continuation of the prefix, as many tokens as the canary has characters."""

    ids = _context_ids(wb, fmt)
    tok = wb.tokenizer
    new = generate_ids(wb.model, [ids], GenerationConfig(max_new_tokens=len(fmt.template), temperature=0.0),
                       eos_id=tok.eos_id, pad_id=tok.pad_id or 0)[0]
    return wb.decode(new)


# ----------------------------------------------------------------------------- measurement


@dataclass
class ExposureResult:
    """Exposure and extraction of every canary of one model."""

    format: str
    space_size: int
    method: str  # exact | estimate
    max_exposure: float
    canaries: list[dict[str, Any]]
    samples: int = 0
    fit: dict[str, float] = field(default_factory=dict)
    greedy_secret: str = ""
    free_greedy_text: str = ""
    beam: list[tuple[str, float]] = field(default_factory=list)
    histogram: dict[str, list[float]] = field(default_factory=dict)
    oov: str = ""  # format characters outside the model's vocabulary


def measure_exposure(wb: WhiteBox, fmt: CanaryFormat, canaries: Sequence[Canary], estimate: bool = False,
                     samples: int = 10000, exact_limit: int = EXACT_LIMIT, beam: int = 16, seed: int = 0,
                     callback: Callback | None = None) -> ExposureResult:
    """Exposure of each canary (exact rank over all of R, or the skew-normal estimate) plus extraction by
    constrained greedy and beam search from the prefix."""
    cb = callback or quiet
    space = fmt.space_size
    if space > exact_limit and not estimate:
        raise PrivacyError(f"the format {fmt.text!r} has {space:,} candidates, more than {exact_limit:,} to score "
                           "exactly; pass --estimate to use the skew-normal estimate, or use fewer slots")
    aligned = _is_char_aligned(wb, fmt)
    if not estimate and not aligned and space > 50_000:
        raise PrivacyError(f"exact ranks of {space:,} candidates need a character-level model; pass --estimate")
    base = prefix_bits(wb, fmt) if aligned else 0.0
    entries = []
    res = ExposureResult(fmt.text, space, "estimate" if estimate else "exact", math.log2(space), entries)
    res.oov = oov_chars(wb, fmt) if getattr(wb.tokenizer, "kind", "") == "char" else ""
    if not estimate:
        if aligned:
            px_all = score_space(wb, fmt, callback=cb).numpy() + base
        else:
            px_all = score_texts(wb, [fmt.fill(fmt.secret_at(i)) for i in range(space)], callback=cb,
                                 name="score space")
        sample = np.random.default_rng(seed).choice(px_all, size=min(samples, space), replace=False)
        for c in canaries:
            px = float(px_all[fmt.index_of(c.secret)])
            rank = int((px_all <= px).sum())
            ext, fit = skewnorm_exposure(sample, px)
            entries.append({"secret": c.secret, "text": c.text, "repeats": c.repeats, "px_bits": px, "rank": rank,
                            "exposure": exposure_from_rank(rank, space),
                            # the estimator a larger space would need, beside the exact value, to show its error
                            "exposure_skewnorm": min(res.max_exposure, max(0.0, ext)),
                            "skewnorm_clipped": bool(ext > res.max_exposure)})
            res.fit = fit
        hist, edges = np.histogram(px_all, bins=80)
        res.histogram = {"counts": hist.tolist(), "edges": edges.tolist()}
    else:
        rng = random.Random(seed)
        ref_secrets = [fmt.random_secret(rng) for _ in range(samples)]
        ref = score_texts(wb, [fmt.fill(s) for s in ref_secrets], callback=cb, name="score sample")
        own = score_texts(wb, [c.text for c in canaries], callback=cb, name="score canaries")
        res.samples = samples
        for c, px in zip(canaries, own.tolist()):
            ext, fit = skewnorm_exposure(ref, px)
            below = int((ref <= px).sum())
            entries.append({"secret": c.secret, "text": c.text, "repeats": c.repeats, "px_bits": px,
                            # rank and exposure_sampled come from one estimator (the share of random candidates
                            # scoring below); exposure from another (the skew-normal tail), clipped at log2|R|
                            "rank_estimate": max(1.0, space * (1 + below) / (samples + 1)),
                            "exposure_sampled": math.log2(samples + 1) - math.log2(1 + below),
                            "exposure": min(res.max_exposure, max(0.0, ext)),
                            "exposure_skewnorm": min(res.max_exposure, max(0.0, ext)),
                            "skewnorm_clipped": bool(ext > res.max_exposure),
                            "exposure_interpolated": math.log2(samples) - math.log2(1 + below)})
            res.fit = fit
        hist, edges = np.histogram(ref, bins=80)
        res.histogram = {"counts": hist.tolist(), "edges": edges.tolist()}
    if aligned or space <= 50_000:
        with Stage(cb, "extract", 2) as st:
            res.beam = [(s, b + base) for s, b in beam_extract(wb, fmt, max(1, beam))] if aligned else []
            st.advance()
            res.greedy_secret = beam_extract(wb, fmt, 1)[0][0] if aligned else ""
            res.free_greedy_text = greedy_free(wb, fmt)
            st.advance()
    beam_secrets = [s for s, _ in res.beam]
    for e in entries:
        e["greedy_extracted"] = e["secret"] == res.greedy_secret
        e["beam_rank"] = beam_secrets.index(e["secret"]) + 1 if e["secret"] in beam_secrets else None
        e["free_greedy_extracted"] = res.free_greedy_text.startswith(fmt.suffix(e["secret"]))
    return res


# ----------------------------------------------------------------------------- the experiment


@dataclass
class CanaryConfig:
    """A canary experiment. The defaults train a small character-level GPT on part of the built-in corpus
    in a few minutes on 2 CPU cores."""

    format: str = DEFAULT_FORMAT
    repeats: tuple[int, ...] = (1, 4, 16, 64)
    per_count: int = 3  # canaries per repetition count: the curve shows their mean and spread, not one draw
    controls: int = 3  # never-inserted canaries (the negative control)
    seed: int = 0
    data: str | None = None
    max_chars: int = 100_000
    val_fraction: float = 0.1
    split: str = "chunks"  # the corpus's train/val split (llmlab.data.split_corpus): by characters by default
    text_field: str = "text"
    encoding_errors: str = "strict"
    preset: str = "tiny"
    train: dict[str, Any] = field(default_factory=lambda: dict(block_size=64, max_iters=800, batch_size=32,
                                                               eval_interval=200, eval_iters=10, lr=2e-3,
                                                               num_samples=0))
    estimate: bool = False
    samples: int = 10000
    beam: int = 16
    defence: str = "none"  # none | dedup | dp
    dp: dict[str, Any] = field(default_factory=dict)


@dataclass
class CanaryExperiment:
    config: CanaryConfig
    run: str
    canaries: list[Canary]
    exposure: ExposureResult
    training: dict[str, Any] = field(default_factory=dict)
    dedup: dict[str, Any] = field(default_factory=dict)


def save_canaries(path: str | Path, fmt: CanaryFormat, canaries: Sequence[Canary], seed: int) -> None:
    atomic_write_json(path, {"format": fmt.text, "seed": seed, "canaries": [asdict(c) for c in canaries]})


def load_canaries(path: str | Path) -> tuple[CanaryFormat, list[Canary]]:
    """The format and canaries of an earlier experiment (its canaries.json)."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
        fmt = CanaryFormat.parse(d["format"])
        canaries = [Canary(c["secret"], c["text"], int(c["repeats"])) for c in d["canaries"]]
    except FileNotFoundError:
        raise PrivacyError(f"{p} does not exist; give the canaries.json an earlier `llmlab privacy canary` "
                           "wrote, with --canaries") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PrivacyError(f"{p} is not a canaries.json file ({type(e).__name__}); give the one "
                           "`llmlab privacy canary` wrote") from None
    for c in canaries:
        fmt.index_of(c.secret)
    return fmt, canaries


def find_canaries(run: str | Path) -> Path | None:
    """canaries.json next to a run (in the run folder or its parent experiment folder)."""
    for p in (Path(run) / "canaries.json", Path(run).parent / "canaries.json"):
        if p.is_file():
            return p
    return None


EXPERIMENT_FILE = "experiment.json"


def run_canary_experiment(cfg: CanaryConfig, out: str | Path, callback: Callback | None = None) -> CanaryExperiment:
    """Draw canaries, insert them into the corpus (optionally deduplicate it), train a model (normally or
    with DP-SGD) into out/run, and measure every canary's exposure. If the training is stopped by SIGINT or
    SIGTERM it is checkpointed, and the TrainingInterrupted raised names `llmlab privacy canary --resume OUT`
    (resume_canary_experiment), which finishes the training and measures."""

    cb = callback or quiet
    out = Path(out)
    fmt = CanaryFormat.parse(cfg.format)
    if fmt.space_size > EXACT_LIMIT and not cfg.estimate:
        raise PrivacyError(f"the format {fmt.text!r} has {fmt.space_size:,} candidates, more than {EXACT_LIMIT:,} "
                           "to score exactly; pass --estimate to use the skew-normal estimate, or use fewer slots")
    if cfg.defence not in ("none", "dedup", "dp"):
        raise PrivacyError(f"--defence {cfg.defence!r} is not one of none, dedup, dp")
    if cfg.per_count < 1:
        raise PrivacyError("--per-count must be at least 1")
    if any(r < 0 for r in cfg.repeats):
        raise PrivacyError("--repeats must be non-negative counts, e.g. 1,4,16,64")
    run = out / "run"
    if run.exists() and any(run.iterdir()):
        raise PrivacyError(_existing_message(out))
    canaries = draw_canaries(fmt, [r for r in cfg.repeats for _ in range(cfg.per_count)], cfg.controls, cfg.seed)
    train_docs, val_docs = canary_corpus(cfg.data, cfg.max_chars, cfg.val_fraction, split=cfg.split,
                                         seed=cfg.seed, text_field=cfg.text_field,
                                         encoding_errors=cfg.encoding_errors)
    train_docs = insert_canaries(train_docs, canaries, cfg.seed + 1)
    dedup_info: dict[str, Any] = {}
    if cfg.defence == "dedup":
        shortest = min(len(c.text) for c in canaries)  # a short canary line still counts as a duplicate
        train_docs, dedup_info = dedup_docs(train_docs, mode="both", min_line_chars=min(8, shortest), callback=cb)
    out.mkdir(parents=True, exist_ok=True)
    vf = write_corpus(out / "corpus.jsonl", train_docs, val_docs)
    save_canaries(out / "canaries.json", fmt, canaries, cfg.seed)
    # what resume_canary_experiment needs to finish the experiment the same way
    atomic_write_json(out / EXPERIMENT_FILE, {"config": asdict(cfg), "val_fraction": vf, "dedup": dedup_info})
    return _train_and_measure(cfg, out, vf, dedup_info, resume=False, callback=cb)


def resume_canary_experiment(out: str | Path, callback: Callback | None = None) -> CanaryExperiment:
    """Finish a canary experiment whose training was stopped (Ctrl-C, SIGTERM, or a kill): continue its
    run from the last checkpoint with the settings it started with (DP-SGD ones included), then measure."""
    out = Path(out)
    try:
        saved = json.loads((out / EXPERIMENT_FILE).read_text())
        d = dict(saved["config"])
        if "defense" in d:  # written before the spelling became "defence"
            d["defence"] = d.pop("defense")
        cfg = CanaryConfig(**{**d, "repeats": tuple(d["repeats"])})
    except FileNotFoundError:
        raise PrivacyError(f"{out} holds no canary experiment to resume (no {EXPERIMENT_FILE}); give the --out "
                           "folder of a `llmlab privacy canary` run") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PrivacyError(f"{out / EXPERIMENT_FILE} is not a canary experiment file ({type(e).__name__}); "
                           f"start the experiment again with another --out") from None
    if not (out / "canaries.json").is_file() or not (out / "corpus.jsonl").is_file():
        raise PrivacyError(f"{out} lacks its canaries.json or corpus.jsonl; start the experiment again with "
                           "another --out")
    run = out / "run"
    resume = last_checkpoint(run) is not None and (run / "config.json").is_file()
    return _train_and_measure(cfg, out, float(saved["val_fraction"]), saved.get("dedup", {}), resume=resume,
                              callback=callback or quiet)


def _existing_message(out: Path) -> str:
    run = out / "run"
    if run_finished(run):
        return f"{run} already exists and holds a trained run; measure it with --run {run}, or choose another --out"
    if (out / EXPERIMENT_FILE).is_file():
        return (f"{run} already exists and holds an unfinished canary run; continue it with "
                f"`llmlab privacy canary --resume {out}`, or choose another --out")
    return f"{run} already exists and is not a canary run; choose another --out"


def _train_and_measure(cfg: CanaryConfig, out: Path, vf: float, dedup_info: dict[str, Any], resume: bool,
                       callback: Callback) -> CanaryExperiment:
    run = out / "run"
    fmt, canaries = load_canaries(out / "canaries.json")
    overrides = {**cfg.train, "data": str(out / "corpus.jsonl"), "val_fraction": vf, "tokenizer": "char",
                 "seed": cfg.seed + 1337}
    rcfg = load_run_for_resume(run) if resume else resolve_config(cfg.preset, None, overrides)
    try:
        if cfg.defence == "dp":
            result = train_dp(rcfg, run, DPConfig(**cfg.dp), callback=callback, resume=resume)
            training = {"best_val_loss": result.best_val_loss, "val_loss": result.val_loss, "steps": result.step,
                        "elapsed": result.elapsed, "epsilon": result.epsilon, "delta": result.delta,
                        "noise_multiplier": result.noise_multiplier}
        else:
            r = train(rcfg, run, resume=resume, callback=callback)
            training = {"best_val_loss": r.best_val_loss, "val_loss": r.val_loss, "steps": r.step,
                        "elapsed": r.elapsed}
    except TrainingInterrupted as e:  # the experiment, not only its training run, continues
        raise e.with_command(f"llmlab privacy canary --resume {out}") from None
    wb = WhiteBox.load(run)
    exp = measure_exposure(wb, fmt, canaries, estimate=cfg.estimate, samples=cfg.samples, beam=cfg.beam,
                           seed=cfg.seed, callback=callback)
    return CanaryExperiment(cfg, str(run), canaries, exp, training, dedup_info)


# ----------------------------------------------------------------------------- figures


def exposure_by_count(res: ExposureResult) -> list[dict[str, Any]]:
    """Per repetition count: how many canaries, their mean exposure with a t interval, min and max."""
    from llmlab.stats import mean_ci

    groups: dict[int, list[float]] = {}
    for c in res.canaries:
        groups.setdefault(int(c["repeats"]), []).append(float(c["exposure"]))
    out = []
    for r in sorted(groups):
        m, lo, hi = mean_ci(groups[r])
        out.append({"repeats": r, "n": len(groups[r]), "mean": m, "lo": lo, "hi": hi, "min": min(groups[r]),
                    "max": max(groups[r])})
    return out


def plot_exposure(results: dict[str, ExposureResult]) -> Any:
    """Exposure against the number of insertions (0 = never-inserted controls), one line per model: every
    canary as a dot, the mean per count as the line, its 95% t interval as the bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ticks: set[int] = set()
    max_e = 0.0
    for label, res in results.items():
        x_of = lambda r: math.log2(r) + 1 if r > 0 else 0  # noqa: E731
        groups = exposure_by_count(res)
        xs = [x_of(g["repeats"]) for g in groups]
        means = [g["mean"] for g in groups]
        err = [[g["mean"] - g["lo"] if math.isfinite(g["lo"]) else 0 for g in groups],
               [g["hi"] - g["mean"] if math.isfinite(g["hi"]) else 0 for g in groups]]
        line = ax.errorbar(xs, means, yerr=err, fmt="o-", capsize=3, label=f"{label} (mean, 95% CI)")
        ax.scatter([x_of(c["repeats"]) for c in res.canaries], [c["exposure"] for c in res.canaries], s=10,
                   alpha=0.5, color=line[0].get_color())
        ticks.update(g["repeats"] for g in groups)
        max_e = max(max_e, res.max_exposure)
    ax.axhline(max_e, color="gray", ls="--", lw=1, label=f"maximum log2|R| = {max_e:.1f}")
    ax.set_xticks([math.log2(r) + 1 if r > 0 else 0 for r in sorted(ticks)])
    ax.set_xticklabels([str(r) if r else "0\n(control)" for r in sorted(ticks)])
    ax.set_xlabel("times the canary was inserted")
    ax.set_ylabel("exposure (bits)")
    ax.set_ylim(0, max_e * 1.05)
    ax.set_title("canary exposure vs repetitions (dots: single canaries)")
    ax.legend(fontsize=8)
    return fig


def plot_histogram(res: ExposureResult) -> Any:
    """Distribution of Px over the candidate space (or the sample) with each canary marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    edges = np.array(res.histogram["edges"])
    ax.stairs(res.histogram["counts"], edges, fill=True, alpha=0.5, label="candidates" if res.method == "exact"
              else "sampled candidates")
    for c in res.canaries:
        ax.axvline(c["px_bits"], color="C3" if c["repeats"] else "C2", lw=1)
        ax.text(c["px_bits"], ax.get_ylim()[1] * 0.9, f" x{c['repeats']}", fontsize=7, rotation=90, va="top")
    ax.set_xlabel("log-perplexity Px (bits); lower = more likely")
    ax.set_ylabel("candidates")
    ax.set_title("where the canaries fall among all candidates")
    return fig
