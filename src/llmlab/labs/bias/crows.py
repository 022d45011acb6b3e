"""CrowS-Pairs (Nangia, Vania, Bhalerao, Bowman, "CrowS-Pairs: A Challenge Dataset for Measuring Social
Biases in Masked Language Models", EMNLP 2020): minimal pairs of a more and a less stereotyping sentence,
scored by the model's likelihood.

Masked LMs (llmlab BERT runs), the paper's score: align the two token sequences with difflib and keep the
shared ("equal") tokens U; the modified tokens M differ. Then

    score(S) = sum_{u in U} log P_MLM(u | U \\ {u}, M)       (mask one shared token at a time)

Causal LMs (llmlab GPTs, GPT-2/Llama folders, SmolLM2), lm-eval-harness's crows_pairs: the sentence
log-likelihood after the tokenizer's BOS (or end-of-text) token,

    LL(S) = sum_t log p(x_t | x_<t)                          (scoring "sentence"; the tokens the two
                                                              sentences share at the start are scored once)

or, to mirror the masked design, the same sum over the shared tokens only (scoring "shared").

    metric = share of pairs with score(sent_more) > score(sent_less)     (ideal 0.5)
    likelihood_diff = mean |score(sent_more) - score(sent_less)|

The rate has its exact (Clopper-Pearson) interval, as every rate in llmlab, and a bootstrap interval
beside it; per bias type and per direction (stereo / antistereo) as well. The token-count control is what
a score that only tracked length would give: the share of pairs whose sent_more has fewer tokens (ties
count a half). Data: the published CSV (sent_more, sent_less, stereo_antistereo, bias_type); the data set
is CC BY-SA 4.0 and is read from the user's file, never shipped."""

from __future__ import annotations

import csv
import difflib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.labs.bias.scoring import (
    BATCH_TOKENS,
    BiasError,
    arch_of,
    continuation_logprobs,
    masked_logprobs,
    masked_logprobs_loop,
    require_causal,
    require_mlm,
    score_prefix,
    sequence_logprobs,
    sequence_logprobs_loop,
)
from llmlab.progress import Progress, Stage, message
from llmlab.stats import bootstrap_ci, rate_ci

COLUMNS = ("sent_more", "sent_less", "stereo_antistereo", "bias_type")
SCORINGS = ("auto", "sentence", "shared", "pll")


@dataclass(frozen=True)
class Pair:
    sent_more: str
    sent_less: str
    direction: str  # stereo | antistereo
    bias_type: str
    row: int = 0


def read_pairs(path: str | Path, limit: int = 0, bias_types: Sequence[str] = ()) -> list[Pair]:
    """Pairs from a CSV in the published CrowS-Pairs format (extra columns are ignored)."""
    p = Path(path)
    if not p.is_file():
        raise BiasError(f"{p}: no such file; give a CSV with columns {', '.join(COLUMNS)} (e.g. "
                        "crows_pairs_anonymized.csv)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BiasError(f"{p} is not UTF-8 text; convert it to UTF-8") from None
    reader = csv.DictReader(text.splitlines())
    cols = reader.fieldnames or []
    missing = [c for c in COLUMNS if c not in cols]
    if missing:
        raise BiasError(f"{p} has no column {missing[0]!r} (columns: {', '.join(c for c in cols if c) or 'none'}); "
                        f"a CrowS-Pairs CSV needs {', '.join(COLUMNS)}")
    pairs = []
    for n, row in enumerate(reader, 2):
        if any(row.get(c) is None for c in COLUMNS):
            raise BiasError(f"{p}:{n} has fewer fields than the header; fix that row")
        more, less = row["sent_more"].strip(), row["sent_less"].strip()
        if not more or not less:
            raise BiasError(f"{p}:{n}: sent_more and sent_less must both hold a sentence")
        direction = row["stereo_antistereo"].strip()
        if direction not in ("stereo", "antistereo"):
            raise BiasError(f"{p}:{n}: stereo_antistereo is {direction!r}; it must be stereo or antistereo")
        pairs.append(Pair(more, less, direction, row["bias_type"].strip() or "unknown", n))
    if bias_types:
        pairs = [q for q in pairs if q.bias_type in set(bias_types)]
    if limit:
        pairs = pairs[:limit]
    if not pairs:
        raise BiasError(f"{p} holds no pairs{' of the chosen bias types' if bias_types else ''}")
    return pairs


def swap(pairs: Sequence[Pair]) -> list[Pair]:
    """The pairs with sent_more and sent_less exchanged (the metric of a model becomes 1 - metric)."""
    return [Pair(q.sent_less, q.sent_more, q.direction, q.bias_type, q.row) for q in pairs]


def shared_positions(a: Sequence[int], b: Sequence[int]) -> tuple[list[int], list[int]]:
    """Indices of the tokens of a and of b in the spans difflib finds equal (the unmodified tokens U)."""
    ua, ub = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, list(a), list(b), autojunk=False).get_opcodes():
        if op == "equal":
            ua += range(i1, i2)
            ub += range(j1, j2)
    return ua, ub


