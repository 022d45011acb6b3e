"""Best-of-n sampling and reward scoring, batched vs one at a time, side by side; and the Goodhart lab's wall time.

Best-of-n draws n responses per prompt from the policy and scores each with the reward model. Batched =
what `llmlab align bon` and the Goodhart lab do (llmlab.train.preference.sample_responses: all rows of a
chunk decoded together with a KV cache, then RewardModel scores them in batches of 512). One at a time =
one generate call per sampled response and one reward-model call per response. Both sides use the lab's
policy shape (2 layers, width 96, character tokenizer of the task) and the same prompts; the policy and
reward model are the lab's trained runs with --lab DIR (seed-0/sft and seed-0/rm of a goodhart folder), else
random-initialised models of that shape. Before timing, both sides answer the first prompts greedily and
must write the same answers and the same scores.

Each side runs in its own process and they take turns on the same chunks of prompts (common.interleave); the
speed-up is the median over rounds of loop time / batched time. Goal (issue 20): at least 4x, as samples/s.

    .venv/bin/python benchmarks/bench_align.py [--prompts 16] [--n 64] [--chunk 4] [--lab runs/align/X]
    .venv/bin/python benchmarks/bench_align.py --lab-time [--quick]    the lab's wall time (goal < 15 min)
    .venv/bin/python benchmarks/bench_align.py --tiny                  a quick check that the script runs
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Pacer, interleave, round_ratio, table, write_result  # noqa: E402


def _models(lab: str | None):  # noqa: ANN202
    from llmlab.train.preference import RewardModel

    if lab:
        from llmlab.interop import load

        pol, rm = load(Path(lab) / "seed-0" / "sft"), load(Path(lab) / "seed-0" / "rm")
        return pol.eval(), RewardModel(rm)
    from llmlab.config import ModelConfig
    from llmlab.labs.align.task import TaskConfig, sft_rows
    from llmlab.models import build_model
    from llmlab.tokenizers import CharTokenizer

    rows = sft_rows(500, 0, TaskConfig())
    tok = CharTokenizer.train("".join(r["prompt"] + r["completion"] for r in rows), unk="replace",
                              specials=["<pad>", "<|endoftext|>"])
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=112, n_layer=2, n_head=4, n_embd=96,
                      pad_token_id=tok.pad_id, extra={"align": {"role": "reward", "head_token": tok.eos_id}})
    pol, rm = build_model(cfg.replace(extra={})).eval(), build_model(cfg).eval()
    pol.tokenizer = rm.tokenizer = tok
    return pol, RewardModel(rm)


def worker(pacer: Pacer, side: str, lab: str | None, n_prompts: int, n: int, new_tokens: int, chunk: int,
           threads: int) -> None:
    """One side ("batched" | "loop"): chunks of prompts, n samples each, all scored; a pause between chunks."""
    from llmlab.labs.align.task import eval_prompts
    from llmlab.train.preference import prompt_ids_for, response_text, sample_ids, sample_responses

    if threads:
        torch.set_num_threads(threads)
    pol, rm = _models(lab)
    tok = pol.tokenizer
    prompts = eval_prompts(n_prompts, 123)
    batched = side == "batched"

    def one_by_one(ps: list[str], k: int, temperature: float, seed: int) -> tuple[list[str], list[float]]:
        texts, scores = [], []
        for i, p in enumerate(ps):
            ids = prompt_ids_for(tok, [p], pol.config.block_size, new_tokens)
            for j in range(k):
                out = sample_ids(pol, ids, new_tokens, temperature, seed + i * k + j, batch_size=1)
                t = response_text(tok, out[0])
                texts.append(t)
                scores.append(float(rm([p], [t])[0]))
        return texts, scores

    def together(ps: list[str], k: int, temperature: float, seed: int) -> tuple[list[str], list[float]]:
        texts = [t for ts in sample_responses(pol, ps, k, new_tokens, temperature, seed) for t in ts]
        scores = rm([p for p in ps for _ in range(k)], texts).tolist()
        return texts, scores

    fn = together if batched else one_by_one
    probe = fn(prompts[:4], 1, 0.0, 0)  # greedy: both sides must agree (not timed)
    units = [prompts[i:i + chunk] for i in range(0, len(prompts), chunk)]
    lengths: list[int] = []
    pacer.pause()
    for i, u in enumerate(units):
        if i:
            pacer.pause()
        texts, _ = fn(u, n, 1.0, 1000 * (i + 1))
        lengths += [len(t) for t in texts]
    pacer.finish({"samples": len(lengths), "greedy": probe[0], "greedy_scores": [round(s, 4) for s in probe[1]],
                  "mean_chars": sum(lengths) / max(1, len(lengths))})


def lab_time(quick: bool) -> None:
    """The Goodhart lab's wall time through the command line (its default experiment, or --quick)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "lab"
        cmd = [sys.executable, "-m", "llmlab", "align", "goodhart", "--out", str(out), *(["--quick"] if quick else [])]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t
    print(table([["experiment", "wall time", "goal"],
                 ["goodhart --quick" if quick else "goodhart (default)", f"{wall:.0f} s",
                  "about a minute" if quick else "< 15 min"]]))
    write_result("align_lab_quick" if quick else "align_lab", {"wall_s": wall, "quick": quick})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=64, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=4, help="prompts per turn")
    ap.add_argument("--lab", help="a goodhart folder whose seed-0 SFT policy and reward model to use")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a few prompts and samples: checks that the script runs")
    ap.add_argument("--lab-time", action="store_true", help="time the Goodhart lab instead")
    ap.add_argument("--quick", action="store_true", help="with --lab-time: the --quick lab")
    a = ap.parse_args()
    if a.lab_time:
        lab_time(a.quick)
        return
    if a.tiny:
        a.prompts, a.n, a.chunk, a.new_tokens = 4, 4, 2, 8
    t0 = time.perf_counter()
    args = (a.lab, a.prompts, a.n, a.new_tokens, a.chunk, a.threads)
    res = interleave({side: (worker, (side, *args)) for side in ("batched", "loop")})
    b, lp = res["batched"], res["loop"]
    speed = round_ratio(lp["chunks_s"], b["chunks_s"])
    entry = {"models": a.lab or "random tiny GPTs (lab shape)", "prompts": a.prompts, "n": a.n,
             "samples": b["samples"], "batched_samples_per_s": b["samples"] / b["active_s"],
             "loop_samples_per_s": lp["samples"] / lp["active_s"], "speedup_median_round": speed,
             "speedup_total": lp["active_s"] / b["active_s"], "same_greedy": b["greedy"] == lp["greedy"],
             "same_greedy_scores": b["greedy_scores"] == lp["greedy_scores"], "wall_s": time.perf_counter() - t0,
             "settings": vars(a)}
    print(table([["models", "prompts x n", "batched samples/s (sampled + scored)", "one-at-a-time samples/s",
                  "speed-up (median of rounds)", "same greedy answers / scores"],
                 [entry["models"], f"{a.prompts} x {a.n}", f"{entry['batched_samples_per_s']:.1f}",
                  f"{entry['loop_samples_per_s']:.1f}", f"{speed:.2f}x",
                  f"{entry['same_greedy']} / {entry['same_greedy_scores']}"]]))
    if not a.tiny:
        print(f"wrote {write_result('align_bon', entry)}")


if __name__ == "__main__":
    main()
