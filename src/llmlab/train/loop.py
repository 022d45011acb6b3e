"""The one training loop: AdamW, warmup + cosine, clipping, accumulation, bf16, compile, evaluation,
resumable checkpoints, and DistributedDataParallel under torchrun. Every objective runs through it, and
training methods that change how a step is taken (DP-SGD) plug into it through LoopHooks.

Interrupted training is never lost: SIGINT (Ctrl-C) and SIGTERM are turned into a flag the loop checks
between steps; it then writes a resumable checkpoint and raises TrainingInterrupted, which names the one
command that continues the run. A new run writes its step-0 checkpoint before its config.json, so every
run folder with a config.json can be resumed; a run without checkpoint_every writes one every
SAFETY_CHECKPOINT_S seconds, so a SIGKILL loses at most that much."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import threading
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
from llmlab.inspect.evals import resolve_evals, run_checkpoint_evals
from llmlab.inspect.viz import loss_curves, metric_curves
from llmlab.models import build_model
from llmlab.runtime import ThreadGovernor, autocast, keep_freed_memory, resolve_dtype
from llmlab.train.config import DEFAULT_PRESET, RunConfig, TrainConfig
from llmlab.train.init import init_model_config, load_init_source, load_init_weights
from llmlab.train.objective import Callback, LoopHooks, Objective, setup_distributed
from llmlab.train.registry import make_objective

SAFETY_CHECKPOINT_S = 600.0  # with checkpoint_every = 0, a checkpoint at least this often (seconds of training)


def lr_at(step: int, t: TrainConfig, elapsed: float = 0.0) -> float:
    """Linear warmup to lr over warmup_iters, then cosine decay to min_lr at lr_decay_iters. With
    schedule "time" the decay runs over the max_time budget instead: step counts as the share of the
    budget spent times the decay length, so a run ends at min_lr when its time is up, however fast the
    machine."""
    decay = t.lr_decay_iters or t.max_iters
    if step < t.warmup_iters:
        return t.lr * (step + 1) / (t.warmup_iters + 1)
    if t.schedule == "time" and t.max_time > 0:
        step = max(t.warmup_iters, int(decay * min(1.0, elapsed / t.max_time)))
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


# ----------------------------------------------------------------------------- checkpoints


def _ckpt_dirs(run: Path) -> list[Path]:
    d = run / "checkpoints"
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.name.startswith("step-") and (p / "state.json").is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def last_checkpoint(run: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (None when it has none)."""
    ckpts = _ckpt_dirs(Path(run))
    return ckpts[-1] if ckpts else None


def run_finished(run: str | Path) -> bool:
    """Whether a run folder holds a finished run: its last checkpoint is the end-of-run one and its
    end-of-run files are written."""
    run = Path(run)
    ckpt = last_checkpoint(run)
    if ckpt is None or not (run / WEIGHTS_FILE).is_file() or not (run / "loss.png").is_file():
        return False
    try:
        return bool(json.loads((ckpt / "state.json").read_text()).get("final"))
    except (OSError, json.JSONDecodeError):
        return False


def save_checkpoint(run: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any],
                    rng: dict[str, torch.Tensor], keep: int) -> Path:
    """Write checkpoints/step-N/ (weights, optimizer, RNG, JSON state) atomically; keep the last `keep`
    (the step-0 checkpoint a run starts with only until a later one exists)."""
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
    ckpts = _ckpt_dirs(run)
    old = ckpts[:-keep] + [p for p in ckpts[-keep:-1] if p.name == "step-0000000"]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
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


# ----------------------------------------------------------------------------- interruption


