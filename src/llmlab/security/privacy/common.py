"""What the privacy experiments share: the error type, the progress protocol (llmlab.progress), a run's
train/val splits, and batched per-token statistics of documents under a white-box model."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmlab.checkpoint import read_run_config
from llmlab.data import load_corpus, split_corpus
from llmlab.errors import LlmlabError
from llmlab.progress import Progress, Stage, quiet  # noqa: F401  (Stage, quiet: used from here by the labs)
from llmlab.security.targets import WhiteBox

# progress(event, info): the one protocol of llmlab.progress (stage_start/advance/stage_end, message; the
# trainer's start/log/eval/checkpoint/end are passed through). Kept here under its old names for callers.
Callback = Progress


class PrivacyError(LlmlabError):
    """A privacy experiment cannot run on this input; the message names the fix."""


def corpus_hash(docs: Sequence[str]) -> str:
    """The corpus hash written by llmlab.data.prepare: SHA-256 over the SHA-256 of every document."""
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()


@dataclass
class Splits:
    """The documents a run was trained on (members) and held out from (non-members)."""

    train: list[str]
    val: list[str]
    info: dict[str, Any]


def run_splits(run: str | Path, fix: str = "") -> Splits:
    """Rebuild a run's train and val splits from the "data" section of its config.json (source, hash,
    val_fraction), with load_corpus + split_corpus, and check the corpus hash still matches. `fix` is the
    caller's other way out, added to the error messages (e.g. "give --members FILE and --nonmembers FILE")."""
    run = Path(run)
    alt = f" or {fix}" if fix else ""
    try:
        cfg = read_run_config(run)
    except LlmlabError:
        cfg = {}  # a Hugging Face folder or a foreign config: no split recorded
    info = cfg.get("data")
    if not info or "source" not in info or "val_fraction" not in info:
        raise PrivacyError(f"{run} does not record its training split (no 'data' section in config.json); "
                           f"retrain it with `llmlab train`{',' if fix else ''}{alt}")
    src = info["source"]
    data = None if str(src).startswith("default:") else src
    train_cfg = cfg.get("train", {})
    if data is not None and not Path(data).exists():
        raise PrivacyError(f"{run} was trained on {data}, which no longer exists; restore the file{alt}")
    docs = load_corpus(data, train_cfg.get("text_field", "text"), train_cfg.get("encoding_errors", "strict"))
    if info.get("hash") and corpus_hash(docs) != info["hash"]:
        raise PrivacyError(f"the corpus {src} has changed since {run} was trained (hash mismatch); restore it{alt}")
    train, val = split_corpus(docs, float(info["val_fraction"]), info.get("split", "end"),
                              int(info.get("split_seed", 0)))
    return Splits(train, val, dict(info))


def sample_docs(docs: Sequence[str], n: int, seed: int) -> list[str]:
    """Up to n documents drawn without replacement (all of them, in order, when there are fewer)."""
    docs = list(docs)
    if n <= 0 or len(docs) <= n:
        return docs
    rng = random.Random(seed)
    idx = sorted(rng.sample(range(len(docs)), n))
    return [docs[i] for i in idx]


def chunk_docs(docs: Sequence[str], wb: WhiteBox, max_tokens: int, min_tokens: int = 8) -> list[list[int]]:
    """The documents' token ids cut into consecutive pieces of max_tokens (a last piece shorter than
    min_tokens is left out): the sequences membership inference scores."""
    out = []
    for d in docs:
        ids = wb.encode(d)
        for s in range(0, len(ids), max_tokens):
            piece = ids[s:s + max_tokens]
            if len(piece) >= min_tokens:
                out.append(piece)
    return out


@torch.no_grad()
def batch_logprobs(wb: WhiteBox, seqs: Sequence[Sequence[int]], batch_size: int = 16,
                   stats: bool = False, stage: Stage | None = None) -> list[dict[str, torch.Tensor]]:
    """For each token sequence (cut to the context), l_t = log p(x_t | x_<t) for t = 1..n-1, and with
    stats=True also mu_t and sigma_t of log p(. | x_<t) over the vocabulary (WhiteBox.batch_token_stats,
    as Min-K%++ needs). Sequences are sorted by length and scored in padded batches."""
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))
    out: list[dict[str, torch.Tensor]] = [{} for _ in seqs]
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        group = [list(seqs[i])[: wb.block_size + 1] for i in idx]
        if stats:
            res = wb.batch_token_stats(group)
        else:
            T = max(len(s) for s in group) - 1
            ids = torch.zeros(len(group), T, dtype=torch.long)
            for j, s in enumerate(group):
                ids[j, : len(s) - 1] = torch.tensor(s[:-1])
            lg = wb.logits(ids)
            logp = F.log_softmax(lg if lg.dtype == torch.float64 else lg.float(), -1)  # (B, T, V)
            res = []
            for j, s in enumerate(group):
                n = len(s) - 1
                res.append({"logp": logp[j, torch.arange(n), torch.tensor(s[1:])]})
        for i, r in zip(idx, res):
            out[i] = r
        if stage is not None:
            stage.advance(len(idx))
    return out


def mean_nll(lp: torch.Tensor) -> float:
    """L(x) = -mean_t l_t (nats per token)."""
    return float(-lp.double().mean()) if lp.numel() else float("nan")
