"""Model FLOP utilisation of llmlab's training step against this machine's measured matmul peak (fp32
and bf16, measured in this script).

FLOPs per trained token ~ 6 N + 12 L T C (Kaplan et al. 2020; Chowdhery et al. 2022, appendix B):
N = non-embedding parameters + the LM head, L layers, T context, C width.

    .venv/bin/python benchmarks/bench_mfu.py
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from common import median_time, table, write_result
from llmlab.config import ModelConfig
from llmlab.models import GPT

CONFIGS = {"tiny 4x4x128 B12 T64": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65), 12),
           "small 6x6x384 B8 T256": (dict(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=65), 8)}


def matmul_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 3.0) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - t0)


def flops_per_token(cfg: ModelConfig) -> float:
    C, L, T = cfg.n_embd, cfg.n_layer, cfg.block_size
    n = 12 * L * C * C + cfg.vocab_size * C  # blocks (attention 4C^2 + MLP 8C^2) + LM head
    return 6 * n + 12 * L * T * C


def main() -> int:
    from llmlab.runtime import keep_freed_memory
    from llmlab.train.config import TrainConfig
    from llmlab.train.loop import make_optimizer

    keep_freed_memory()  # as llmlab's trainer does
    peaks = {"float32": matmul_peak(torch.float32), "bfloat16": matmul_peak(torch.bfloat16)}
    rows = [["config", "dtype", "tokens/s", "achieved GFLOP/s", "peak GFLOP/s", "MFU"]]
    out = {"peak_gflops": {k: v / 1e9 for k, v in peaks.items()}, "runs": {}}
    for name, (kw, B) in CONFIGS.items():
        cfg = ModelConfig(**kw)
        for dtype in ("float32", "bfloat16"):
            torch.manual_seed(0)
            model = GPT(cfg).train()
            opt = make_optimizer(model, TrainConfig(lr=1e-4))  # the trainer's optimizer
            x = torch.randint(0, cfg.vocab_size, (B, cfg.block_size + 1))

            def step(model=model, opt=opt, x=x, dtype=dtype, cfg=cfg) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
                    logits = model(x[:, :-1])
                loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            tps = B * cfg.block_size / median_time(step, 10, warmup=3)
            achieved = tps * flops_per_token(cfg)
            mfu = achieved / peaks[dtype]
            rows.append([name, dtype, f"{tps:,.0f}", f"{achieved / 1e9:.1f}", f"{peaks[dtype] / 1e9:.1f}",
                         f"{100 * mfu:.1f}%"])
            out["runs"][f"{name} {dtype}"] = {"tokens_per_s": tps, "achieved_gflops": achieved / 1e9, "mfu": mfu}
    print(table(rows))
    print("wrote", write_result("mfu", out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
