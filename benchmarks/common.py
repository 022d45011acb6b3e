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
