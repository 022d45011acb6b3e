"""The one training loop: AdamW, warmup + cosine, clipping, accumulation, bf16, compile, evaluation,
resumable checkpoints, and DistributedDataParallel under torchrun. Every objective runs through it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from llmlab.checkpoint import (
    CONFIG_FILE,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    atomic_save_tensors,
    atomic_write_bytes,
    atomic_write_json,
    load_weights_into,
    read_run_config,
    unique_state_dict,
    write_manifest,
)
from llmlab.config import ModelConfig
from llmlab.errors import ConfigError, ModelLoadError
from llmlab.inspect.viz import loss_curves
from llmlab.models import build_model
from llmlab.runtime import keep_freed_memory, resolve_dtype
from llmlab.train.config import DEFAULT_PRESET, RunConfig, TrainConfig
from llmlab.train.objective import Callback, Objective, setup_distributed
from llmlab.train.registry import make_objective


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to lr over warmup_iters, then cosine decay to min_lr at lr_decay_iters."""
    decay = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if step >= decay:
        return t.min_lr
    ratio = (step - t.warmup_iters) / max(1, decay - t.warmup_iters)
    return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (t.lr - t.min_lr)


def make_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (dim >= 2) only; biases, norms and gains are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # the fused kernel is several times faster than the per-tensor loop, on CPU too
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), foreach=True)