def mlm_frame(tok) -> tuple[list[int], list[int]]:  # noqa: ANN001
    """The special tokens a sentence is wrapped in for a masked LM: [CLS] ... [SEP] for WordPiece (BERT,
    MiniLM), else llmlab's separator on both sides (how its MLM training sees a document), else none."""
    if tok.kind == "wordpiece" and tok.cls_id is not None and tok.sep_id is not None:
        return [tok.cls_id], [tok.sep_id]
    if tok.sep_id is not None:
        return [tok.sep_id], [tok.sep_id]
    return [], []


def resolve_scoring(model: torch.nn.Module, scoring: str, name: str = "the model") -> str:
    """auto -> pll for masked LMs, sentence for causal LMs; check the model can give the asked score."""
    if scoring not in SCORINGS:
        raise BiasError(f"scoring {scoring!r} is not one of {', '.join(SCORINGS)}")
    if scoring == "auto":
        scoring = "pll" if arch_of(model) == "bert" else "sentence"
    if scoring == "pll":
        require_mlm(model, "CrowS-Pairs pseudo-log-likelihood", name)
    else:
        require_causal(model, f"CrowS-Pairs {scoring} log-likelihood", name)
    return scoring


def sentence_scores_shared_prefix(model: torch.nn.Module, seq_a: Sequence[Sequence[int]],
                                  seq_b: Sequence[Sequence[int]], batch_tokens: int = BATCH_TOKENS,
                                  advance: Any = None) -> np.ndarray:
    """LL(a), LL(b) of each pair of token sequences (interleaved: a1, b1, a2, b2, ...), the tokens the two
    share at the start scored once: LL(S) = LL(shared prefix) + LL(rest of S | prefix). The same numbers as
    scoring both sentences whole; pairs with nothing in common at the start are scored whole."""
    ctx, choices, whole = [], [], []
    block = model.config.block_size
    for i, (a, b) in enumerate(zip(seq_a, seq_b)):
        if max(len(a), len(b)) > block:  # longer than the context: scored whole (cut, as the loop does)
            whole.append(i)
            continue
        c = 0
        while c < min(len(a), len(b)) - 1 and a[c] == b[c]:
            c += 1
        if c == 0:
            whole.append(i)
        else:
            ctx.append((i, list(a[:c])))
            choices.append([list(a[c:]), list(b[c:])])
    scores = np.zeros(2 * len(seq_a))
    step = (lambda n: advance(2 * n)) if advance is not None else None  # two sentences per pair
    if ctx:
        lls = continuation_logprobs(model, [c for _, c in ctx], choices, batch_tokens, step, score_context=True)
        for (i, _), (la, lb) in zip(ctx, lls):
            scores[2 * i], scores[2 * i + 1] = la, lb
    if whole:
        lps = sequence_logprobs(model, [s for i in whole for s in (seq_a[i], seq_b[i])], batch_tokens, advance)
        for k, i in enumerate(whole):
            scores[2 * i], scores[2 * i + 1] = float(lps[2 * k].double().sum()), float(lps[2 * k + 1].double().sum())
    return scores


