"""Shared helpers for the benchmarks: peer models, timing, and result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def hf_gpt2(n_layer: int, n_head: int, n_embd: int, vocab: int, n_positions: int, seed: int = 0):  # noqa: ANN201
    """A random-initialised transformers GPT2LMHeadModel (the peer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=n_positions,
                     bos_token_id=None, eos_token_id=None, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def llmlab_from_hf(hf) -> torch.nn.Module:  # noqa: ANN001
    """The same weights as an llmlab GPT."""
    from llmlab.interop import gpt2_from_hf

    return gpt2_from_hf(hf.config.to_dict(), hf.state_dict())


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "loadavg_start": os.getloadavg()[0]}


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {**data, "machine": machine(), "loadavg_end": os.getloadavg()[0], "when": time.strftime("%Y-%m-%d %H:%M")}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)
