"""Learning per second on character-level tinyshakespeare (first 90% train, last 10% val, as nanoGPT).

Peer: nanoGPT's documented CPU recipe (4 layers, 4 heads, width 128, block 64, batch 12, 2000 iterations,
lr 1e-3 -> 1e-4 cosine, warmup 100, AdamW beta2 0.99, weight decay 0.1, clip 1.0, fp32), run here on
transformers' GPT2LMHeadModel with nanoGPT's training loop (nanoGPT itself is not installable offline).
On this machine nanoGPT's own run is documented at about 110 s, val loss 1.886, ~16,000 tokens/s.

llmlab: `llmlab train --preset shakespeare --max-time 110` (the same 110 s of wall time), and the identical
4x4x128 recipe through llmlab's trainer for a tokens/s comparison. Every final model is scored on the same
fixed 200 validation batches.

    .venv/bin/python benchmarks/bench_shakespeare.py [--budget 110] [--skip-peer]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import SHARED_DATA, hf_gpt2, table, write_result

DATA = SHARED_DATA / "tinyshakespeare.txt"


def char_ids(text: str, stoi: dict[str, int]) -> np.ndarray:
    return np.array([stoi[c] for c in text], dtype=np.int64)


def fixed_val_loss(forward, val: np.ndarray, block: int = 64, batch: int = 12, n: int = 200) -> float:  # noqa: ANN001
    g = torch.Generator().manual_seed(1234)
    losses = []
    with torch.no_grad():
        for _ in range(n):
            ix = torch.randint(len(val) - block - 1, (batch,), generator=g).tolist()
            x = torch.from_numpy(np.stack([val[i:i + block] for i in ix]))
            y = torch.from_numpy(np.stack([val[i + 1:i + 1 + block] for i in ix]))
            logits = forward(x)
            losses.append(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).item())
    return sum(losses) / len(losses)


def run_peer(train: np.ndarray, val: np.ndarray, vocab: int, iters: int = 2000) -> dict:
    """nanoGPT's CPU recipe, its loop written out, on transformers' GPT-2."""
    torch.manual_seed(1337)
    model = hf_gpt2(4, 4, 128, vocab, 64, seed=1337).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    nodecay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": nodecay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    B, T, warmup, lr0, lr_min = 12, 64, 100, 1e-3, 1e-4

    def lr_at(it: int) -> float:
        if it < warmup:
            return lr0 * (it + 1) / (warmup + 1)
        r = (it - warmup) / (iters - warmup)
        return lr_min + 0.5 * (1 + math.cos(math.pi * r)) * (lr0 - lr_min)

    t0 = time.perf_counter()
    for it in range(iters):
        if it % 250 == 0:  # nanoGPT evaluates every 250 steps on 20 batches of each split
            model.eval()
            fixed_val_loss(lambda x: model(x).logits, val, n=20)
            fixed_val_loss(lambda x: model(x).logits, train, n=20)
            model.train()
        for grp in opt.param_groups:
            grp["lr"] = lr_at(it)
        ix = torch.randint(len(train) - T - 1, (B,)).tolist()
        x = torch.from_numpy(np.stack([train[i:i + T] for i in ix]))
        y = torch.from_numpy(np.stack([train[i + 1:i + 1 + T] for i in ix]))
        logits = model(x).logits
        loss = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - t0
    model.eval()
    return {"wall_s": wall, "iters": iters, "tokens_per_s": iters * B * T / wall,
            "val_loss": fixed_val_loss(lambda x: model(x).logits, val)}


def run_llmlab(preset: str, overrides: dict, budget: float | None) -> dict:
    import llmlab
    from llmlab.train import resolve_config, train

    cfg = resolve_config(preset, None, {"data": str(DATA), "num_samples": 0, **overrides,
                                        **({"max_time": budget} if budget else {})})
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = train(cfg, d + "/run")
        wall = time.perf_counter() - t0
        model = llmlab.load(d + "/run")
        stoi = {model.tokenizer.id_to_token(i): i for i in range(model.tokenizer.vocab_size)}
    return {"wall_s_total": wall, "train_wall_s": res.elapsed, "iters": res.step, "tokens_per_s": res.tokens_per_s,
            "best_val_loss_trainer": res.best_val_loss, "model": model, "stoi": stoi, "stopped_by": res.stopped_by}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=110.0)
    ap.add_argument("--skip-peer", action="store_true")
    a = ap.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} is absent")
        return 0
    text = DATA.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(0.9 * len(text))
    train_ids, val_ids = char_ids(text[:n], stoi), char_ids(text[n:], stoi)
    out: dict = {}
    rows = [["run", "wall s", "iters", "tokens/s", "val loss (fixed 200 batches)"]]
    if not a.skip_peer:
        peer = run_peer(train_ids, val_ids, len(chars))
        out["peer_nanogpt_recipe"] = peer
        rows.append(["peer: nanoGPT CPU recipe on HF GPT-2", f"{peer['wall_s']:.1f}", "2000",
                     f"{peer['tokens_per_s']:,.0f}", f"{peer['val_loss']:.4f}"])
    for label, preset, ov, budget in (
            ("llmlab: same 4x4x128 recipe", "shakespeare",
             dict(batch_size=12, max_iters=2000, lr=1e-3, min_lr=1e-4, warmup_iters=100, eval_interval=250,
                  eval_iters=20, compile=False), None),
            (f"llmlab: --preset shakespeare --max-time {a.budget:.0f}", "shakespeare", {}, a.budget)):
        r = run_llmlab(preset, ov, budget)
        model, vocab = r.pop("model"), r.pop("stoi")
        remap = np.array([vocab[c] for c in chars])  # dataset ids -> the run's tokenizer ids
        r["val_loss"] = fixed_val_loss(model, remap[val_ids])
        out[label] = r
        rows.append([label, f"{r['train_wall_s']:.1f}", str(r["iters"]), f"{r['tokens_per_s']:,.0f}",
                     f"{r['val_loss']:.4f}"])
    print(table(rows))
    if "peer_nanogpt_recipe" in out:
        same = out["llmlab: same 4x4x128 recipe"]["tokens_per_s"] / out["peer_nanogpt_recipe"]["tokens_per_s"]
        print(f"tokens/s, identical 4x4x128 recipe: llmlab / peer = {same:.2f}x "
              f"(vs nanoGPT's documented 16,000 tokens/s: "
              f"{out['llmlab: same 4x4x128 recipe']['tokens_per_s'] / 16000:.2f}x)")
        out["ratio_tokens_per_s_same_recipe"] = same
    print("wrote", write_result("shakespeare", out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
