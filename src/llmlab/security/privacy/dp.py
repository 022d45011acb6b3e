"""DP-SGD (Abadi et al. 2016) through Opacus, as a hook on the one training loop."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.checkpoint import save_run_model
from llmlab.data import DEFAULT_SOURCE, BatchSampler, prepare
from llmlab.inspect.viz import loss_curves
from llmlab.models import build_model
from llmlab.security.privacy.common import Callback, PrivacyError, quiet
from llmlab.train.config import RunConfig
from llmlab.train.lm import lm_loss
from llmlab.train.loop import lr_at, make_optimizer


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
