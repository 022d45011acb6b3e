"""`llmlab train`: train a model with any objective."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmlab.cli.common import TrainProgress, console, verb
from llmlab.config import ModelConfig
from llmlab.errors import LlmlabError
from llmlab.security.privacy.dp import DPHooks, is_dp_run
from llmlab.train.config import MODEL_CLI_SKIP, PRESETS, TrainConfig, resolve_config
from llmlab.train.loop import TrainingInterrupted, existing_run_message, load_run_for_resume, train


def _field_type(f) -> type:  # noqa: ANN001
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if t.startswith(name):
            return typ
    return str


def _train_args(p: argparse.ArgumentParser) -> None:
    import dataclasses


    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--config", help="a TOML file with [model] and [train] tables")
    p.add_argument("--out", help="the run folder (default runs/<preset>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    g = p.add_argument_group("overrides (any field of the model or training config)")
    fields = [f for f in dataclasses.fields(TrainConfig)] + \
        [f for f in dataclasses.fields(ModelConfig) if f.name not in MODEL_CLI_SKIP]
    for f in fields:
        typ = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        if typ is bool:
            g.add_argument(flag, dest=f"ov_{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            g.add_argument(flag, dest=f"ov_{f.name}", type=typ, default=None, metavar=typ.__name__.upper())


@verb("train", "train a model (default: a small character-level GPT on the Python language reference)",
      _train_args)
def cmd_train(a: argparse.Namespace) -> int:
    import time


    overrides = {k[3:]: v for k, v in vars(a).items() if k.startswith("ov_") and v is not None}
    if a.resume:
        if a.preset or a.config:
            raise LlmlabError("--resume continues a run with its own config; drop --preset/--config")
        cfg = load_run_for_resume(a.resume)
        allowed = {"max_iters", "max_time", "checkpoint_every", "threads", "eval_interval", "log_interval"}
        bad = sorted(set(overrides) - allowed)
        if bad:
            raise LlmlabError(f"cannot change {', '.join(bad)} when resuming; only {', '.join(sorted(allowed))}")
        import dataclasses

        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
        run = Path(a.resume)
    else:
        cfg = resolve_config(a.preset, a.config, overrides)
        run = Path(a.out) if a.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if run.exists() and any(run.iterdir()):
            raise LlmlabError(existing_run_message(run))
    hooks = None
    if a.resume and is_dp_run(run):  # a DP-SGD run (llmlab privacy canary --defense dp) resumes with its DP settings
        hooks = DPHooks.from_run(run)
    progress = TrainProgress()
    try:
        with progress:
            result = train(cfg, run, resume=bool(a.resume), callback=progress, hooks=hooks)
    except TrainingInterrupted as e:  # a checkpoint was saved: one line naming the command that continues
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"llmlab train: {e}", file=sys.stderr)
        return e.exit_code
    if int(os.environ.get("RANK", "0")) == 0:
        c = console()
        c.print(f"[bold]done[/] after {result.step} steps ({result.stopped_by}), {result.elapsed:.0f} s, "
                f"{result.tokens_per_s:,.0f} tokens/s; val loss {result.val_loss:.4f} "
                f"(best {result.best_val_loss:.4f})")
        if hooks is not None:
            c.print(f"DP-SGD: epsilon {hooks.epsilon:.3f} at delta {hooks.dp.delta:g} "
                    f"(noise multiplier {hooks.dp.noise_multiplier:.3f})")
        for i, s in enumerate(result.samples):
            c.print(f"[bold]--- sample {i + 1} ---[/]")
            c.print(s, markup=False)
        arch = cfg.model.arch
        nxt = {"bert": f"llmlab attention \"...\" --model {run}"}.get(arch, f"llmlab generate {run} --prompt \"...\"")
        c.print(f"run folder: {run}  (next: {nxt})")
    return 0
