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


# ----------------------------------------------------------------------------- threads on a shared machine
# torch runs its CPU kernels on an OpenMP pool of one thread per core, and every kernel ends at a barrier
# where each thread waits for the others. When another CPU-bound process holds a core, one of the pool's
# threads is descheduled for a whole time slice (milliseconds) while its partner waits at the barrier — for a
# small model's thousands of short kernels a step, training slows by an order of magnitude. The governor below
# watches how much CPU *other* processes use and keeps the pool no larger than the cores left free.


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies of this process) from /proc, or None off Linux."""
    try:
        cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        vals = [int(v) for v in cpu]
        busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0)  # minus idle and iowait
        me = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return busy, int(me[11]) + int(me[12])  # utime + stime (fields 14, 15)
    except (OSError, ValueError, IndexError):
        return None


def usable_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class ThreadGovernor:
    """Sets torch's thread count, every `interval` seconds, to the cores other processes leave free
    (at least 1, at most `max_threads` or the usable cores): used when training's `threads` is 0 (auto)."""

    def __init__(self, interval: float = 2.0, max_threads: int = 0):
        import time

        self.clock = time.monotonic
        self.interval = interval
        self.max = max_threads or usable_cores()
        self.last_t = self.clock()
        self.last = _busy_jiffies()
        self.threads = torch.get_num_threads()
        self.changes: list[tuple[float, int]] = []

    def others_busy(self) -> float | None:
        """Cores' worth of CPU used by other processes since the last look (None when it cannot tell)."""
        now, cur = self.clock(), _busy_jiffies()
        if cur is None or self.last is None or now - self.last_t <= 0:
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        total = (cur[0] - self.last[0]) / hz
        mine = (cur[1] - self.last[1]) / hz
        wall = now - self.last_t
        self.last_t, self.last = now, cur
        return max(0.0, (total - mine) / wall)

    def update(self) -> int:
        """Look again if `interval` has passed; return the thread count in force."""
        if self.clock() - self.last_t < self.interval:
            return self.threads
        busy = self.others_busy()
        if busy is None:
            return self.threads
        want = max(1, min(self.max, int(round(usable_cores() - busy))))
        if want != self.threads:
            torch.set_num_threads(want)
            self.threads = want
            self.changes.append((self.clock(), want))
        return self.threads
