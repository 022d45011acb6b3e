"""`llmlab harden MODEL`: a training-time defence against prompt injection (StruQ / the instruction hierarchy),
measured before and after on injection templates held out from the fine-tuning data.

    llmlab harden smollm2 --out runs/harden-smol          SmolLM2-135M-Instruct, last 4 blocks, 60 steps
    llmlab harden runs/assistant --out runs/harden-asst   llmlab's own assistant (all weights, 300 steps)
    llmlab harden smollm2 --quick --out runs/h            a smoke run: 8 steps, 12 attacks

It writes out/struq.jsonl (the fine-tuning data), out/finetune/ (an ordinary run folder: serve it, scan it) and
report.json / report.html / report.md."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from llmlab.cli.common import ProgressRenderer, console, set_pairs, verb


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="the model to harden: smollm2, or an llmlab assistant run folder")
    p.add_argument("--out", help="experiment folder, new or empty (default runs/harden/<time>)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 8 steps, 200 examples, 12 attacks")
    p.add_argument("--max-iters", type=int, help="fine-tuning steps (default 60 for smollm2, 300 for an assistant)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 5e-5 for smollm2, 1e-3 for an assistant)")
    p.add_argument("--batch-size", type=int, help="conversations per step (default 8; 16 for an assistant)")
    p.add_argument("--train-layers", type=int, help="blocks fine-tuned from the top; 0 = all weights "
                                                    "(default 4 for smollm2, 0 for an assistant)")
    p.add_argument("--examples", type=int, help="fine-tuning conversations generated (default 3000; 6000)")
    p.add_argument("--limit", type=int, help="attacks with held-out templates (and as many clean tasks and direct "
                                             "goals; default 48)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = the free cores)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other training field, e.g. --set weight_decay=0")


@verb("harden", "fine-tune a chat model to ignore instructions inside documents (StruQ) and measure injection "
                "before and after", _add_args)
def cmd_harden(a: argparse.Namespace) -> int:
    from llmlab.security.struq import HardenConfig, MeasureConfig, run, summary, write_harden_report

    cfg = HardenConfig(base=a.model) if a.model == "smollm2" else HardenConfig.for_assistant(a.model)
    if a.quick:
        cfg = dataclasses.replace(cfg, max_iters=8, n_data=200, measure=MeasureConfig(n=12, n_heldin=6))
    kw = {k: v for k, v in (("max_iters", a.max_iters), ("lr", a.lr), ("batch_size", a.batch_size),
                            ("train_layers", a.train_layers), ("n_data", a.examples)) if v is not None}
    measure = dataclasses.replace(cfg.measure, seed=a.seed, **({"n": a.limit} if a.limit else {}))
    cfg = dataclasses.replace(cfg, seed=a.seed, threads=a.threads, measure=measure, train=set_pairs(a.set), **kw)
    if a.lr is not None:
        cfg = dataclasses.replace(cfg, min_lr=a.lr / 10)
    out = Path(a.out) if a.out else Path("runs") / "harden" / time.strftime("%Y%m%d-%H%M%S")
    with ProgressRenderer() as pr:
        res = run(cfg, out, pr)
    write_harden_report(res, out)
    console().print(summary(res))
    console().print(f"report: {out / 'report.html'}")
    return 0
