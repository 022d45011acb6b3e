"""Training speed on a shared machine: torch's thread pool with and without another CPU-bound process.

Trains the default tiny GPT (the `tiny` preset on the built-in corpus) for a fixed wall time with --threads 1,
--threads 2 and llmlab's default (threads=0: the governor in llmlab.runtime keeps the pool no larger than the
cores other processes leave free), first on an idle machine, then beside one competing CPU-bound process (a
busy loop). Each trial is its own process; trials alternate their order over rounds; the figure is the median
tokens/s per setting. Goal: with one competitor, the default keeps >= 70% of the better fixed setting, and
on an idle machine it loses nothing.

    .venv/bin/python benchmarks/bench_threads.py [--seconds 20] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

from common import table, write_result

TRIAL = """
import json, sys
from llmlab.train import resolve_config, train
threads, seconds, out = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
cfg = resolve_config("tiny", None, {"threads": threads, "max_time": seconds, "max_iters": 100000, "num_samples": 0,
                                    "eval_interval": 100000, "log_interval": 10})
r = train(cfg, out)
print(json.dumps({"tokens_per_s": r.tokens_per_s, "steps": r.step}))
"""
BUSY = "while True: pass"
SETTINGS = {"--threads 1": 1, "--threads 2": 2, "default (auto)": 0}


def trial(threads: int, seconds: float) -> float:
    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "-c", TRIAL, str(threads), str(seconds), d + "/run"], capture_output=True,
                           text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    res: dict[str, dict[str, list[float]]] = {load: {k: [] for k in SETTINGS} for load in ("idle", "1 competitor")}
    for load in res:
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load != "idle" else None
        try:
            for rnd in range(a.rounds):
                names = list(SETTINGS) if rnd % 2 == 0 else list(SETTINGS)[::-1]
                for name in names:
                    res[load][name].append(trial(SETTINGS[name], a.seconds))
                    print(f"{load:>13s}  {name:<15s} {res[load][name][-1]:>10,.0f} tok/s", flush=True)
        finally:
            if busy is not None:
                busy.kill()
    med = {load: {k: statistics.median(v) for k, v in d.items()} for load, d in res.items()}
    rows = [["machine", *SETTINGS, "default / best fixed"]]
    for load, m in med.items():
        best = max(m["--threads 1"], m["--threads 2"])
        rows.append([load, *(f"{m[k]:,.0f}" for k in SETTINGS), f"{m['default (auto)'] / best:.2f}"])
    print(table(rows))
    print("wrote", write_result("threads", {"tokens_per_s": res, "median": med, "seconds": a.seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