def resume_command(run: str | Path, task: str = "") -> str:
    """The command that continues a run from its last checkpoint."""
    verb = "llmlab finetune classify" if task == "classify" else "llmlab train"
    return f"{verb} --resume {run}"


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM. When `saved`, a resumable checkpoint of `step` was written
    first; `command` is the one command that continues (None when nothing was written and the command
    that started it can simply be run again). The CLI prints the message as one line and exits with
    exit_code (130 for SIGINT, 143 for SIGTERM); the library itself neither prints nor exits.

    A KeyboardInterrupt, not an error: code that catches Exception (a reader turning any failure into
    "the file is corrupt") lets it through, and callers that only know KeyboardInterrupt still stop."""

    def __init__(self, run: str | Path, signum: int, step: int | None, command: str | None, saved: bool = True):
        self.run, self.signum, self.step, self.command, self.saved = Path(run), signum, step, command, saved
        super().__init__(self._text())

    def _text(self) -> str:
        name = signal.Signals(self.signum).name
        if self.saved:
            return (f"stopped by {name} at step {self.step}; checkpoint saved in {self.run}. "
                    f"Continue with: {self.command}")
        if self.command:
            return f"stopped by {name} before training started; {self.run} is unchanged. Continue with: {self.command}"
        return f"stopped by {name} before training started; nothing was written. Run the same command again to start"

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def with_command(self, command: str) -> TrainingInterrupted:
        """The same interruption, continued by another command (e.g. the experiment that ran this training)."""
        return TrainingInterrupted(self.run, self.signum, self.step, command, self.saved)


class _StopSignals:
    """While training runs, SIGINT and SIGTERM set a flag the loop checks between steps (it then saves a
    checkpoint and stops). Before the run folder is written, and after the final checkpoint, there is no
    step to finish: a signal raises TrainingInterrupted at once. The previous handlers come back on exit.
    Signal handlers can only be set in the main thread; elsewhere nothing changes."""

    def __init__(self, run: Path, command: str | None) -> None:
        self.run, self.command = run, command
        self.signum = 0
        self.mode = "setup"  # setup | training | finishing | stopped
        self.step: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.mode == "training":  # a second signal changes nothing: the step ends, then the checkpoint
            self.signum = self.signum or signum
            return
        if self.mode == "stopped":  # raised once already (e.g. Ctrl-C, then SIGTERM from a supervisor)
            return
        saved = self.mode == "finishing"
        self.signum, self.mode = signum, "stopped"
        raise TrainingInterrupted(self.run, signum, self.step, self.command, saved=saved)


# ----------------------------------------------------------------------------- the loop


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


def _update_config(run: Path, sections: dict[str, Any]) -> None:
    if sections:
        atomic_write_json(run / CONFIG_FILE, {**json.loads((run / CONFIG_FILE).read_text()), **sections})


def train(cfg: RunConfig, run: str | Path, resume: bool = False, callback: Callback | None = None,
          hooks: LoopHooks | None = None) -> TrainResult:
    """Train cfg.model with its objective into the run folder; resume from its last checkpoint if asked.
    Progress is reported through callback(event, info) with events start, log, eval, checkpoint, end.
    `hooks` change how a step is taken (see LoopHooks; DP-SGD is one). On SIGINT or SIGTERM the run is
    checkpointed and TrainingInterrupted is raised; the previous signal handlers are restored on return."""
    run = Path(run)
    hooks = hooks or LoopHooks()
    task = cfg.train.task or ""
    with _StopSignals(run, resume_command(run, task) if resume else None) as stop:
        return _train(cfg, run, resume, callback, hooks, stop)


def _train(cfg: RunConfig, run: Path, resume: bool, callback: Callback | None, hooks: LoopHooks,
           stop: _StopSignals) -> TrainResult:
    t = cfg.train
    keep_freed_memory()
    dist = setup_distributed()
    emit = callback if (callback and dist.main) else (lambda e, i: None)
    governor = None
    if t.threads:
        torch.set_num_threads(t.threads)
    else:  # auto: as many threads as the cores other processes leave free (see runtime.ThreadGovernor)
        governor = ThreadGovernor()
    torch.manual_seed(t.seed)
    if (t.batch_size // t.grad_accum) % dist.world:
        raise ConfigError(f"micro-batch {t.batch_size // t.grad_accum} (batch_size / grad_accum) is not divisible "
                          f"by {dist.world} processes")
    objective = make_objective(cfg, dist)
    evals = resolve_evals(t.eval_every_checkpoint) if t.eval_every_checkpoint.strip() else []
    if evals and cfg.model.arch != "gpt":
        raise ConfigError(f"evaluations on every checkpoint need a decoder-only model; this run is {cfg.model.arch}")
    if t.dtype == "auto":  # resolved here, so config.json records what the run used
        t = dataclasses.replace(t, dtype=resolve_dtype("auto") if objective.auto_bf16 else "float32")
        cfg = objective.cfg = dataclasses.replace(cfg, train=t)
    command = resume_command(run, objective.name)
    ckpt = None
    if resume:
        ckpt = last_checkpoint(run)
        if ckpt is None:
            raise ModelLoadError(no_checkpoint_message(run))
    init = objective.init_source = load_init_source(cfg, run, resume)  # fine-tuning: --init-from
    if init is not None and ckpt is None:
        cfg = objective.cfg = dataclasses.replace(cfg, model=init_model_config(cfg, init, objective.name))
    mcfg = objective.setup(run, resume)
    cfg = dataclasses.replace(cfg, model=mcfg)
    objective.cfg = cfg
    extra_config = hooks.prepare(objective, run, resume)
    model = build_model(mcfg)
    if init is not None and ckpt is None:
        load_init_weights(model, init)
    opt = make_optimizer(model, t)
    step, elapsed, best_val, tokens_seen = 0, 0.0, float("inf"), 0
    if ckpt is not None:
        state, rng = load_checkpoint(ckpt, model, opt)
        step, elapsed, best_val = state["step"], state["elapsed"], state["best_val_loss"]
        tokens_seen = state["tokens_seen"]
        if state.get("world_size", 1) != dist.world:
            raise ConfigError(f"{run} was trained with {state.get('world_size', 1)} processes; resume it with the same")
        if state.get("hooks") and type(hooks) is LoopHooks:
            raise ConfigError(f"{run} was trained with DP-SGD, whose accountant a plain resume would lose; resume "
                              f"it with `llmlab train --resume {run}` (or train_dp(cfg, run, resume=True))")
    train_model, step_opt = hooks.wrap(model, opt)
    if ckpt is not None:
        hooks.load_state(state.get("hooks", {}), {k[5:]: v for k, v in rng.items() if k.startswith("hook.")})
        torch.set_rng_state(rng["torch"])
        objective.set_rng_state(rng["data"])
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(train_model)
    if t.compile:
        train_model = torch.compile(train_model)
    metrics = run / "metrics.jsonl"
    last_ckpt_t = time.perf_counter()

    def checkpoint(final: bool = False, announce: bool = True) -> None:
        nonlocal last_ckpt_t
        if dist.main:
            hstate, htensors = hooks.state()
            save_checkpoint(run, model, opt, {"step": step, "elapsed": elapsed, "best_val_loss": best_val,
                                              "tokens_seen": tokens_seen, "world_size": dist.world,
                                              "final": final, **({"hooks": hstate} if hstate else {})},
                            {"torch": torch.get_rng_state(), "data": objective.rng_state(),
                             **{f"hook.{k}": v for k, v in htensors.items()}}, t.keep_checkpoints)
            if announce:
                emit("checkpoint", {"step": step})
            if evals:  # every checkpoint, the step-0 one included: a metric tracked across training
                row = {"kind": "checkpoint_eval", "step": step, "elapsed": round(elapsed, 3),
                       **run_checkpoint_evals(evals, model, objective.tokenizer)}
                _metrics_append(metrics, row)
                emit("checkpoint_eval", row)
        last_ckpt_t = time.perf_counter()

    stop.mode = "training"  # from here a signal waits for the step to end, then checkpoints
    if ckpt is not None:
        if dist.main:  # rows logged after that checkpoint will be logged again
            _truncate_metrics(metrics, step)
    elif dist.main:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(metrics, b"")
        if objective.tokenizer is not None:
            objective.tokenizer.save(run / "tokenizer")
        checkpoint(announce=False)  # before config.json: a run folder with a config can always be resumed
        atomic_write_json(run / CONFIG_FILE, {"llmlab": {"format_version": FORMAT_VERSION, "kind": "run"},
                                              **cfg.to_dict(), "data": objective.data_info(), **extra_config})
    stop.command = command
    emit("start", {"run": str(run), "step": step, "max_iters": t.max_iters, "task": objective.name + hooks.label,
                   "params": sum(p.numel() for p in model.parameters()), "data": objective.data_info(),
                   "config": cfg.to_dict()})

    def do_eval() -> dict[str, float]:
        nonlocal best_val
        model.eval()
        with torch.no_grad():
            ev = objective.evaluate(model)
        model.train()
        row = {"kind": "eval", "step": step, "train_loss": ev["train"], "val_loss": ev["val"],
               **{k: v for k, v in ev.items() if k not in ("train", "val")}, **hooks.metrics(),
               "elapsed": round(elapsed, 3)}
        if dist.main:
            _metrics_append(metrics, row)
            if ev["val"] < best_val:  # keep the best model at the top of the run folder
                best_val = ev["val"]
                atomic_save_tensors(unique_state_dict(model), run / WEIGHTS_FILE, metadata={"format": "llmlab"})
                write_manifest(run)
        emit("eval", {**row, "best_val_loss": best_val})
        return {**ev, "step": step}

    def stop_requested() -> int:
        s = stop.signum
        if dist.world > 1:  # every rank stops at the same step
            import torch.distributed as tdist

            flag = torch.tensor([s])
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX)
            s = int(flag.item())
        return s

    def interrupt(signum: int) -> TrainingInterrupted:
        last = last_checkpoint(run)
        if last is None or last.name != f"step-{step:07d}":
            checkpoint()
        if dist.main:
            if not (run / WEIGHTS_FILE).is_file():  # so the run can be used (generate, measure) as it is
                atomic_save_tensors(unique_state_dict(model), run / WEIGHTS_FILE, metadata={"format": "llmlab"})
            _update_config(run, hooks.config_update(step))
            write_manifest(run)
        if dist.world > 1:
            import torch.distributed as tdist

            tdist.barrier()
        return TrainingInterrupted(run, signum, step, command)

    model.train()
    stopped_by = "max_iters"
    window_t, window_tokens = time.perf_counter(), 0
    wall0 = time.perf_counter() - elapsed  # elapsed is wall time, evaluation included, across resumes
    ev: dict[str, float] = {}
    while step < t.max_iters:
        signum = stop_requested()
        if signum:
            raise interrupt(signum)
        if t.max_time and elapsed >= t.max_time:
            stopped_by = "max_time"
            break
        lr = lr_at(step, t, elapsed)
        if governor is not None:
            governor.update()
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum = 0.0
        with hooks.step_context():
            for m in range(t.grad_accum):
                batch = hooks.next_batch(objective)
                sync = m == t.grad_accum - 1
                ctx = (train_model.no_sync() if not sync and hasattr(train_model, "no_sync")
                       else contextlib.nullcontext())
                with ctx, autocast(t.dtype):
                    loss = objective.loss(train_model, batch) / t.grad_accum
                loss.backward()
                loss_sum += loss.item()
                n_tok = objective.batch_tokens(batch) * dist.world
                tokens_seen += n_tok
                window_tokens += n_tok
            if t.grad_clip and hooks.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            step_opt.step()
            step_opt.zero_grad(set_to_none=True)
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
                   "tokens_per_s": round(tps, 1), "threads": torch.get_num_threads(), "elapsed": round(elapsed, 3)}
            if dist.main:
                _metrics_append(metrics, row)
            emit("log", {**row, "max_iters": t.max_iters})
        if step % t.eval_interval == 0:
            ev = do_eval()
            elapsed = time.perf_counter() - wall0
        if step < t.max_iters and (t.checkpoint_every and step % t.checkpoint_every == 0 or not t.checkpoint_every
                                   and time.perf_counter() - last_ckpt_t >= SAFETY_CHECKPOINT_S):
            checkpoint()
    if not ev or ev.get("step") != step:
        ev = do_eval()
    signum = stop_requested()
    if signum:
        raise interrupt(signum)
    checkpoint(final=True)
    if stop.signum:  # it came while the final checkpoint was written
        raise TrainingInterrupted(run, stop.signum, step, command)
    stop.step, stop.mode = step, "finishing"  # from here a signal stops at once: the final checkpoint is written
    result = TrainResult(run=run, step=step, train_loss=ev.get("train", float("nan")),
                         val_loss=ev.get("val", float("nan")), best_val_loss=best_val, elapsed=elapsed,
                         tokens_per_s=tokens_seen / max(elapsed, 1e-9), stopped_by=stopped_by)
    if dist.main:
        _update_config(run, hooks.config_update(step))
        result.samples = finish_run(run, model, objective, title=f"{run.name}: loss{hooks.label}")
    emit("end", dataclasses.asdict(result) | {"run": str(run)})
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.barrier()
        tdist.destroy_process_group()
    return result


def finish_run(run: Path, model: torch.nn.Module, objective: Objective, title: str = "") -> list[str]:
    """The objective's end-of-run files from the best weights, loss.png, and the manifest."""
    if not (run / WEIGHTS_FILE).is_file():
        atomic_save_tensors(unique_state_dict(model), run / WEIGHTS_FILE, metadata={"format": "llmlab"})
    best = build_model(model.config)
    load_weights_into(best, run / WEIGHTS_FILE)
    best.tokenizer = objective.tokenizer
    best.eval()
    samples = objective.finish(run, best)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()] \
        if (run / "metrics.jsonl").is_file() else []
    train_pts = [(r["step"], r["loss"]) for r in rows if r.get("kind") == "train"]
    val_pts = [(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval"]
    evals = [r for r in rows if r.get("kind") == "checkpoint_eval"]
    if evals:
        names = [k for k in evals[-1] if k not in ("kind", "step", "elapsed")]
        metric_curves({k: [(r["step"], r[k]) for r in evals if k in r] for k in names}, run / "checkpoint_evals.png",
                      title=run.name)
    loss_curves(train_pts, val_pts, run / "loss.png", title=title or f"{run.name}: loss")  # written last: run_finished
    write_manifest(run)
    return samples


def no_checkpoint_message(run: str | Path) -> str:
    """What to say when a run folder with a config.json has no checkpoint to resume."""
    return (f"{run} has no checkpoint to resume from: its checkpoints/ folder is missing or empty (the run was "
            f"stopped before writing one, or they were deleted), so it cannot be continued. Start over: delete "
            f"the folder (rm -r {run}) and train again, or train into another --out")


def existing_run_message(run: str | Path) -> str:
    """What to say when a new run is asked for in a folder that is not empty: the one thing that works."""
    run = Path(run)
    if (run / CONFIG_FILE).is_file() and last_checkpoint(run) is not None:
        try:
            task = read_run_config(run).get("train", {}).get("task", "")
        except ModelLoadError:
            task = ""
        cmd = resume_command(run, task)
        how = (f"a finished run; train it further with `{cmd} --max-iters N`" if run_finished(run)
               else f"an unfinished run; continue it with `{cmd}`")
        return f"{run} already exists and is not empty: it holds {how}, or choose another --out for a new run"
    return (f"{run} already exists and is not empty, and holds no run that can be resumed; choose another --out, "
            f"or delete it (rm -r {run}) first")


def load_run_for_resume(run: str | Path) -> RunConfig:
    """The RunConfig saved in a run folder (for --resume)."""
    run = Path(run)
    if not run.is_dir():
        raise ModelLoadError(f"--resume {run}: no such run folder")
    if not (run / CONFIG_FILE).is_file():
        raise ModelLoadError(f"--resume {run}: it has no {CONFIG_FILE}, so it is not a run (or it was stopped while "
                             f"being created); delete it (rm -r {run}) and train again, or train into another --out")
    d = read_run_config(run)
    try:
        mcfg = ModelConfig.from_dict(d["model"])
        tcfg = TrainConfig(**d["train"])
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{run / CONFIG_FILE} is incomplete or from another version ({e})") from None
    if last_checkpoint(run) is None:
        raise ModelLoadError(no_checkpoint_message(run))
    return RunConfig(model=mcfg, train=tcfg, preset=d.get("preset", DEFAULT_PRESET))
