"""Learning per second on character-level tinyshakespeare (first 90% train, last 10% val, as nanoGPT).

Peer: real nanoGPT (karpathy/nanoGPT, its own train.py and model.py, commit 3adf61e) running its documented
CPU recipe (4 layers, 4 heads, width 128, block 64, batch 12, 2000 iterations, lr 1e-3 -> 1e-4 cosine, warmup
100, AdamW beta2 0.99, weight decay 0.1, clip 1.0, fp32, log every step), from a checkout named by
$NANOGPT_DIR or --nanogpt DIR (never committed here; fetch it and unpack it anywhere). nanoGPT's train.py
runs unmodified in its own process; it is paced by wrapping `time.time`, which its loop calls once per step.
Without a checkout the peer is a labelled stand-in: transformers' GPT2LMHeadModel driven by nanoGPT's loop
written out here ("stand-in"), which is slower than real nanoGPT.

llmlab: the identical 4x4x128 recipe through llmlab's trainer (float32, and bf16 autocast where the CPU has
native bf16) for a tokens/s comparison, and `llmlab train --preset shakespeare --max-time 110` (the same 110 s
of wall time) for learning per second. The identical recipes run side by side: each in its own process,
taking turns 10 steps at a time (common.interleave), so the machine's drift hits them alike; the ratio is the
median over turns of peer time / llmlab time. The preset run has the machine to itself. Every final model is
scored on the same fixed 200 validation batches.

    NANOGPT_DIR=/path/to/nanoGPT .venv/bin/python benchmarks/bench_shakespeare.py [--budget 110] [--skip-peer]
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import runpy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common import SHARED_DATA, Pacer, hf_gpt2, interleave, round_ratio, table, write_result

DATA = SHARED_DATA / "tinyshakespeare.txt"
CHUNK = 10  # steps per turn when the identical recipes take turns


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


def load_data() -> tuple[list[str], np.ndarray, np.ndarray]:
    text = DATA.read_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(0.9 * len(text))
    return chars, char_ids(text[:n], stoi), char_ids(text[n:], stoi)


def peer_worker(pacer: Pacer, iters: int = 2000) -> None:
    """nanoGPT's CPU recipe, its loop written out, on transformers' GPT-2 (pausing every CHUNK steps)."""
    chars, train, val = load_data()
    vocab = len(chars)
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

    for it in range(iters):
        if it % CHUNK == 0:
            pacer.pause()
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
    wall = pacer.running_s()
    model.eval()
    pacer.finish({"train_wall_s": wall, "iters": iters, "tokens": iters * B * T,
                  "val_loss": fixed_val_loss(lambda x: model(x).logits, val)})


NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
                "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
                "--max_iters=2000", "--lr_decay_iters=2000", "--dropout=0.0", "--dtype=float32"]  # nanoGPT's README


def nanogpt_worker(pacer: Pacer, root: str) -> None:
    """Real nanoGPT's train.py on its CPU recipe, in a scratch folder laid out as its prepare.py would."""
    chars, train, val = load_data()
    work = Path(tempfile.mkdtemp(prefix="nanogpt-"))
    data = work / "data" / "shakespeare_char"
    data.mkdir(parents=True)
    train.astype(np.uint16).tofile(data / "train.bin")
    val.astype(np.uint16).tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:  # the vocabulary file nanoGPT's prepare.py writes
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                     "stoi": {c: i for i, c in enumerate(chars)}}, f)
    (work / "configurator.py").write_text((Path(root) / "configurator.py").read_text())  # train.py exec()s it from cwd
    (work / "config").mkdir()
    (work / "config" / "train_shakespeare_char.py").write_text((Path(root) / "config/train_shakespeare_char.py")
                                                               .read_text())
    os.chdir(work)
    sys.path.insert(0, root)
    sys.argv = ["train.py", *NANOGPT_ARGS, f"--out_dir={work / 'out'}"]
    real_time, calls = time.time, [0]

    def paced_time() -> float:  # train.py calls time.time() once before its loop and once per step
        if calls[0] % CHUNK == 0:
            pacer.pause()
        calls[0] += 1
        return real_time()

    time.time = paced_time
    try:
        runpy.run_path(str(Path(root) / "train.py"), run_name="__main__")
    finally:
        time.time = real_time
    wall = pacer.running_s()
    from model import GPT, GPTConfig  # nanoGPT's model.py

    ck = torch.load(work / "out" / "ckpt.pt", map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ck["model_args"]))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ck["model"].items()})
    model.eval()
    pacer.finish({"train_wall_s": wall, "iters": 2000, "tokens": 2000 * 12 * 64, "peer": "nanoGPT 3adf61e",
                  "val_loss": fixed_val_loss(lambda x: model(x, torch.zeros_like(x))[0], val)})