def _ckpt_dirs(run: Path) -> list[Path]:
    d = run / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                    rng: dict[str, torch.Tensor], keep: int) -> Path:
    """Write checkpoints/step-N/ (weights, optimizer, RNG, JSON state) atomically; keep the last `keep`."""
    final = run / "checkpoints" / f"step-{state['step']:07d}"
    tmp = run / "checkpoints" / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    atomic_save_tensors(unique_state_dict(model), tmp / WEIGHTS_FILE)
    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": v for i, s in sd["state"].items() for k, v in s.items()}
    tensors.update({f"rng.{k}": v for k, v in rng.items()})
    atomic_save_tensors(tensors, tmp / "optimizer.safetensors")
    atomic_write_json(tmp / "state.json", {**state, "param_groups": sd["param_groups"]})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in _ckpt_dirs(run)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore weights and optimizer from a checkpoint folder; return its JSON state and RNG tensors."""
    load_weights_into(model, ckpt / WEIGHTS_FILE)
    try:
        state = json.loads((ckpt / "state.json").read_text())
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"checkpoint {ckpt} is truncated or corrupt ({type(e).__name__}); delete it to "
                             "resume from the one before") from None
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    rng = {}
    for k, v in tensors.items():
        if k.startswith("rng."):
            rng[k[4:]] = v
        else:
            _, i, name = k.split(".", 2)
            opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state.pop("param_groups")})
    return state, rng


@dataclass
class TrainResult:
    run: Path
    step: int
    train_loss: float
    val_loss: float
    best_val_loss: float
    elapsed: float
    tokens_per_s: float
    stopped_by: str  # max_iters | max_time
    samples: list[str] = field(default_factory=list)


def _truncate_metrics(path: Path, step: int) -> None:
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


def _metrics_append(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def train(cfg: RunConfig, run: str | Path, resume: bool = False, callback: Callback | None = None) -> TrainResult:
    """Train cfg.model with its objective into the run folder; resume from its last checkpoint if asked.
    Progress is reported through callback(event, info) with events start, log, eval, checkpoint, end."""
    t = cfg.train
    run = Path(run)
    keep_freed_memory()
    dist = setup_distributed()
    emit = callback if (callback and dist.main) else (lambda e, i: None)
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    if (t.batch_size // t.grad_accum) % dist.world:
        raise ConfigError(f"micro-batch {t.batch_size // t.grad_accum} (batch_size / grad_accum) is not divisible "
                          f"by {dist.world} processes")
    objective = make_objective(cfg, dist)
    if t.dtype == "auto":  # resolved here, so config.json records what the run used
        t = dataclasses.replace(t, dtype=resolve_dtype("auto") if objective.auto_bf16 else "float32")
        cfg = objective.cfg = dataclasses.replace(cfg, train=t)
    mcfg = objective.setup(run, resume)
    cfg = dataclasses.replace(cfg, model=mcfg)
    objective.cfg = cfg
    model = build_model(mcfg)
    opt = make_optimizer(model, t)
    step, elapsed, best_val, tokens_seen = 0, 0.0, float("inf"), 0
    if resume:
        ckpts = _ckpt_dirs(run)
        if not ckpts:
            raise ModelLoadError(f"{run} has no complete checkpoint to resume from; start a new run")
        state, rng = load_checkpoint(ckpts[-1], model, opt)
        step, elapsed, best_val = state["step"], state["elapsed"], state["best_val_loss"]
        tokens_seen = state["tokens_seen"]
        if state.get("world_size", 1) != dist.world:
            raise ConfigError(f"{run} was trained with {state.get('world_size', 1)} processes; resume it with the same")
        torch.set_rng_state(rng["torch"])
        objective.set_rng_state(rng["data"])
        if dist.main:  # rows logged after that checkpoint will be logged again
            _truncate_metrics(run / "metrics.jsonl", step)
    elif dist.main:
        run.mkdir(parents=True, exist_ok=True)
        if objective.tokenizer is not None:
            objective.tokenizer.save(run / "tokenizer")
        atomic_write_json(run / CONFIG_FILE, {"llmlab": {"format_version": FORMAT_VERSION, "kind": "run"},
                                              **cfg.to_dict(), "data": objective.data_info()})
    train_model = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model)
    if t.compile:
        train_model = torch.compile(train_model)
    autocast = t.dtype == "bfloat16"
    metrics = run / "metrics.jsonl"
    emit("start", {"run": str(run), "step": step, "max_iters": t.max_iters, "task": objective.name,
                   "params": sum(p.numel() for p in model.parameters()), "data": objective.data_info(),
                   "config": cfg.to_dict()})

    def checkpoint() -> None:
        if dist.main:
            save_checkpoint(run, model, opt, {"step": step, "elapsed": elapsed, "best_val_loss": best_val,
                                              "tokens_seen": tokens_seen, "world_size": dist.world},
                            {"torch": torch.get_rng_state(), "data": objective.rng_state()}, t.keep_checkpoints)
            emit("checkpoint", {"step": step})

    def do_eval() -> dict[str, float]:
        nonlocal best_val
        model.eval()
        with torch.no_grad():
            ev = objective.evaluate(model)
        model.train()
        row = {"kind": "eval", "step": step, "train_loss": ev["train"], "val_loss": ev["val"],
               **{k: v for k, v in ev.items() if k not in ("train", "val")}, "elapsed": round(elapsed, 3)}
        if dist.main:
            _metrics_append(metrics, row)
            if ev["val"] < best_val:  # keep the best model at the top of the run folder
                best_val = ev["val"]
                atomic_save_tensors(unique_state_dict(model), run / WEIGHTS_FILE, metadata={"format": "llmlab"})
                write_manifest(run)
        emit("eval", {**row, "best_val_loss": best_val})
        return {**ev, "step": step}

    model.train()
    stopped_by = "max_iters"
    window_t, window_tokens = time.perf_counter(), 0
    wall0 = time.perf_counter() - elapsed  # elapsed is wall time, evaluation included, across resumes
    ev: dict[str, float] = {}
    while step < t.max_iters:
        if t.max_time and elapsed >= t.max_time:
            stopped_by = "max_time"
            break
        lr = lr_at(step, t)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        for m in range(t.grad_accum):
            batch = objective.next_batch()
            sync = m == t.grad_accum - 1
            ctx = train_model.no_sync() if not sync and hasattr(train_model, "no_sync") else contextlib.nullcontext()
            with ctx, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = objective.loss(train_model, batch) / t.grad_accum
            loss.backward()
            loss_sum += loss.item()
            n_tok = objective.batch_tokens(batch) * dist.world
            tokens_seen += n_tok
            window_tokens += n_tok
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - wall0
        if step % t.log_interval == 0 or step == t.max_iters:
            if dist.world > 1:  # log the loss of the global batch, not rank 0's share
                import torch.distributed as tdist

                lt = torch.tensor(loss_sum)
                tdist.all_reduce(lt)
                loss_sum = lt.item() / dist.world
            now = time.perf_counter()
            tps = window_tokens / max(1e-9, now - window_t)
            window_t, window_tokens = now, 0
            row = {"kind": "train", "step": step, "loss": round(loss_sum, 5), "lr": lr,
                   "tokens_per_s": round(tps, 1), "elapsed": round(elapsed, 3)}
            if dist.main:
                _metrics_append(metrics, row)
            emit("log", {**row, "max_iters": t.max_iters})
        if step % t.eval_interval == 0:
            ev = do_eval()
            elapsed = time.perf_counter() - wall0
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.max_iters:
            checkpoint()
    if not ev or ev.get("step") != step:
        ev = do_eval()
    checkpoint()
    result = TrainResult(run=run, step=step, train_loss=ev.get("train", float("nan")),
                         val_loss=ev.get("val", float("nan")), best_val_loss=best_val, elapsed=elapsed,
                         tokens_per_s=tokens_seen / max(elapsed, 1e-9), stopped_by=stopped_by)
    if dist.main:
        result.samples = finish_run(run, model, objective)
    emit("end", dataclasses.asdict(result) | {"run": str(run)})
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return result


def finish_run(run: Path, model: torch.nn.Module, objective: Objective) -> list[str]:
    """loss.png, the objective's end-of-run files from the best weights, and the manifest."""

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train_pts = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    val_pts = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval"]
    loss_curves(train_pts, val_pts, run / "loss.png", title=f"{run.name}: loss")
    if not (run / WEIGHTS_FILE).is_file():
        atomic_save_tensors(unique_state_dict(model), run / WEIGHTS_FILE, metadata={"format": "llmlab"})
    best = build_model(model.config)
    load_weights_into(best, run / WEIGHTS_FILE)
    best.tokenizer = objective.tokenizer
    best.eval()
    samples = objective.finish(run, best)
    write_manifest(run)
    return samples


def load_run_for_resume(run: str | Path) -> RunConfig:
    """The RunConfig saved in a run folder (for --resume)."""
    run = Path(run)
    if not run.is_dir():
        raise ModelLoadError(f"--resume {run}: no such run folder")
    d = read_run_config(run)
    try:
        mcfg = ModelConfig.from_dict(d["model"])
        tcfg = TrainConfig(**d["train"])
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{run / CONFIG_FILE} is incomplete or from another version ({e})") from None
    return RunConfig(model=mcfg, train=tcfg, preset=d.get("preset", DEFAULT_PRESET))
