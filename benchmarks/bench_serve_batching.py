"""Throughput of `llmlab serve` with continuous batching, against one-at-a-time serving and against the
`transformers serve` peer (issue 13).

Each model (an llmlab run folder, a Hugging Face folder, or a name such as smollm2) is written once as a
Hugging Face folder (llmlab.interop.export), and every side serves that same folder, each in its own process,
only ever on 127.0.0.1:

- llmlab batched: `llmlab serve FOLDER --max-batch 16` (continuous batching, the default);
- llmlab one at a time: `llmlab serve FOLDER --max-batch 1`;
- the peer: `transformers serve FOLDER --device cpu` (transformers' own OpenAI-compatible server, one request
  at a time; --peer-cb adds its paged-attention continuous batching, `--continuous-batching`).

Every setting (1, 4 and 16 concurrent clients; the peer at 1 and 16) sends the same greedy completions (prompts
of different lengths, a fixed max_tokens) through the official openai client (benchmarks/common.drive_clients,
the client loop shared with bench_serve.py). Sides take turns: in each of --rounds rounds every side serves the
whole request set once, the order alternating between rounds, so the machine's drift hits all sides alike.
Reported per side: generated tokens/s (median over rounds), p50/p99 latency (all rounds), and the ratios
batched / one at a time and llmlab batched / peer (medians over rounds of each round's ratio); "identical" says
whether every greedy reply of the batched server equals the one-at-a-time reply (the peer's agreement with
llmlab is reported too, for information: two implementations may round differently near a tie).

    .venv/bin/python benchmarks/bench_serve_batching.py RUN [RUN ...] [--requests 48 --max-tokens 32 --rounds 3]
    .venv/bin/python benchmarks/bench_serve_batching.py RUN --quick     # smoke run: few requests, not written

Writes benchmarks/results/serve_batching.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    LOOPBACK,
    drive_clients,
    free_port,
    percentile,
    start_llmlab_server,
    stop_server,
    table,
    wait_healthy,
    write_result,
)

KEY = "bench-key"
WORDS = ("the river flows past the old mill and into the quiet town where people sleep while the moon "
         "rises over the hills").split()


def prompts(n: int) -> list[str]:
    """n distinct prompts of different lengths (letters and spaces only, so a character-level model's
    vocabulary has them), so that batched rows are padded differently."""
    return [WORDS[(7 * i) % len(WORDS)] + " " + " ".join(WORDS[(i % 5):(i % 5) + 2 + (i * 5) % 14]) for i in range(n)]


def export_folder(run: str, tmp: Path) -> tuple[str, str | None]:
    """(the Hugging Face folder every side serves, why the peer cannot serve it or None)."""
    import llmlab
    from llmlab.interop import export

    model = llmlab.load(run)
    try:
        return str(export(model, tmp / "hf")), None
    except Exception as e:  # noqa: BLE001 - a family transformers has no class for: llmlab sides only
        return run, f"cannot be written as a Hugging Face folder ({e})"


class Side:
    """One server process and how to ask it for a completion."""

    def __init__(self, name: str, proc: subprocess.Popen, port: int, model: str, key: str):
        import openai

        self.name, self.proc, self.model = name, proc, model
        self.client = openai.OpenAI(base_url=f"http://{LOOPBACK}:{port}/v1", api_key=key, max_retries=0,
                                    timeout=900)

    def ask(self, prompt: str, max_tokens: int) -> tuple[str, int]:
        r = self.client.completions.create(model=self.model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return r.choices[0].text, r.usage.completion_tokens


def start_llmlab(folder: str, max_batch: int, max_tokens: int, threads: str) -> Side:
    port = free_port()
    proc = start_llmlab_server(folder, port, "--name", "bench", "--api-key", KEY, "--max-tokens", str(max_tokens),
                               "--default-max-tokens", str(max_tokens), "--max-batch", str(max_batch),
                               "--log-level", "warning", threads=threads)
    return Side(f"llmlab_batch{max_batch}", proc, port, "bench", KEY)


def start_peer(folder: str, threads: str, cb: bool) -> Side:
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [str(exe), "serve", folder, "--host", LOOPBACK, "--port", str(port), "--device", "cpu", "--dtype", "auto",
           "--log-level", "error"] + (["--continuous-batching"] if cb else [])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    wait_healthy(f"http://{LOOPBACK}:{port}/health", proc, 600, "transformers serve")
    return Side("transformers_serve" + ("_cb" if cb else ""), proc, port, folder, "unused")


def run_side(side: Side, reqs: list[str], clients: int, max_tokens: int) -> dict:
    run = drive_clients(lambda p: side.ask(p, max_tokens), reqs, clients)
    if run["errors"]:
        raise SystemExit(f"{side.name}: {len(run['errors'])} failed requests, e.g. {run['errors'][0]}")
    tokens = sum(r[1] for r in run["results"])
    return {"texts": [r[0] for r in run["results"]], "tokens": tokens, "wall_s": run["wall_s"],
            "tokens_per_s": tokens / run["wall_s"], "latencies_s": run["latencies_s"]}


def ratio(a: list[dict], b: list[dict]) -> float:
    """Median over rounds of a's tokens/s over b's in the same round."""
    return statistics.median(x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(a, b))


def bench_model(run: str, reqs: list[str], clients: list[int], peer_clients: list[int], a: argparse.Namespace
                ) -> tuple[dict, list[list[str]]]:
    tmp = Path(tempfile.mkdtemp(prefix="llmlab-bench-serve-"))
    sides: dict[str, Side] = {}
    rows = []
    try:
        folder, no_peer = export_folder(run, tmp) if not a.no_peer else (run, "--no-peer")
        sides["batched"] = start_llmlab(folder, 16, a.max_tokens, a.threads)
        sides["one_at_a_time"] = start_llmlab(folder, 1, a.max_tokens, a.threads)
        if no_peer is None:
            sides["peer"] = start_peer(folder, a.threads, a.peer_cb)
        for s in sides.values():  # warm up each server (first-call allocations, lazy imports)
            s.ask(reqs[0], a.max_tokens)
        out: dict = {"served_folder": folder if folder != run else None, "peer": sides["peer"].name if "peer" in
                     sides else None, "peer_skipped": no_peer, "settings": {}}
        for k in clients:
            names = [n for n in sides if n != "peer" or k in peer_clients]
            per: dict[str, list[dict]] = {n: [] for n in names}
            for rnd in range(a.rounds):
                for n in (names if rnd % 2 == 0 else names[::-1]):  # take turns, alternating who goes first
                    per[n].append(run_side(sides[n], reqs, k, a.max_tokens))
            same = all(b["texts"] == o["texts"] for b, o in zip(per["batched"], per["one_at_a_time"]))
            setting: dict = {"identical_greedy": same,
                             "speedup_batched_vs_one_at_a_time": ratio(per["batched"], per["one_at_a_time"])}
            if "peer" in per:
                setting["ratio_llmlab_batched_vs_peer"] = ratio(per["batched"], per["peer"])
                agree = [sum(x == y for x, y in zip(b["texts"], p["texts"])) for b, p in zip(per["batched"],
                                                                                               per["peer"])]
                setting["peer_same_text_share"] = min(agree) / len(reqs)
            for n, rounds in per.items():
                lat = [x for r in rounds for x in r["latencies_s"]]
                setting[n] = {"name": sides[n].name, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in
                                                                                       rounds),
                              "tokens_per_s_rounds": [round(r["tokens_per_s"], 2) for r in rounds],
                              "generated_tokens": rounds[0]["tokens"], "p50_s": percentile(lat, 0.5),
                              "p99_s": percentile(lat, 0.99)}
                vs = ""
                if n == "batched":
                    vs = f"{setting['speedup_batched_vs_one_at_a_time']:.2f}x vs one at a time"
                    if "ratio_llmlab_batched_vs_peer" in setting:
                        vs += f", {setting['ratio_llmlab_batched_vs_peer']:.2f}x vs peer"
                rows.append([run, str(k), sides[n].name, f"{setting[n]['tokens_per_s']:.1f}",
                             f"{setting[n]['p50_s']:.2f}", f"{setting[n]['p99_s']:.2f}",
                             str(same) if n != "peer" else f"{setting.get('peer_same_text_share', 0):.0%} same",
                             vs])
            out["settings"][str(k)] = setting
        return out, rows
    finally:
        for s in sides.values():
            stop_server(s.proc)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders, Hugging Face folders or model names (e.g. smollm2)")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--peer-clients", default="1,16", help="client counts at which the peer is measured")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="2", help="OMP_NUM_THREADS of every server (2)")
    ap.add_argument("--no-peer", action="store_true", help="llmlab's two sides only")
    ap.add_argument("--peer-cb", action="store_true", help="run transformers serve with --continuous-batching")
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 requests, 8 tokens, 1 round, 1 and 4 "
                                                         "clients; nothing written")
    a = ap.parse_args()
    if a.quick:
        a.requests, a.max_tokens, a.rounds, a.clients, a.peer_clients = 8, 8, 1, "1,4", "1,4"
    clients = [int(x) for x in a.clients.split(",")]
    peer_clients = [int(x) for x in a.peer_clients.split(",")]
    reqs = prompts(a.requests)
    results, rows = {}, [["model", "clients", "side", "tokens/s", "p50 s", "p99 s", "identical", "ratio"]]
    for run in a.runs:
        results[run], r = bench_model(run, reqs, clients, peer_clients, a)
        rows.extend(r)
    print(table(rows))
    if a.quick:
        return
    path = write_result("serve_batching", {"requests": a.requests, "max_tokens": a.max_tokens, "rounds": a.rounds,
                                           "threads": a.threads, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
