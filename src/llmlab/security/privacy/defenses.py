"""Defences against memorisation, measured by the same attacks:

- training-data deduplication (Lee et al. 2022, "Deduplicating Training Data Makes Language Models
  Better"): exact duplicates (whole documents, and repeated lines, a line-level form of ExactSubstr) and
  near-duplicate documents by MinHash over word n-grams (Broder 1997) with LSH banding;
- differentially private training with DP-SGD (Abadi et al. 2016) through Opacus: per-example gradients
  clipped to norm C, Gaussian noise N(0, sigma^2 C^2) added to their sum, privacy spent tracked by an
  RDP accountant and reported as (epsilon, delta);
- compare: exposure of the canaries, membership-inference AUC and validation loss of a baseline run and
  a defended run, side by side.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import time
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...checkpoint import save_run_model
from ...data import DEFAULT_SOURCE, BatchSampler, prepare
from ...errors import ConfigError
from ...models import build_model
from ...train import RunConfig, lm_loss, lr_at, make_optimizer
from .common import Callback, PrivacyError, Stage, quiet

# ----------------------------------------------------------------------------- deduplication

MERSENNE = np.uint64(4294967311)  # a prime just above 2^32


def _shingles(doc: str, n: int) -> np.ndarray:
    """32-bit hashes (CRC-32) of the document's word n-grams (of the whole text when shorter)."""
    words = re.findall(r"\S+", doc.lower())
    grams = [" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))]
    return np.unique(np.array([zlib.crc32(g.encode()) for g in grams], dtype=np.uint64))


def minhash_signatures(docs: Sequence[str], n: int = 5, num_perm: int = 128, seed: int = 0) -> np.ndarray:
    """MinHash signatures (D, num_perm): sig_i(A) = min_{s in A} (a_i h(s) + b_i) mod p over the word
    n-gram shingles A of each document (Broder 1997); Pr[sig_i(A) = sig_i(B)] = Jaccard(A, B)."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**32 - 1, num_perm, dtype=np.uint64)
    b = rng.integers(0, 2**32 - 1, num_perm, dtype=np.uint64)
    sigs = np.empty((len(docs), num_perm), dtype=np.uint64)
    for i, d in enumerate(docs):
        h = _shingles(d, n)  # (S,)
        sigs[i] = ((h[:, None] * a[None, :] + b[None, :]) % MERSENNE).min(axis=0)  # no overflow: h, a, b < 2^32
    return sigs


def near_duplicates(docs: Sequence[str], threshold: float = 0.8, n: int = 5, num_perm: int = 128,
                    bands: int = 32) -> list[tuple[int, int, float]]:
    """Pairs (earlier, later, estimated Jaccard) of near-duplicate documents: candidates from LSH (bands of
    num_perm/bands rows; a pair collides in some band with probability 1 - (1 - J^r)^b), kept when the
    fraction of equal MinHash values reaches `threshold`."""
    if num_perm % bands:
        raise ConfigError(f"num_perm {num_perm} is not divisible by bands {bands}")
    sigs = minhash_signatures(docs, n, num_perm)
    r = num_perm // bands
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = {}
        for i in range(len(docs)):
            buckets.setdefault(sigs[i, band * r:(band + 1) * r].tobytes(), []).append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    pairs.add((members[x], members[y]))
    out = []
    for i, j in sorted(pairs):
        jac = float((sigs[i] == sigs[j]).mean())
        if jac >= threshold:
            out.append((i, j, jac))
    return out


def dedup_docs(docs: Sequence[str], mode: str = "both", min_line_chars: int = 8, threshold: float = 0.8,
               ngram: int = 5, num_perm: int = 128, callback: Callback | None = None
               ) -> tuple[list[str], dict[str, Any]]:
    """Deduplicated documents and what was removed. mode exact: drop documents identical to an earlier
    one, then every repeat of a line (stripped, at least min_line_chars long) after its first occurrence
    in the corpus; mode near: drop documents whose estimated Jaccard similarity with an earlier kept one
    is at least `threshold`; both: exact then near. The number of documents never changes (a removed
    document is left empty and dropped by split_corpus), so pass train documents only."""
    if mode not in ("exact", "near", "both"):
        raise PrivacyError(f"--mode {mode!r} is not one of exact, near, both")
    docs = list(docs)
    info: dict[str, Any] = {"mode": mode, "docs_in": len(docs), "chars_in": sum(map(len, docs))}
    with Stage(callback, "dedup", len(docs) * (2 if mode == "both" else 1)) as st:
        if mode in ("exact", "both"):
            seen_docs: set[str] = set()
            seen_lines: dict[str, int] = {}
            removed_docs, removed_lines = 0, 0
            repeats: dict[str, int] = {}
            for i, d in enumerate(docs):
                if d in seen_docs and d:
                    docs[i] = ""
                    removed_docs += 1
                    st.advance()
                    continue
                seen_docs.add(d)
                kept = []
                for line in d.split("\n"):
                    key = line.strip()
                    if len(key) >= min_line_chars and key in seen_lines:
                        removed_lines += 1
                        repeats[key] = repeats.get(key, 1) + 1
                        continue
                    if len(key) >= min_line_chars:
                        seen_lines[key] = i
                    kept.append(line)
                docs[i] = "\n".join(kept)
                st.advance()
            top = sorted(repeats.items(), key=lambda kv: -kv[1])[:10]
            info.update(exact_docs_removed=removed_docs, repeated_lines_removed=removed_lines,
                        most_repeated_lines=[{"line": k, "copies": v} for k, v in top])
        if mode in ("near", "both"):
            live = [i for i, d in enumerate(docs) if d.strip()]
            pairs = near_duplicates([docs[i] for i in live], threshold, ngram, num_perm)
            dropped: set[int] = set()
            for a, b, _ in pairs:
                if live[a] not in dropped:
                    dropped.add(live[b])
            for i in dropped:
                docs[i] = ""
            st.advance(len(docs))
            info.update(near_docs_removed=len(dropped), near_pairs=len(pairs), threshold=threshold, ngram=ngram,
                        num_perm=num_perm)
    info["chars_out"] = sum(map(len, docs))
    info["chars_removed_fraction"] = 1 - info["chars_out"] / max(1, info["chars_in"])
    return docs, info


# ----------------------------------------------------------------------------- DP-SGD


@dataclass
class DPConfig:
    """DP-SGD settings. target_epsilon > 0 picks the noise multiplier that spends exactly that budget over
    the run's max_iters steps; otherwise noise_multiplier is used and the epsilon spent is reported."""

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    target_epsilon: float = 0.0
    accountant: str = "rdp"


@dataclass
class DPResult:
    run: Path
    step: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    elapsed: float
    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    examples: int


class _Positions(torch.nn.Module):
    """Calls the GPT with explicit (B, T) position ids, so every module input has the batch first (Opacus
    computes per-example gradients from the first dimension)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.size(1), device=x.device).expand(x.size(0), -1)  # (B, T)
        return self.model(x, position_ids=pos)


def train_dp(cfg: RunConfig, run: str | Path, dp: DPConfig, callback: Callback | None = None) -> DPResult:
    """Train the run's GPT on its language-modelling data with DP-SGD (Abadi et al. 2016) via Opacus.

    Each training example is one non-overlapping window of block_size + 1 tokens of the train split;
    batches are Poisson samples with rate q = batch_size / N. Per step, every example's gradient g_i is
    clipped to g_i / max(1, ||g_i|| / C) and the update uses (sum_i clipped g_i + N(0, sigma^2 C^2 I)) / B.
    The run folder matches `llmlab train`'s (config.json with its "data" section, model.safetensors with
    the best weights by validation loss, tokenizer/, metrics.jsonl, loss.png), plus a "dp" section."""
    from opacus import PrivacyEngine
    from opacus.accountants.utils import get_noise_multiplier

    from ...viz import loss_curves

    emit = callback or quiet
    t = cfg.train
    run = Path(run)
    if cfg.model.arch != "gpt":
        raise PrivacyError("DP training here is for decoder-only GPT runs; use --arch gpt")
    if dp.max_grad_norm <= 0 or dp.delta <= 0 or dp.delta >= 1:
        raise PrivacyError("DP-SGD needs --max-grad-norm > 0 and 0 < --delta < 1")
    if cfg.model.dropout:
        cfg = dataclasses.replace(cfg, model=cfg.model.replace(dropout=0.0))
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    corpus = prepare(t.data, t.tokenizer, t.vocab_size, t.val_fraction, t.text_field, t.encoding_errors)
    tok = corpus.tokenizer
    pad = tok.pad_id
    mcfg = cfg.model.replace(vocab_size=tok.vocab_size, **({"pad_token_id": pad} if pad is not None else {}))
    block = mcfg.block_size
    ids = np.asarray(corpus.train, dtype=np.int64)
    n_ex = (len(ids) - 1) // block
    if n_ex < 2:
        raise PrivacyError(f"the train split has {len(ids)} tokens, too few for DP examples of {block + 1} tokens; "
                           "give more text or a smaller --block-size")
    examples = torch.from_numpy(np.stack([ids[i * block:i * block + block + 1] for i in range(n_ex)]))  # (N, T+1)
    sample_rate = min(1.0, t.batch_size / n_ex)
    sigma = dp.noise_multiplier
    if dp.target_epsilon > 0:
        sigma = get_noise_multiplier(target_epsilon=dp.target_epsilon, target_delta=dp.delta,
                                     sample_rate=sample_rate, steps=t.max_iters, accountant=dp.accountant)
    if sigma <= 0:
        raise PrivacyError("--noise-multiplier must be positive (0 gives no privacy); or set --target-epsilon")
    model = build_model(mcfg)
    wrapped = _Positions(model)
    opt = make_optimizer(wrapped, t)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(examples), batch_size=t.batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' note that secure RNG is off (fine for experiments)
        engine = PrivacyEngine(accountant=dp.accountant)
        gsm, dp_opt, dp_loader = engine.make_private(module=wrapped, optimizer=opt, data_loader=loader,
                                                     noise_multiplier=sigma, max_grad_norm=dp.max_grad_norm,
                                                     poisson_sampling=True)
    run.mkdir(parents=True, exist_ok=True)
    data_info = {"source": t.data or DEFAULT_SOURCE, "hash": corpus.data_hash,
                 "val_fraction": t.val_fraction, "train_docs": corpus.n_train_docs, "val_docs": corpus.n_val_docs,
                 "train_tokens": int(len(corpus.train)), "val_tokens": int(len(corpus.val))}
    metrics = run / "metrics.jsonl"
    metrics.write_text("")
    emit("start", {"run": str(run), "step": 0, "max_iters": t.max_iters, "task": "lm (DP-SGD)",
                   "params": sum(p.numel() for p in model.parameters()), "data": data_info})

    def evaluate() -> dict[str, float]:
        model.eval()
        out = {}
        with torch.no_grad():
            for split, arr in (("train", corpus.train), ("val", corpus.val)):
                if len(arr) <= block + 1:
                    out[split] = float("nan")
                    continue
                s = BatchSampler(arr, block, t.batch_size, t.seed + 7)
                out[split] = sum(lm_loss(model, *s.next()).item() for _ in range(t.eval_iters)) / t.eval_iters
        model.train()
        return out

    def log(row: dict[str, Any]) -> None:
        with open(metrics, "a") as f:
            f.write(json.dumps(row) + "\n")

    best_val, best_state = float("inf"), None
    step, loss_v, t0 = 0, float("nan"), time.perf_counter()
    window_t, window_tokens = t0, 0
    ev: dict[str, float] = {}
    model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Opacus' notes on secure RNG and backward hooks
        while step < t.max_iters:
            for (batch,) in dp_loader:
                if step >= t.max_iters:
                    break
                for g in dp_opt.param_groups:
                    g["lr"] = lr_at(step, t)
                if batch.numel() == 0:  # an empty Poisson sample still counts as a step
                    dp_opt.zero_grad(set_to_none=True)
                    step += 1
                    continue
                x, y = batch[:, :-1], batch[:, 1:]
                loss = lm_loss(gsm, x, y)
                loss.backward()
                dp_opt.step()
                dp_opt.zero_grad(set_to_none=True)
                loss_v = loss.item()
                step += 1
                window_tokens += x.numel()
                if step % t.log_interval == 0 or step == t.max_iters:
                    now = time.perf_counter()
                    row = {"kind": "train", "step": step, "loss": round(loss_v, 5), "lr": lr_at(step - 1, t),
                           "tokens_per_s": round(window_tokens / max(1e-9, now - window_t), 1),
                           "elapsed": round(now - t0, 3)}
                    window_t, window_tokens = now, 0
                    log(row)
                    emit("log", {**row, "max_iters": t.max_iters})
                if step % t.eval_interval == 0 or step == t.max_iters:
                    ev = evaluate()
                    eps = engine.get_epsilon(dp.delta)
                    row = {"kind": "eval", "step": step, "train_loss": ev["train"], "val_loss": ev["val"],
                           "epsilon": eps, "elapsed": round(time.perf_counter() - t0, 3)}
                    log(row)
                    if ev["val"] < best_val:
                        best_val = ev["val"]
                        best_state = copy.deepcopy(model.state_dict())
                    emit("eval", {**row, "best_val_loss": best_val})
    elapsed = time.perf_counter() - t0
    epsilon = float(engine.get_epsilon(dp.delta))
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    dp_info = {"epsilon": epsilon, "delta": dp.delta, "noise_multiplier": sigma, "max_grad_norm": dp.max_grad_norm,
               "sample_rate": sample_rate, "examples": n_ex, "steps": step, "accountant": dp.accountant,
               "unit": f"one window of {block + 1} tokens"}
    final_cfg = dataclasses.replace(cfg, model=mcfg)
    save_run_model(run, model, tok, extra_config={"llmlab": {"format_version": 1, "kind": "run"},
                                                  "preset": final_cfg.preset, "train": dataclasses.asdict(t),
                                                  "data": data_info, "dp": dp_info})
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    loss_curves([(r["step"], r["loss"]) for r in rows if r["kind"] == "train"],
                [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"], run / "loss.png",
                title=f"{run.name}: DP-SGD loss (epsilon {epsilon:.2f})")
    res = DPResult(run, step, ev.get("train", float("nan")), ev.get("val", float("nan")), best_val, elapsed,
                   epsilon, dp.delta, sigma, dp.max_grad_norm, sample_rate, n_ex)
    emit("end", {**dataclasses.asdict(res), "run": str(run)})
    return res


# ----------------------------------------------------------------------------- compare


@dataclass
class CompareResult:
    baseline: dict[str, Any]
    defended: dict[str, Any]
    exposure: list[dict[str, Any]] = field(default_factory=list)
    mia: list[dict[str, Any]] = field(default_factory=list)
    val_loss: dict[str, float] = field(default_factory=dict)
    exposures: dict[str, Any] = field(default_factory=dict)
    attacks: dict[str, Any] = field(default_factory=dict)


def val_loss_of(wb: Any, docs: Sequence[str]) -> float:
    """Mean token loss (nats) of a model on documents (scored in windows of its context)."""
    from ...evaluate import perplexity

    return float(perplexity(wb.model, list(docs))["loss"])


def compare_runs(baseline: str | Path, defended: str | Path, canaries_file: str | Path | None = None,
                 mia_config: Any = None, estimate: bool = False, callback: Callback | None = None) -> CompareResult:
    """Re-run the canary exposure and the membership-inference attacks on a baseline and a defended run;
    report exposure before/after per canary, AUC before/after per attack, and the validation-loss cost
    (both measured on the baseline's validation split)."""
    from ...checkpoint import read_run_config
    from ..targets import WhiteBox
    from .canary import find_canaries, load_canaries, measure_exposure
    from .common import run_splits
    from .mia import MIAConfig, run_mia

    cb = callback or quiet
    runs = {"baseline": Path(baseline), "defended": Path(defended)}
    for k, p in runs.items():  # an experiment folder stands for its run
        if (p / "run" / "config.json").is_file():
            runs[k] = p / "run"
    cfile = Path(canaries_file) if canaries_file else (find_canaries(runs["baseline"])
                                                       or find_canaries(runs["defended"]))
    canaries = load_canaries(cfile) if cfile else None
    base_splits = run_splits(runs["baseline"])
    res = CompareResult({}, {})
    mcfg = mia_config or MIAConfig()
    for label, path in runs.items():
        wb = WhiteBox.load(path)
        splits = run_splits(path)
        info: dict[str, Any] = {"run": str(path), "dp": read_run_config(path).get("dp")}
        if canaries is not None:
            cb("warning", {"text": f"{label}: canary exposure"})
            exp = measure_exposure(wb, canaries[0], canaries[1], estimate=estimate, callback=cb)
            res.exposures[label] = exp
        cb("warning", {"text": f"{label}: membership inference"})
        mr = run_mia(wb, splits.train, splits.val, mcfg, callback=cb)
        res.attacks[label] = mr
        with Stage(cb, f"{label}: val loss", 1) as st:
            info["val_loss"] = val_loss_of(wb, base_splits.val)
            st.advance()
        info["train_docs"] = len([d for d in splits.train if d])
        (res.baseline if label == "baseline" else res.defended).update(info)
    if canaries is not None:
        b, d = res.exposures["baseline"].canaries, res.exposures["defended"].canaries
        for cb_, cd in zip(b, d):
            res.exposure.append({"secret": cb_["secret"], "repeats": cb_["repeats"], "before": cb_["exposure"],
                                 "after": cd["exposure"], "change": cd["exposure"] - cb_["exposure"]})
    for name in res.attacks["baseline"].attacks:
        before = res.attacks["baseline"].attacks[name]
        after = res.attacks["defended"].attacks.get(name)
        if after is None:
            continue
        res.mia.append({"attack": name, "auc_before": before["auc"], "auc_after": after["auc"],
                        "tpr@1%_before": before["tpr_at_1pct"], "tpr@1%_after": after["tpr_at_1pct"]})
    vb, vd = res.baseline["val_loss"], res.defended["val_loss"]
    res.val_loss = {"before": vb, "after": vd, "cost": vd - vb, "cost_ppl_ratio": math.exp(vd - vb)}
    return res
