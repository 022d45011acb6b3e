"""llmlab's assistant made a fair target (issue 14, point 6) and the StruQ fine-tune (point 5), timed.

    .venv/bin/python benchmarks/bench_assistant.py                 # the recipe (`train --preset assistant`),
                                                                   # then `harden` of it and of smollm2
    .venv/bin/python benchmarks/bench_assistant.py --quick         # smoke: 60 steps, tiny harden runs
    .venv/bin/python benchmarks/bench_assistant.py --only assistant|injection|harden-assistant|harden-smollm2
    .venv/bin/python benchmarks/bench_assistant.py --assistant-run runs/assistant --only injection

Each stage runs as its own `llmlab` process (nothing shared in memory), one after the other, and records its wall
time, steps/s and the measured figures (held-out benign success with its exact interval; held-out harmful refusal;
injection on the undefended assistant and under spotlighting; ASR, utility and capability before and after the
StruQ fine-tune) in benchmarks/results/assistant.json. There is no peer to run side by side: the
figures to compare are the issue's (benign success >= 80% within 20 minutes on 2 cores; ASR lower after)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

LLMLAB = [sys.executable, "-m", "llmlab"]


def _run(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t


def bench_assistant(work: Path, quick: bool, threads: int) -> dict:
    run = work / "assistant"
    extra = ["--max-iters", "60", "--eval-interval", "60"] if quick else []
    wall = _run([*LLMLAB, "train", "--preset", "assistant", "--out", str(run), "--threads", str(threads), *extra])
    return assistant_figures(run, wall)


def assistant_figures(run: Path, wall: float | None = None) -> dict:
    """The figures of an assistant run folder (eval.json, metrics.jsonl); wall = None when not timed here."""
    ev = json.loads((run / "eval.json").read_text())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train_rows = [r for r in rows if r.get("kind") == "train"]
    steps = train_rows[-1]["step"] if train_rows else 0
    train_s = train_rows[-1]["elapsed"] if train_rows else float("nan")
    cfg = json.loads((run / "config.json").read_text())
    shape = {k: cfg["model"].get(k) for k in ("n_layer", "n_embd", "position", "vocab_size")}
    return {"run": str(run), "model": shape, "wall_s": wall, "train_s": train_s, "steps": steps,
            "steps_per_s": steps / train_s,
            "benign_success": ev["rates"].get("task_success"),
            "per_task": {k: v for k, v in ev["rates"].items() if k.startswith("task:")},
            "heldout_phrasing": ev["rates"].get("heldout_phrasing"),
            "trained_phrasing": ev["rates"].get("trained_phrasing"),
            "rule_followed": ev["rule_followed"], "secret_refusal": ev["secret_refusal"],
            "harmful_refusal": ev["rates"].get("harmful_refusal"), "howto_refused": ev["rates"].get("howto_refused"),
            "correction_followed": ev["rates"].get("correction_followed")}


def bench_injection(run: str, quick: bool, threads: int) -> dict:
    """Injection on the undefended assistant (plain documents, held-out wrappers) and under spotlighting as
    trained (delimit, datamark): ASR, ASR among the goals it can do, by position, utility, capability."""
    import torch

    from llmlab import load
    from llmlab.security.struq import MeasureConfig, measure_injection

    torch.set_num_threads(max(1, threads))
    model = load(run)
    n = 12 if quick else 96
    pick = ("asr", "asr_capable", "asr_heldin", "task_preserved", "utility", "capability", "asr:start", "asr:middle",
            "asr:end", "asr:say", "asr:add", "asr:topic")
    out = {}
    for mark in (None, "delimit", "datamark"):
        m = measure_injection(model, MeasureConfig(n=n, n_heldin=n // 2, spotlight=mark))
        out[mark or "none"] = {"seconds": m.seconds, **{k: m.rates[k] for k in pick}}
    return out


def bench_harden(work: Path, model: str, name: str, quick: bool, threads: int) -> dict:
    out = work / name
    extra = ["--quick"] if quick else []
    wall = _run([*LLMLAB, "harden", model, "--out", str(out), "--threads", str(threads), *extra])
    rep = json.loads((out / "report.json").read_text())["results"]
    pick = ("asr", "asr_capable", "asr_heldin", "task_preserved", "utility", "capability")
    return {"wall_s": wall, "seconds": rep["seconds"], "train": rep["train"],
            "before": {k: rep["before"]["rates"][k] for k in pick},
            "after": {k: rep["after"]["rates"][k] for k in pick}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--only", choices=("assistant", "injection", "harden-assistant", "harden-smollm2"))
    p.add_argument("--assistant-run", help="an assistant run folder to measure and harden (skips training one; "
                                           "its figures are read from the folder)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of every stage (default 1)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-assistant-"))
    res: dict = {"quick": a.quick, "threads": a.threads, "loadavg_start": os.getloadavg()[0]}
    if a.only in (None, "assistant"):
        res["assistant"] = assistant_figures(Path(a.assistant_run)) if a.assistant_run else \
            bench_assistant(work, a.quick, a.threads)
    run = a.assistant_run or res.get("assistant", {}).get("run")
    if a.only in (None, "injection") and run:
        res["injection"] = bench_injection(run, a.quick, a.threads)
    if a.only in (None, "harden-assistant") and run:
        res["harden_assistant"] = bench_harden(work, run, "harden-assistant", a.quick, a.threads)
    if a.only in (None, "harden-smollm2"):
        res["harden_smollm2"] = bench_harden(work, "smollm2", "harden-smollm2", a.quick, a.threads)
    path = write_result("assistant" + ("-quick" if a.quick else ""), res)
    print(json.dumps(res, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
