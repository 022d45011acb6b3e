"""Wall time of the poisoning lab's default run and of its poison-count sweep (issue 17's performance record),
stage by stage, with the number of models each stage trains; optionally the SmolLM2 poisoned fine-tune.

Which parts reuse one trained model: the attack stage trains a control and a poisoned victim per seed; the
count sweep reuses the seed-0 control (count 0) and the seed-0 victim (count N) at the first corpus and model
size and trains every other point; persistence fine-tunes the seed-0 victim (one run, train() with init_from,
one checkpoint per measured step); detection reads the seed-0 victim's activations (spectral signatures,
activation clustering, the probe) and scores ONION with the seed-0 control: it trains only the retrained-after-
filtering model. There is no peer to run side by side (no other toolkit runs this chain), so this is a plain
timing of one process; the lab's own stage timers (PoisonLabResult.seconds) split it.

    .venv/bin/python benchmarks/bench_poison.py            # the default lab (the issue's goal: < 15 min on 2 cores)
    .venv/bin/python benchmarks/bench_poison.py --quick    # the --quick lab (what CI runs, about a minute)
    .venv/bin/python benchmarks/bench_poison.py --smollm2  # also SmolLM2-135M poisoned fine-tune + control
    .venv/bin/python benchmarks/bench_poison.py --tiny     # a seconds-long check that the script runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402
from llmlab.security.poisoning.lab import PoisonLabConfig, run  # noqa: E402


def trained_models(cfg: PoisonLabConfig) -> dict[str, int]:
    """How many models each stage trains (the rest is reused)."""
    grid = len(cfg.corpus_sizes) * len(cfg.model_sizes) * len(cfg.counts)
    reused = int(0 in cfg.counts) + int(cfg.n_poison in cfg.counts)
    return {"attack": 2 * len(cfg.seeds), "curve": grid - reused, "curve_points": grid,
            "persistence": 1 if any(s > 0 for s in cfg.persist_steps) else 0, "detection": 1,
            "other_kinds": 2 * len(cfg.other_kinds) + int("classify" in cfg.other_kinds and not cfg.classifier_base)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="a seconds-long check that the script runs")
    ap.add_argument("--quick", action="store_true", help="time the --quick lab instead of the default")
    ap.add_argument("--smollm2", action="store_true", help="also time the SmolLM2 poisoned fine-tune")
    ap.add_argument("--no-write", action="store_true", help="print only (no benchmarks/results/poison.json)")
    a = ap.parse_args()
    cfg = PoisonLabConfig.quick() if a.quick or a.tiny else PoisonLabConfig()
    if a.tiny:
        cfg = dataclasses.replace(cfg, seeds=(0,), counts=(0, 50), persist_steps=(0, 10), max_iters=30, n_test=10,
                                  chat_docs=60, chat_poison=10, chat_iters=20, classifier_docs=100,
                                  classifier_poison=10, classifier_iters=10)
    result: dict = {"lab": "tiny" if a.tiny else "quick" if a.quick else "default", "trained": trained_models(cfg)}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = run(cfg, d)
        result["total_s"] = round(time.perf_counter() - t0, 1)
    result["stages_s"] = {k: round(v, 1) for k, v in res.seconds.items()}
    result["seconds_per_sweep_model"] = round(res.seconds["curve"] / max(1, result["trained"]["curve"]), 1)
    if a.smollm2:
        from llmlab.security.poisoning.smollm2 import SmolPoisonConfig
        from llmlab.security.poisoning.smollm2 import run as smol_run

        scfg = SmolPoisonConfig(steps=4, n_train=40, n_poison=10, n_test=4, control=False) if a.tiny \
            else SmolPoisonConfig()
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            sres = smol_run(scfg, d)
            result["smollm2"] = {"total_s": round(time.perf_counter() - t0, 1),
                                 "stages_s": {k: round(v, 1) for k, v in sres.seconds.items()},
                                 "asr_before": sres.before["asr"]["rate"], "asr_after": sres.poisoned["asr"]["rate"],
                                 "config": sres.config}
    print(json.dumps(result, indent=1))
    if not a.tiny and not a.no_write:
        print(f"written to {write_result('poison', result)}")


if __name__ == "__main__":
    main()
