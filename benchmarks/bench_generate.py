"""Generation speed (new tokens/s, greedy, KV cache, batch 1): llmlab vs transformers' `generate` on the
same weights, at the tiny config and at the GPT-2-small shape. Also checks both produce the same tokens.

    .venv/bin/python benchmarks/bench_generate.py [--quick]
"""

from __future__ import annotations

import argparse
import sys

import torch

from common import hf_gpt2, llmlab_from_hf, median_time, table, write_result
from llmlab.generate.causal import GenerationConfig, generate_ids

SHAPES = {"tiny 4x4x128, V65": dict(n_layer=4, n_head=4, n_embd=128, vocab=65, pos=256, new=200),
          "gpt2-small 12x12x768, V50257": dict(n_layer=12, n_head=12, n_embd=768, vocab=50257, pos=1024, new=50)}


def measure(s: dict, repeats: int) -> dict:
    hf = hf_gpt2(s["n_layer"], s["n_head"], s["n_embd"], s["vocab"], s["pos"]).eval()
    ours = llmlab_from_hf(hf).eval()
    prompt = torch.randint(0, s["vocab"], (1, 10), generator=torch.Generator().manual_seed(1))
    n = s["new"]
    results = {}
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0)

    def peer() -> None:
        with torch.inference_mode():
            results["peer"] = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, use_cache=True)[0, 10:].tolist()

    def mine() -> None:
        results["ours"] = generate_ids(ours, [prompt[0].tolist()], cfg)[0]

    tp = median_time(peer, repeats, warmup=1)
    to = median_time(mine, repeats, warmup=1)
    return {"peer_tok_s": n / tp, "llmlab_tok_s": n / to, "ratio": tp / to,
            "same_tokens": results["peer"] == results["ours"]}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    repeats = 2 if a.quick else 5
    rows = [["shape", "new tokens", "peer tok/s", "llmlab tok/s", "ratio", "same tokens"]]
    out = {}
    for name, s in SHAPES.items():
        r = measure(s, repeats)
        rows.append([name, str(s["new"]), f"{r['peer_tok_s']:,.1f}", f"{r['llmlab_tok_s']:,.1f}",
                     f"{r['ratio']:.2f}x", str(r["same_tokens"])])
        out[name] = r
    print(table(rows))
    print("wrote", write_result("generate", out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
