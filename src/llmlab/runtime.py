"""Process and hardware settings for fast training on a CPU: the C allocator, and whether bf16 pays."""

from __future__ import annotations

import ctypes
import os
import sys
from functools import cache
from pathlib import Path

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to the system.

    A training step frees and reallocates the same activation-sized blocks every step; glibc's defaults
    give large blocks back to the kernel (munmap, heap trim), so each step page-faults its buffers in again:
    hundreds to thousands of faults a step, about 5% of a small model's step time on this project's 2-core
    machine. Does nothing when the user set MALLOC_TRIM_THRESHOLD_ / MALLOC_MMAP_THRESHOLD_ or the C
    library is not glibc. Returns whether the settings were applied."""
    if not sys.platform.startswith("linux") or any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_",
                                                                           "MALLOC_MMAP_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX), where bf16 autocast
    roughly halves matmul time; elsewhere bf16 is emulated and slower than float32."""
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str) -> str:
    """The training dtype for a config value: "auto" is bfloat16 (autocast) where the CPU has native bf16
    matmuls, else float32; other values are returned as given."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def autocast(dtype: str) -> torch.autocast:
    """The autocast context of a training dtype: bf16 autocast on the CPU for "bfloat16", a no-op otherwise."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16")