def nanogpt_dir(arg: str | None) -> str | None:
    """The nanoGPT checkout to run (--nanogpt, else $NANOGPT_DIR), if it holds train.py and model.py."""
    d = arg or os.environ.get("NANOGPT_DIR")
    if d and (Path(d) / "train.py").is_file() and (Path(d) / "model.py").is_file():
        return str(Path(d).resolve())
    if d:
        print(f"warning: {d} has no nanoGPT train.py/model.py; using the stand-in peer")
    return None


def llmlab_worker(pacer: Pacer, preset: str, overrides: dict, budget: float | None) -> None:
    """llmlab's trainer (pausing at each of its log events), then the fixed-batch validation loss."""
    import llmlab
    from llmlab.train.config import resolve_config
    from llmlab.train.loop import train

    chars, _, val = load_data()
    cfg = resolve_config(preset, None, {"data": str(DATA), "num_samples": 0, "log_interval": CHUNK, **overrides,
                                        **({"max_time": budget} if budget else {})})

    def on_event(event: str, info: dict) -> None:
        if event in ("start", "log") and info.get("step", 0) < cfg.train.max_iters:
            pacer.pause()

    with tempfile.TemporaryDirectory() as d:
        res = train(cfg, d + "/run", callback=on_event)
        wall = pacer.running_s()
        model = llmlab.load(d + "/run")
    vocab = {model.tokenizer.id_to_token(i): i for i in range(model.tokenizer.vocab_size)}
    remap = np.array([vocab[c] for c in chars])  # dataset ids -> the run's tokenizer ids
    pacer.finish({"train_wall_s": wall, "iters": res.step,
                  "tokens": res.step * cfg.train.batch_size * cfg.model.block_size,
                  "val_loss": fixed_val_loss(model, remap[val]), "best_val_loss_trainer": res.best_val_loss,
                  "stopped_by": res.stopped_by, "dtype": cfg.train.dtype})


# nanoGPT's recipe on llmlab's trainer. The preset's wall-time budget is switched off (the identical recipe
# runs its 2000 steps on a step schedule), and the threads are fixed at torch's default, 2, as the peer runs:
# taking turns, the other sides' past turns look like competing load to llmlab's thread governor
# (runtime.ThreadGovernor samples the last 2 s), which would drop to 1 thread and time the wrong thing.
SAME = dict(batch_size=12, max_iters=2000, max_time=0.0, schedule="iters", lr=1e-3, min_lr=1e-4, warmup_iters=100,
            lr_decay_iters=2000, eval_interval=250, eval_iters=20, compile=False, threads=2)


def main() -> int:
    from llmlab.runtime import cpu_has_native_bf16

    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", type=float, default=110.0)
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--nanogpt", help="a karpathy/nanoGPT checkout (default: $NANOGPT_DIR)")
    a = ap.parse_args()
    if not DATA.is_file():
        print(f"skipped: {DATA} is absent")
        return 0
    same = {"llmlab: same 4x4x128 recipe, float32": (llmlab_worker, ("shakespeare", {**SAME, "dtype": "float32"},
                                                                        None))}
    if cpu_has_native_bf16():
        same["llmlab: same 4x4x128 recipe, bf16"] = (llmlab_worker, ("shakespeare", {**SAME, "dtype": "bfloat16"},
                                                                      None))
    real = nanogpt_dir(a.nanogpt)
    peer_name = "peer: nanoGPT (real, 3adf61e) CPU recipe" if real else "peer: stand-in (nanoGPT's loop on HF GPT-2)"
    if not a.skip_peer:
        same = {peer_name: (nanogpt_worker, (real,)) if real else (peer_worker, ()), **same}
    out = interleave(same)  # the identical recipes take turns, CHUNK steps at a time
    label = f"llmlab: --preset shakespeare --max-time {a.budget:.0f}"
    out.update(interleave({label: (llmlab_worker, ("shakespeare", {}, a.budget))}))  # alone: a wall-time budget
    rows = [["run", "train wall s", "iters", "tokens/s", "vs peer (median per round)", "val loss (fixed 200 batches)"]]
    peer = out.get(peer_name)
    for name, r in out.items():
        r["tokens_per_s"] = r["tokens"] / r["train_wall_s"]
        if peer and name != label and r is not peer:
            r["ratio_vs_peer"] = round_ratio(peer["chunks_s"], r["chunks_s"])
        rows.append([name, f"{r['train_wall_s']:.1f}", str(r["iters"]), f"{r['tokens_per_s']:,.0f}",
                     f"{r['ratio_vs_peer']:.2f}x" if "ratio_vs_peer" in r else "", f"{r['val_loss']:.4f}"])
        r.pop("chunks_s")
    print(table(rows))
    print("wrote", write_result("shakespeare", {"results": out, "chunk_steps": CHUNK, "peer": peer_name}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