def score_pairs(model: torch.nn.Module, pairs: Sequence[Pair], scoring: str = "auto",
                batch_tokens: int = BATCH_TOKENS, batched: bool = True, stage: Stage | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(score of sent_more, score of sent_less, token-count difference len(more) - len(less)) per pair;
    `stage` is advanced once per sentence scored."""
    scoring = resolve_scoring(model, scoring)
    tok = model.tokenizer
    enc = [(tok.encode(q.sent_more), tok.encode(q.sent_less)) for q in pairs]
    for i, (a, b) in enumerate(enc):
        if not a or not b:
            raise BiasError(f"pair {i + 1} has a sentence with no tokens")
    shared = [shared_positions(a, b) for a, b in enc]
    half = stage.advance if stage is not None else None  # the stage counts sentences, two per pair
    if scoring == "pll":
        left, right = mlm_frame(tok)
        seqs, positions = [], []
        for (a, b), (ua, ub) in zip(enc, shared):
            for s, u in ((a, ua), (b, ub)):
                seqs.append(left + list(s) + right)
                positions.append([len(left) + i for i in u])
        fn = masked_logprobs if batched else masked_logprobs_loop
        lps = fn(model, seqs, positions, batch_tokens, half) if batched else fn(model, seqs, positions, half)
        scores = np.array([float(lp.double().sum()) for lp in lps])
    elif scoring == "sentence" and batched:
        scores = sentence_scores_shared_prefix(model, [score_prefix(tok) + list(a) for a, _ in enc],
                                               [score_prefix(tok) + list(b) for _, b in enc], batch_tokens, half)
    else:
        pre = score_prefix(tok)
        seqs = [pre + list(s) for ab in enc for s in ab]
        lps = (sequence_logprobs(model, seqs, batch_tokens, half) if batched
               else sequence_logprobs_loop(model, seqs, half))
        scores = np.empty(len(seqs))
        for j, lp in enumerate(lps):
            if scoring == "sentence":
                scores[j] = float(lp.double().sum())
            else:  # shared: l_t for sentence token i sits at index len(pre) + i - 1 of lp
                keep = [len(pre) + i - 1 for i in shared[j // 2][j % 2] if len(pre) + i - 1 >= 0]
                scores[j] = float(lp.double()[keep].sum()) if keep else 0.0
    more, less = scores[0::2], scores[1::2]
    dlen = np.array([len(a) - len(b) for a, b in enc])
    return more, less, dlen


@dataclass
class CrowsConfig:
    """The data file and how its pairs are scored."""

    data: str = ""  # the CrowS-Pairs CSV (required)
    scoring: str = "auto"  # auto | pll (masked LMs) | sentence | shared (causal LMs)
    limit: int = 0  # score the first N pairs (0 = all)
    bias_types: tuple[str, ...] = ()  # () = all
    batch_tokens: int = BATCH_TOKENS
    batched: bool = True  # False: one sentence (or masked copy) per forward pass
    n_boot: int = 2000
    seed: int = 0
    examples: int = 5


def rate_entry(wins: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """{metric, k, n, ci (exact), bootstrap_ci} of a 0/1 outcome vector."""
    k, n = int(wins.sum()), int(wins.size)
    ci = rate_ci(k, n)
    return {"metric": k / n if n else None, "k": k, "n": n, "ci": [ci.lo, ci.hi] if n else None,
            "bootstrap_ci": list(bootstrap_ci(wins.astype(float), n_boot=n_boot, seed=seed)) if n else None}


@dataclass
class CrowsResult:
    model: str
    config: CrowsConfig
    scoring: str
    n: int
    metric: float
    ci: tuple[float, float]
    bootstrap_ci: tuple[float, float]
    likelihood_diff: float
    per_category: dict[str, dict[str, Any]]
    per_direction: dict[str, dict[str, Any]]
    token_count_control: float
    truncated: int  # pairs with a sentence longer than the model's context (scored on its first tokens)
    seconds: float
    items_per_s: float
    examples: list[dict[str, Any]] = field(default_factory=list)


def summarise(pairs: Sequence[Pair], more: np.ndarray, less: np.ndarray, dlen: np.ndarray, config: CrowsConfig,
              scoring: str, model: str = "model", seconds: float = 0.0, truncated: int = 0) -> CrowsResult:
    """The metric, its intervals and breakdowns from per-pair scores."""
    wins = (more > less).astype(int)
    overall = rate_entry(wins, config.n_boot, config.seed)
    cats = sorted({q.bias_type for q in pairs})
    per_cat = {c: rate_entry(wins[[i for i, q in enumerate(pairs) if q.bias_type == c]], config.n_boot, config.seed)
               for c in cats}
    per_dir = {d: rate_entry(wins[[i for i, q in enumerate(pairs) if q.direction == d]], config.n_boot, config.seed)
               for d in ("stereo", "antistereo") if any(q.direction == d for q in pairs)}
    control = float(np.mean(np.where(dlen < 0, 1.0, np.where(dlen == 0, 0.5, 0.0))))
    diff = more - less
    order = np.argsort(-np.abs(diff))
    examples = [{"row": pairs[i].row, "bias_type": pairs[i].bias_type, "direction": pairs[i].direction,
                 "sent_more": pairs[i].sent_more, "sent_less": pairs[i].sent_less,
                 "score_more": float(more[i]), "score_less": float(less[i]), "stereotype_preferred": bool(wins[i])}
                for i in order[: config.examples]]
    return CrowsResult(model, config, scoring, len(pairs), overall["metric"], tuple(overall["ci"]),
                       tuple(overall["bootstrap_ci"]), float(np.abs(diff).mean()), per_cat, per_dir, control, truncated,
                       seconds, len(pairs) / seconds if seconds > 0 else float("nan"), examples)


def run(config: CrowsConfig, model: torch.nn.Module, progress: Progress | None = None,
        name: str = "model") -> CrowsResult:
    """Score every pair of config.data with the model and summarise."""
    if not config.data:
        raise BiasError("give the CrowS-Pairs CSV file (columns sent_more, sent_less, stereo_antistereo, "
                        "bias_type)")
    scoring = resolve_scoring(model, config.scoring, name)
    pairs = read_pairs(config.data, config.limit, config.bias_types)
    tok, block = model.tokenizer, model.config.block_size
    room = block - (len(mlm_frame(tok)[0]) * 2 if scoring == "pll" else len(score_prefix(tok)) - 1)
    truncated = sum(max(len(tok.encode(q.sent_more)), len(tok.encode(q.sent_less))) > room for q in pairs)
    if truncated and scoring == "pll":
        raise BiasError(f"{truncated} pairs have a sentence longer than the model's context of {block} tokens; "
                        "a masked LM needs the whole sentence: use a model with a longer context or drop them")
    if truncated:
        message(progress, f"{truncated} pairs have a sentence longer than the model's context of {block} tokens; "
                "they are scored on their first tokens", "warning")
    t0 = time.perf_counter()
    with Stage(progress, f"score {len(pairs)} pairs ({scoring}, sentences)", 2 * len(pairs)) as st:
        more, less, dlen = score_pairs(model, pairs, scoring, config.batch_tokens, config.batched, st)
    return summarise(pairs, more, less, dlen, config, scoring, name, time.perf_counter() - t0, truncated)
