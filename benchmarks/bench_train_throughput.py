"""Training throughput (tokens/s): llmlab's GPT vs transformers' GPT2LMHeadModel at the same config, same
initial weights, same batches; one step = forward, backward, AdamW update.

Each side runs in its own process and they take turns, 10 steps at a time (common.interleave), so the
machine's drift hits all of them alike. The peer runs as its users run it: float32, torch's default AdamW.
llmlab runs as its trainer does (fused AdamW, the allocator setting of llmlab.runtime) in float32 eager,
float32 with torch.compile, and bf16 autocast (where the CPU has native bf16; `--dtype auto` picks it);
the peer also runs in bf16 autocast then, for a like-for-like bf16 figure.

    .venv/bin/python benchmarks/bench_train_throughput.py [--quick] [--no-compile]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import Pacer, hf_gpt2, interleave, llmlab_from_hf, round_ratio, table, write_result

CONFIGS = {"tiny 4x4x128 (B12 T64, V65)": dict(n_layer=4, n_head=4, n_embd=128, vocab=65, T=64, B=12),
           "small 6x6x384 (B8 T128, V65)": dict(n_layer=6, n_head=6, n_embd=384, vocab=65, T=128, B=8)}
CHUNK = 10


def worker(pacer: Pacer, side: str, c: dict, rounds: int) -> None:
    """Build one side, warm it up, then run `rounds` chunks of CHUNK steps."""
    from llmlab.runtime import keep_freed_memory
    from llmlab.train.config import TrainConfig
    from llmlab.train.loop import make_optimizer

    hf = hf_gpt2(c["n_layer"], c["n_head"], c["n_embd"], c["vocab"], 256).train()
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(8):
        x = torch.randint(0, c["vocab"], (c["B"], c["T"] + 1), generator=g)
        batches.append((x[:, :-1], x[:, 1:]))
    bf16 = side.endswith("bf16")
    if side.startswith("peer"):
        model, opt = hf, torch.optim.AdamW(hf.parameters(), lr=1e-4)  # the peer's usual optimizer

        def fwd(x: torch.Tensor) -> torch.Tensor:
            return model(x).logits
    else:
        keep_freed_memory()  # what llmlab's trainer does at start
        model = llmlab_from_hf(hf).train()
        opt = make_optimizer(model, TrainConfig(lr=1e-4))
        fwd = torch.compile(model) if side == "llmlab compiled" else model

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = fwd(x)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(5):  # warm-up (and compilation) outside the timed chunks
        step(i)
    for _ in range(rounds):
        pacer.pause()
        for i in range(CHUNK):
            step(i)
    pacer.finish({"steps": rounds * CHUNK, "tokens": rounds * CHUNK * c["B"] * c["T"]})


def main() -> int:
    from llmlab.runtime import cpu_has_native_bf16

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--sides", help="comma-separated subset of: llmlab float32, llmlab compiled, llmlab bf16")
    ap.add_argument("--config", choices=list(CONFIGS), help="only this config")
    a = ap.parse_args()
    rounds = 8 if a.quick else 30
    sides = ["peer", "llmlab float32"] + ([] if a.no_compile else ["llmlab compiled"]) + (
        ["llmlab bf16", "peer bf16"] if cpu_has_native_bf16() else [])
    if a.sides:
        sides = ["peer"] + [s for s in a.sides.split(",") if s != "peer"]
    rows = [["config"] + [f"{s} tok/s" for s in sides] + [f"{s} / peer" for s in sides[1:]]]
    # ratio: median over rounds of peer chunk time / llmlab chunk time (same steps, same round)
    out = {}
    for name, c in CONFIGS.items():
        if a.config and name != a.config:
            continue
        res = interleave({s: (worker, (s, c, rounds)) for s in sides})
        tps = {s: r["tokens"] / r["active_s"] for s, r in res.items()}
        ratio = {s: round_ratio(res["peer"]["chunks_s"], res[s]["chunks_s"]) for s in sides[1:]}
        if "peer bf16" in res and "llmlab bf16" in res:  # both sides in bf16 autocast
            ratio["llmlab bf16 / peer bf16"] = round_ratio(res["peer bf16"]["chunks_s"], res["llmlab bf16"]["chunks_s"])
            print(f"{name}: llmlab bf16 / peer bf16 = {ratio['llmlab bf16 / peer bf16']:.2f}x")
        rows.append([name] + [f"{tps[s]:,.0f}" for s in sides] + [f"{ratio[s]:.2f}x" for s in sides[1:]])
        out[name] = {"tokens_per_s": tps, "ratio_vs_peer": ratio,
                     "ratio_of_totals": {s: tps[s] / tps["peer"] for s in sides[1:]}}
    print(table(rows))
    print("wrote", write_result("train_throughput", {"results": out, "chunk_steps": CHUNK, "rounds": rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
