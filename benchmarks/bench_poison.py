"""Wall time of the poisoning lab's default run and of its poison-count sweep (the issue's performance record).

    .venv/bin/python benchmarks/bench_poison.py            # the default lab (full) and the sweep
    .venv/bin/python benchmarks/bench_poison.py --tiny     # a seconds-long check that the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

from llmlab.security.poisoning.lab import PoisonLabConfig, run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--quick", action="store_true", help="time the --quick lab instead of the default")
    a = ap.parse_args()
    cfg = PoisonLabConfig.quick() if a.quick or a.tiny else PoisonLabConfig()
    if a.tiny:
        cfg = dataclasses.replace(cfg, seeds=(0,), counts=(0, 50), persist_steps=(0, 10), max_iters=30, n_test=10)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = run(cfg, d)
        total = time.perf_counter() - t0
    print(json.dumps({"total_s": round(total, 1), "stages_s": {k: round(v, 1) for k, v in res.seconds.items()},
                      "sweep_points": len(res.curve), "seeds": len(cfg.seeds)}, indent=1))


if __name__ == "__main__":
    main()
