"""Encoder-decoder models from scratch on three offline tasks: "title the paragraph" (`llmlab dataset
pydoc-titles --sections 8`: a Python-reference paragraph -> its section title, the 8 sections of the
classification benchmark), and reversing / sorting lists of 3-8 words (`reverse-words`, `sort-words`).
Reports held-out exact match and chrF with greedy decoding and with beam search (4 beams), against always
answering the most frequent target, and the training time.

    cd benchmarks && ../.venv/bin/python bench_seq2seq.py              # about 15 min on an idle 2-core machine
    cd benchmarks && ../.venv/bin/python bench_seq2seq.py --scale 0.1  # a quick look (10x fewer steps)
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from common import table, write_result
from llmlab.datasets import make_dataset, write_dataset
from llmlab.generate.causal import GenerationConfig
from llmlab.generate.seq2seq import generate_seq2seq
from llmlab.interop import load
from llmlab.metrics import chrf, exact_match
from llmlab.train.config import resolve_config
from llmlab.train.loop import train
from llmlab.train.seq2seq import read_pairs

TASKS = {
    # name: (data set, generator options, training overrides)
    "pydoc-titles": ("pydoc-titles", {"n_sections": 8, "max_chars": 400},
                     dict(tokenizer="bpe", vocab_size=2000, n_layer=2, n_dec_layer=2, n_head=4, n_embd=128,
                          block_size=128, batch_size=16, lr=1e-3, min_lr=1e-4, dropout=0.1, max_iters=1200)),
    "reverse-words": ("reverse-words", {"n": 3000}, dict(n_layer=2, n_dec_layer=2, n_head=4, n_embd=96,
                                                        block_size=64, batch_size=32, lr=3e-3, min_lr=3e-4,
                                                        max_iters=3000)),
    "sort-words": ("sort-words", {"n": 3000}, dict(n_layer=2, n_dec_layer=2, n_head=4, n_embd=96, block_size=64,
                                                  batch_size=32, lr=3e-3, min_lr=3e-4, max_iters=3000)),
}


def held_out(run: Path, pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs the run held out (the Seq2SeqObjective's split, reproduced from its saved val count)."""
    from llmlab.train.seq2seq import _split_pairs

    cfg = json.loads((run / "config.json").read_text())
    _, va = _split_pairs(len(pairs), cfg["train"]["val_fraction"])
    return [pairs[i] for i in va]


def run_task(name: str, work: Path, scale: float, threads: int) -> dict:
    dataset, gen_kw, overrides = TASKS[name]
    data = write_dataset(make_dataset(dataset, seed=0, **gen_kw), work / f"{name}.jsonl")
    overrides = {**overrides, "max_iters": max(1, int(overrides["max_iters"] * scale))}
    cfg = resolve_config(overrides={"arch": "seq2seq", "data": str(data), "warmup_iters": 50, "eval_interval": 400,
                                    "eval_iters": 2, "threads": threads, "num_samples": 0, **overrides})
    res = train(cfg, work / name)
    ev = json.loads((work / name / "eval.json").read_text())
    model = load(work / name)
    val = held_out(work / name, read_pairs(data))
    srcs, refs = [s for s, _ in val], [t for _, t in val]
    t0 = time.perf_counter()
    beam = generate_seq2seq(model, srcs, GenerationConfig(max_new_tokens=64, temperature=0.0), beams=4, alpha=0.6)
    beam_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy = generate_seq2seq(model, srcs, GenerationConfig(max_new_tokens=64, temperature=0.0))
    greedy_s = time.perf_counter() - t0
    tok = model.tokenizer
    refs = [tok.decode(tok.encode(r)) for r in refs]  # compared after the tokenizer's round trip
    majority = Counter(refs).most_common(1)[0][0]
    out = {"steps": res.step, "train_s": res.elapsed, "val_loss": ev["val_loss"], "n_val": len(val),
           "greedy_exact_match": exact_match(greedy, refs), "greedy_chrf": chrf(greedy, refs),
           "beam4_exact_match": exact_match(beam, refs), "beam4_chrf": chrf(beam, refs),
           "eval_json_exact_match": ev["exact_match"], "eval_json_chrf": ev["chrf"],
           "greedy_decode_s": greedy_s, "beam4_decode_s": beam_s,
           "majority_exact_match": exact_match([majority] * len(refs), refs),
           "majority_chrf": chrf([majority] * len(refs), refs),
           "examples": [{"source": s[:120], "reference": r, "greedy": g, "beam4": b}
                        for s, r, g, b in list(zip(srcs, refs, greedy, beam))[:5]]}
    print(name, {k: v for k, v in out.items() if k != "examples"}, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="scale every task's number of steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tasks", default=",".join(TASKS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_seq2seq_"))
    results = {name: run_task(name, work, a.scale, a.threads) for name in a.tasks.split(",")}
    rows = [["task", "steps", "train s", "val loss", "EM greedy", "chrF greedy", "EM beam 4", "chrF beam 4",
             "EM majority"]]
    for name, r in results.items():
        rows.append([name, r["steps"], f"{r['train_s']:.0f}", f"{r['val_loss']:.3f}", f"{r['greedy_exact_match']:.3f}",
                     f"{r['greedy_chrf']:.1f}", f"{r['beam4_exact_match']:.3f}", f"{r['beam4_chrf']:.1f}",
                     f"{r['majority_exact_match']:.3f}"])
    print(table(rows))
    for name, r in results.items():
        for e in r["examples"][:2]:
            print(f"{name}: {e['source'][:60]!r} -> greedy {e['greedy']!r} / beam {e['beam4']!r} "
                  f"(reference {e['reference']!r})")
    print(f"wrote {write_result('seq2seq', {'results': results, 'scale': a.scale, 'threads': a.threads})}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
