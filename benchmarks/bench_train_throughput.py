"""Training throughput (tokens/s): llmlab's GPT vs transformers' GPT2LMHeadModel at the same config, same
weights, same batches, one fwd+bwd+AdamW step per measurement. The peer uses torch's default AdamW; llmlab
uses its trainer's optimizer (fused AdamW), eager and with torch.compile.

    .venv/bin/python benchmarks/bench_train_throughput.py [--quick]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import hf_gpt2, llmlab_from_hf, median_time, table, write_result
from llmlab.train import TrainConfig, make_optimizer

CONFIGS = {"tiny 4x4x128 (B12 T64, V65)": dict(n_layer=4, n_head=4, n_embd=128, vocab=65, T=64, B=12),
           "small 6x6x384 (B8 T128, V65)": dict(n_layer=6, n_head=6, n_embd=384, vocab=65, T=128, B=8)}


def step_fn(model, opt, batches, hf: bool):  # noqa: ANN001, ANN201
    it = iter(range(10**9))

    def step() -> None:
        x, y = batches[next(it) % len(batches)]
        logits = model(x).logits if hf else model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    a = ap.parse_args()
    repeats = 5 if a.quick else 20
    rows = [["config", "peer tok/s", "llmlab eager tok/s", "ratio", "llmlab compiled tok/s", "ratio"]]
    out = {}
    for name, c in CONFIGS.items():
        hf = hf_gpt2(c["n_layer"], c["n_head"], c["n_embd"], c["vocab"], 256).train()
        ours = llmlab_from_hf(hf).train()
        g = torch.Generator().manual_seed(0)
        batches = []
        for _ in range(8):
            x = torch.randint(0, c["vocab"], (c["B"], c["T"] + 1), generator=g)
            batches.append((x[:, :-1], x[:, 1:]))
        tokens = c["B"] * c["T"]
        res = {}
        opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)  # the peer's usual optimizer (torch default)
        res["peer"] = tokens / median_time(step_fn(hf, opt, batches, True), repeats, warmup=3)
        opt = make_optimizer(ours, TrainConfig(lr=1e-4))  # llmlab's trainer optimizer (fused AdamW)
        res["eager"] = tokens / median_time(step_fn(ours, opt, batches, False), repeats, warmup=3)
        if not a.no_compile:
            ours_c = llmlab_from_hf(hf).train()
            opt = make_optimizer(ours_c, TrainConfig(lr=1e-4))
            res["compiled"] = tokens / median_time(step_fn(torch.compile(ours_c), opt, batches, False), repeats,
                                                   warmup=3)
        comp = res.get("compiled", float("nan"))
        rows.append([name, f"{res['peer']:,.0f}", f"{res['eager']:,.0f}", f"{res['eager'] / res['peer']:.2f}x",
                     f"{comp:,.0f}", f"{comp / res['peer']:.2f}x"])
        out[name] = res
    print(table(rows))
    print("wrote", write_result("train_throughput", {"tokens_per_s": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
