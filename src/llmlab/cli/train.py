"""`llmlab train`: train a model with any objective."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llmlab.cli.common import (
    ProgressRenderer,
    add_config_overrides,
    config_overrides,
    console,
    resume_overrides,
    verb,
)
from llmlab.errors import LlmlabError
from llmlab.security.privacy.dp import DPHooks, is_dp_run
from llmlab.train.config import PRESETS, resolve_config
from llmlab.train.loop import TrainingInterrupted, existing_run_message, load_run_for_resume, train


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--config", help="a TOML file with [model] and [train] tables")
    p.add_argument("--out", help="the run folder (default runs/<preset>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    add_config_overrides(p)  # every TrainConfig / ModelConfig field, grouped by what it applies to, with help


@verb("train", "train a model (default: a small character-level GPT on the Python language reference)",
      _train_args)
def cmd_train(a: argparse.Namespace) -> int:
    import time


    overrides = config_overrides(a)
    if a.resume:
        if a.preset or a.config:
            raise LlmlabError("--resume continues a run with its own config; drop --preset/--config")
        cfg = resume_overrides(load_run_for_resume(a.resume), overrides)
        run = Path(a.resume)
    else:
        cfg = resolve_config(a.preset, a.config, overrides)
        run = Path(a.out) if a.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if run.exists() and any(run.iterdir()):
            raise LlmlabError(existing_run_message(run))
    hooks = None
    if a.resume and is_dp_run(run):  # a DP-SGD run (llmlab privacy canary --defence dp) resumes with its DP settings
        hooks = DPHooks.from_run(run)
    progress = ProgressRenderer()
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
