"""Shared helpers for the benchmarks: peer models, timing, and result files."""

from __future__ import annotations

import json
import math
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


_LOAD_AT_START = os.getloadavg()[0]  # when the benchmark's process imported this module


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "loadavg_start": _LOAD_AT_START}


def write_result(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {**data, "machine": machine(), "loadavg_end": os.getloadavg()[0], "when": time.strftime("%Y-%m-%d %H:%M")}
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def table(rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


# ----------------------------------------------------------------------------- side-by-side timing
# This machine's speed drifts 10-20% within a minute, so running the peer's whole run and then llmlab's
# compares two different machines. Instead each side runs in its own process and they take turns: the
# driver lets one worker run a chunk (a few training steps) while the others wait, and each worker counts
# only its own running time. Drift then hits both sides alike, and process-level settings stay each side's.


class Pacer:
    """Worker side of interleave(): pause() blocks until the driver's turn comes round and times the work
    done between pauses; finish() reports the total and the worker's result."""

    def __init__(self, conn):  # noqa: ANN001
        self.conn, self.active, self.t = conn, 0.0, None

    def pause(self) -> None:
        now = time.perf_counter()
        if self.t is None:
            self.conn.send(("ready",))
        else:
            self.active += now - self.t
            self.conn.send(("chunk", now - self.t))
        self.conn.recv()
        self.t = time.perf_counter()

    def running_s(self) -> float:
        """This worker's running time so far (the current chunk included)."""
        return self.active + (time.perf_counter() - self.t if self.t is not None else 0.0)

    def finish(self, result: dict) -> None:
        total = self.running_s()
        self.conn.send(("done", total, result, total - self.active))


def interleave(workers: dict[str, tuple[Callable, tuple]]) -> dict[str, dict]:
    """Run each worker fn(pacer, *args) in its own process, one chunk at a time in turn; return each
    worker's result with "active_s" (its own running time) and "chunks_s" (each chunk's time) added."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs, conns = {}, {}
    for name, (fn, args) in workers.items():
        parent, child = ctx.Pipe()
        procs[name] = ctx.Process(target=_worker_main, args=(fn, child, args), daemon=True)
        procs[name].start()
        conns[name] = parent
    for name, c in conns.items():  # setup (data, model, compilation) is done before the first pause
        msg = c.recv()
        if msg[0] == "error":
            raise RuntimeError(f"{name}: {msg[1]}")
    results: dict[str, dict] = {}
    chunks: dict[str, list[float]] = {name: [] for name in workers}
    names, rnd = list(conns), 0
    while len(results) < len(workers):
        rnd += 1
        for name in names if rnd % 2 else names[::-1]:  # alternate who goes first
            c = conns[name]
            if name in results:
                continue
            c.send("go")
            msg = c.recv()
            if msg[0] == "error":
                raise RuntimeError(f"{name}: {msg[1]}")
            chunks[name].append(msg[1] if msg[0] == "chunk" else msg[3])
            if msg[0] == "done":
                results[name] = {**msg[2], "active_s": msg[1], "chunks_s": chunks[name]}
    for p in procs.values():
        p.join(timeout=30)
    return results


def round_ratio(peer_chunks: list[float], ours_chunks: list[float]) -> float:
    """Median over rounds of peer time / llmlab time for the same work in the same round (robust to the
    machine's bursts, which a ratio of totals is not)."""
    pairs = [p / o for p, o in zip(peer_chunks, ours_chunks) if p > 0 and o > 0]
    return statistics.median(pairs) if pairs else float("nan")


def _worker_main(fn: Callable, conn, args: tuple) -> None:  # noqa: ANN001
    import traceback

    try:
        fn(Pacer(conn), *args)
    except BaseException as e:  # noqa: BLE001 - reported to the driver
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


# ----------------------------------------------------------------------------- HTTP servers and their clients
# Shared by bench_serve.py and bench_serve_batching.py: servers run in their own processes, only ever on
# 127.0.0.1, and are driven by a fixed number of concurrent client threads.

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc, timeout: float = 300.0, what: str = "the server") -> None:  # noqa: ANN001
    """Wait until GET url answers 200; SystemExit if proc exits first or the time runs out."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited (status {proc.returncode}) before it answered {url}")
        time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f} s")


def start_llmlab_server(run: str, port: int, *args: str, threads: str | None = None,  # noqa: ANN201
                        timeout: float = 300.0):
    """`python -m llmlab serve RUN --host 127.0.0.1 --port PORT *args` in its own process, once /health answers.
    threads sets OMP_NUM_THREADS (default: inherited, else 2)."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": threads or os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", run, "--host", LOOPBACK, "--port", str(port),
                             *args], env=env)
    wait_healthy(f"http://{LOOPBACK}:{port}/health", proc, timeout, f"llmlab serve {run}")
    return proc


def stop_server(proc) -> None:  # noqa: ANN001
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except Exception:  # noqa: BLE001 - it must go
        proc.kill()
        proc.wait(timeout=30)


def drive_clients(call: Callable, items: list, clients: int) -> dict:
    """call(item) for every item, from `clients` concurrent threads (the client loop of the serving
    benchmarks). Returns, in item order, "results" (None where the call raised), "errors" (one line each),
    "latencies_s" (of the calls that succeeded) and the "wall_s" of the whole run."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    results: list = [None] * len(items)
    latency: list = [None] * len(items)
    errors: list[str] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        t = time.perf_counter()
        try:
            results[i] = call(items[i])
        except Exception as e:  # noqa: BLE001 - every failure is counted
            with lock:
                errors.append(f"{type(e).__name__}: {e}"[:200])
            return
        latency[i] = time.perf_counter() - t

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(len(items))))
    wall = time.perf_counter() - t0
    return {"results": results, "errors": errors, "latencies_s": [x for x in latency if x is not None],
            "wall_s": wall}


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of values by the nearest-rank rule (None when empty)."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))]
