"""Privacy lab timings: the wall time of `llmlab privacy canary` with its default settings (training a small
char-level GPT on part of the built-in corpus, then scoring all 10^6 candidate PINs exactly), the exact
exposure measurement alone, and the membership-inference throughput (sequences/s) of the whole attack
suite (loss, reference, zlib, Min-K%, Min-K%++, neighbourhood with 8 neighbours) on that run.

    .venv/bin/python benchmarks/bench_privacy.py [--run RUN] [--threads N]

--run skips the canary command and measures the MIA throughput on an existing run (e.g. one made by
`llmlab train` with its defaults). The machine is shared: note the load average printed with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import table, write_result
from llmlab.security.privacy.canary import find_canaries, load_canaries, measure_exposure
from llmlab.security.privacy.common import run_splits
from llmlab.security.privacy.mia import ATTACKS, MIAConfig, run_mia
from llmlab.security.targets import WhiteBox
from llmlab.train.config import resolve_config
from llmlab.train.loop import train

LLMLAB = Path(sys.executable).parent / "llmlab"


def canary_command(out: Path, threads: int) -> float:
    """Wall seconds of `llmlab privacy canary --out OUT` with default settings, in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LLMLAB_CACHE": str(out.parent / "cache")}
    t = time.perf_counter()
    subprocess.run([str(LLMLAB), "privacy", "canary", "--out", str(out)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="measure MIA throughput on this run instead of running the canary command")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load0 = os.getloadavg()[0]
    result: dict = {"threads": a.threads}
    tmp = Path(tempfile.mkdtemp(prefix="bench-privacy-"))
    if a.run:
        run = Path(a.run)
    else:
        secs = canary_command(tmp / "canary", a.threads)
        run = tmp / "canary" / "run"
        rep = json.loads((tmp / "canary" / "report.json").read_text())["results"]
        result["canary_command_s"] = secs
        result["canary_training_s"] = rep["training"]["elapsed"]
        by_count: dict[str, list[float]] = {}
        for c in rep["canaries"]:  # several canaries per count (and the never-inserted controls, count 0)
            by_count.setdefault(str(c["repeats"]), []).append(round(c["exposure"], 2))
        result["canary_exposures"] = by_count
        result["canary_exposure_mean"] = {k: round(sum(v) / len(v), 2) for k, v in by_count.items()}
        result["canaries"] = len(rep["canaries"])
        fmt, canaries = load_canaries(find_canaries(run))
        wb = WhiteBox.load(run)
        t = time.perf_counter()
        measure_exposure(wb, fmt, canaries)
        result["exact_exposure_1e6_s"] = time.perf_counter() - t
    splits = run_splits(run)
    # a reference model: a 1-layer GPT trained briefly on the same training data
    info = json.loads((run / "config.json").read_text())
    ref_cfg = resolve_config("tiny", None, {"data": None if info["data"]["source"].startswith("default:")
                                            else info["data"]["source"], "val_fraction": info["data"]["val_fraction"],
                                            "n_layer": 1, "n_embd": 64, "n_head": 2, "block_size": 64,
                                            "max_iters": 150, "eval_interval": 150, "eval_iters": 2,
                                            "num_samples": 0, "threads": a.threads})
    os.environ.setdefault("LLMLAB_CACHE", str(tmp / "cache"))
    train(ref_cfg, tmp / "ref")
    wb, ref = WhiteBox.load(run), WhiteBox.load(tmp / "ref")
    res = run_mia(wb, splits.train, splits.val, MIAConfig(bootstrap=1000), reference=ref)
    result["mia"] = {"sequences": res.n_members + res.n_nonmembers, "scoring_s": res.seconds,
                     "sequences_per_s": res.sequences_per_s, "attacks": list(ATTACKS),
                     "auc": {k: round(v["auc"], 4) for k, v in res.attacks.items()}}
    result["run"] = str(run)
    result["loadavg_during"] = [load0, os.getloadavg()[0]]
    rows = [["figure", "value"]]
    if "canary_command_s" in result:
        rows += [["llmlab privacy canary (defaults), wall", f"{result['canary_command_s']:.0f} s"],
                 ["  of which training", f"{result['canary_training_s']:.0f} s"],
                 [f"  exact exposure over 10^6 PINs ({result['canaries']} canaries)",
                  f"{result['exact_exposure_1e6_s']:.1f} s"],
                 ["  exposure by repeats: mean", str(result["canary_exposure_mean"])],
                 ["  exposure by repeats: each canary", str(result["canary_exposures"])]]
    rows += [["MIA suite throughput", f"{res.sequences_per_s:.1f} sequences/s "
              f"({result['mia']['sequences']} sequences, {res.seconds:.1f} s)"],
             ["MIA AUCs", str(result["mia"]["auc"])],
             ["load average (start, end)", f"{load0:.2f}, {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"]]
    print(table(rows))
    print(f"wrote {write_result('privacy', result)}")


if __name__ == "__main__":
    main()
