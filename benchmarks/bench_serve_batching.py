"""Throughput of `llmlab serve` with continuous batching against one-at-a-time serving (issue 13).

For each model (an llmlab run folder, or a name such as smollm2) and each side (`--max-batch 16`: batched;
`--max-batch 1`: one at a time), a server is started in its own process (only ever on 127.0.0.1) and driven
by 1, 4 and 16 concurrent clients (the official openai client), each sending greedy completions of a fixed
length. Reported per setting: generated tokens/s, p50/p99 latency, and whether every reply equals the
batched=1 reply to the same prompt (identical greedy outputs). Sides take turns; run it on a quiet machine.

    .venv/bin/python benchmarks/bench_serve_batching.py RUN [RUN ...] [--requests 48 --max-tokens 32]

Writes benchmarks/results/serve_batching.json. Not done here: the `transformers serve` peer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import KEY, free_port  # noqa: E402
from common import table, write_result  # noqa: E402


def start(run: str, port: int, max_batch: int, max_tokens: int):  # noqa: ANN201
    import os
    import subprocess

    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.Popen([sys.executable, "-m", "llmlab", "serve", run, "--port", str(port), "--name", "bench",
                             "--api-key", KEY, "--max-tokens", str(max_tokens), "--default-max-tokens", str(max_tokens),
                             "--max-batch", str(max_batch), "--log-level", "warning"], env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            raise SystemExit(f"the server for {run} exited before it started")
    proc.kill()
    raise SystemExit("the server did not start in 300 s")


def prompts(n: int) -> list[str]:
    """Prompts of different lengths, so batched rows are padded differently."""
    words = "the river flows past the old mill and into the quiet town where people sleep".split()
    return [f"{i}: " + " ".join(words[: 2 + (i * 5) % len(words)]) for i in range(n)]


def drive(port: int, reqs: list[str], clients: int, max_tokens: int) -> dict:
    import openai

    c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=600)

    def one(p: str) -> tuple[str, int, float]:
        t = time.perf_counter()
        r = c.completions.create(model="bench", prompt=p, max_tokens=max_tokens, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens, time.perf_counter() - t

    one(reqs[0])  # warm up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, reqs))
    wall = time.perf_counter() - t0
    lat = sorted(x[2] for x in out)
    return {"texts": [x[0] for x in out], "tokens": sum(x[1] for x in out), "wall_s": wall,
            "tokens_per_s": sum(x[1] for x in out) / wall, "p50_s": statistics.median(lat),
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run folders or model names (e.g. smollm2)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16")
    a = ap.parse_args()
    clients = [int(x) for x in a.clients.split(",")]
    reqs = prompts(a.requests)
    results: dict = {}
    rows = [["model", "clients", "side", "tokens/s", "p50 s", "p99 s", "identical", "speed-up"]]
    for run in a.runs:
        results[run] = {}
        for k in clients:
            sides = {}
            for side, mb in (("one_at_a_time", 1), ("batched", 16)):  # sides take turns, each its own process
                port = free_port()
                proc = start(run, port, mb, a.max_tokens)
                try:
                    sides[side] = drive(port, reqs, k, a.max_tokens)
                finally:
                    proc.terminate()
                    proc.wait(timeout=30)
            same = sides["batched"]["texts"] == sides["one_at_a_time"]["texts"]
            speed = sides["batched"]["tokens_per_s"] / sides["one_at_a_time"]["tokens_per_s"]
            results[run][str(k)] = {s: {x: v for x, v in d.items() if x != "texts"} for s, d in sides.items()}
            results[run][str(k)].update(identical_greedy=same, speedup=speed)
            for s, d in sides.items():
                rows.append([run, str(k), s, f"{d['tokens_per_s']:.1f}", f"{d['p50_s']:.2f}", f"{d['p99_s']:.2f}",
                             str(same), f"{speed:.2f}x" if s == "batched" else ""])
    print(table(rows))
    path = write_result("serve_batching", {"requests": a.requests, "max_tokens": a.max_tokens, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
