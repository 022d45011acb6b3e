"""CPU speed settings: bf16 attention computed in float32 on CPUs, dtype "auto", and the allocator setting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llmlab import runtime
from llmlab.attention import MultiHeadAttention, fused_attention
from llmlab.errors import ConfigError
from llmlab.train.config import PRESETS, resolve_config
from llmlab.train.loop import train


def _qkv(dtype: torch.dtype, T: int = 16) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, 4, T, 8, generator=g).to(dtype).requires_grad_() for _ in range(3))


@pytest.mark.parametrize("causal", [True, False])
def test_fused_attention_bf16_matches_float32_reference(causal: bool) -> None:
    q, k, v = _qkv(torch.bfloat16)
    drop = torch.rand(16, 16, generator=torch.Generator().manual_seed(1)) < 0.3
    mask = None if causal else torch.zeros(16, 16).masked_fill(drop, float("-inf")).fill_diagonal_(0)
    y = fused_attention(q, k, v, is_causal=causal, attn_mask=mask if mask is None else mask.bfloat16())
    assert y.dtype == torch.bfloat16  # the caller's dtype comes back
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal, attn_mask=mask)
    assert torch.allclose(y.float(), ref, atol=1e-2)
    y.float().sum().backward()  # gradients reach the bf16 inputs in their dtype
    assert q.grad is not None and q.grad.dtype == torch.bfloat16


def test_fused_attention_under_autocast_runs_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """autocast would cast the inputs of scaled_dot_product_attention down to bf16, where torch's CPU kernels
    are several times slower; fused_attention must hand the kernel float32 inputs."""
    seen = []
    real = F.scaled_dot_product_attention

    def spy(q: torch.Tensor, *a: object, **kw: object) -> torch.Tensor:
        seen.append((q.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    mha = MultiHeadAttention(32, 4)
    x = torch.randn(2, 8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = mha(x, is_causal=True)
    assert seen == [(torch.float32, False)]
    assert out.dtype == torch.bfloat16  # what autocast's linear layers produce, as without the detour
    ref, _ = mha(x, is_causal=True)
    assert torch.allclose(out.float(), ref, atol=3e-2)


def test_float32_attention_is_untouched() -> None:
    q, k, v = _qkv(torch.float32)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(fused_attention(q, k, v, is_causal=True), ref)


def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.resolve_dtype("float32") == "float32" and runtime.resolve_dtype("bfloat16") == "bfloat16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    assert runtime.resolve_dtype("auto") == "bfloat16"
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert runtime.resolve_dtype("auto") == "float32"


@pytest.mark.parametrize("native, task, expected", [(False, "lm", "float32"), (True, "lm", "bfloat16"),
                                                     (True, "mlm", "float32")])
def test_auto_dtype_is_recorded_resolved(native: bool, task: str, expected: str, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    """auto is bf16 only for GPT LM training on a CPU with native bf16; the run's config.json says which."""
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "c.txt"
    corpus.write_text("the cat sat on the mat. " * 200)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: native)
    arch = {"lm": "gpt", "mlm": "bert"}[task]
    cfg = resolve_config(None, None, dict(data=str(corpus), arch=arch, n_layer=1, n_head=2, n_embd=16, block_size=16,
                                          batch_size=4, max_iters=2, eval_interval=2, eval_iters=1, num_samples=0,
                                          dtype="auto"))
    train(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["dtype"] == expected
    assert all(PRESETS[p]["train"]["dtype"] == "auto" for p in PRESETS)
    with pytest.raises(ConfigError, match="float32, bfloat16, auto"):
        resolve_config(None, None, {"dtype": "fp8"})


FAULTS = """
import resource, sys, torch
from llmlab import runtime
if sys.argv[1] == "keep":
    assert runtime.keep_freed_memory()
def steps():  # a 48 MiB block allocated and freed, five times: glibc's defaults always mmap blocks over 32 MiB
    for _ in range(5):
        torch.empty(48 << 20, dtype=torch.uint8).fill_(1)
steps()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
steps()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_stops_page_faults_from_reallocation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert runtime.keep_freed_memory() is False  # the user's own setting wins
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    if not runtime.keep_freed_memory():
        pytest.skip("not glibc")
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                                       check=True).stdout) for mode in ("default", "keep")}
    # 48 MiB fresh is 12,288 pages: the defaults fault all five in, the setting mostly reuses the heap
    assert faults["keep"] * 2 < faults["default"], faults
