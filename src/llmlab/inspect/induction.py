"""Emergence you can watch: the induction-head phase change (Olsson et al. 2022, "In-context Learning and
Induction Heads") on 2 cores.

A 2-layer attention-only transformer (and a 1-layer control) is trained on sequences made of a random token
string followed by the same string again. After each checkpoint interval we measure, on a fixed probe batch:

- in-context learning score: mean loss on the repeated (second) half minus the first half (Olsson et al.
  compare the 500th and the 50th token; our sequences are short, so halves). Negative = the model uses context.
- prefix-matching score of each head: the attention a query at position i of the second half pays to the
  token right after the earlier occurrence of its own token, position i - n + 1 (chance is about 1 / (i + 1)).
- copying score of each head: for the OV circuit M = W_U W_O^h W_V^h W_E (V x V, layer norms left out), the
  share of positive eigenvalues, sum(lambda) / sum(|lambda|) (real parts); 1 = the head copies the token
  it attends to into the prediction.

An induction head needs a previous-token head in an earlier layer (K-composition), so the 1-layer control
cannot form one. llmlab's ModelConfig has no attention-only option (and the model floor is not edited here),
so the model is a small one of its own, built from llmlab.attention.MultiHeadAttention; the loop is its own
tiny AdamW loop (inspect/ may not import llmlab.train)."""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.attention import MultiHeadAttention


@dataclass
class InductionConfig:
    vocab: int = 64  # random tokens
    half: int = 16  # length of the random string; sequences are 2 * half tokens
    n_embd: int = 64
    n_head: int = 4
    batch: int = 32
    lr: float = 1e-3
    max_iters: int = 800
    eval_every: int = 50
    seed: int = 0
    probe: int = 64  # sequences in the fixed probe batch


class AttentionOnly(nn.Module):
    """Token + learned position embeddings, n_layer pre-LN attention-only residual blocks, an unembedding."""

    def __init__(self, vocab: int, block: int, n_layer: int, n_embd: int, n_head: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.norms = nn.ModuleList(nn.LayerNorm(n_embd) for _ in range(n_layer))
        self.attn = nn.ModuleList(MultiHeadAttention(n_embd, n_head, bias=False) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor, weights: list[torch.Tensor] | None = None) -> torch.Tensor:
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        for norm, attn in zip(self.norms, self.attn):
            y, w = attn(norm(x), is_causal=True, need_weights=weights is not None)
            if weights is not None:
                weights.append(w)  # (B, nh, T, T)
            x = x + y
        return self.lm_head(self.ln_f(x))  # (B, T, V)


def repeated_batch(n: int, vocab: int, half: int, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x (n, 2 * half), lengths (n,), starts (n,)): random tokens with, at a random start, a random string of
    half/2..half tokens followed by the same string again. The string's length and place vary, so a head
    can find the earlier copy only by content, never by a fixed distance (which a 1-layer model could learn)."""
    T = 2 * half
    x = torch.randint(0, vocab, (n, T), generator=gen)
    lengths = torch.randint(half // 2, half + 1, (n,), generator=gen)
    starts = (torch.rand(n, generator=gen) * (T - 2 * lengths + 1)).long()
    for b in range(n):
        s, m = int(starts[b]), int(lengths[b])
        x[b, s + m:s + 2 * m] = x[b, s:s + m]
    return x, lengths, starts


def _second_copy(lengths: torch.Tensor, starts: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (B, T) masks of the query positions in the first and in the second copy that predict a copied
    token: position i predicts token i + 1; in the second copy the query reads token i and its earlier copy's
    successor sits at i - length + 1."""
    pos = torch.arange(T)[None]
    s, m = starts[:, None], lengths[:, None]
    first = (pos >= s) & (pos < s + m - 1)
    second = (pos >= s + m) & (pos < s + 2 * m - 1)
    return first, second


def prefix_matching(weights: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """(B, nh, T, T) attention -> (nh,): mean attention from each query i in the second copy to key
    i - length + 1, the token after the earlier occurrence of the query's token."""
    B, nh, T, _ = weights.shape
    _, second = _second_copy(lengths, starts, T)
    b, i = second.nonzero(as_tuple=True)
    j = i - lengths[b] + 1
    return weights[b, :, i, j].mean(0)  # (nh,)


def chance_prefix(lengths: torch.Tensor, starts: torch.Tensor, T: int) -> float:
    """The prefix-matching score of a head attending uniformly to the keys it may see: mean of 1 / (i + 1)."""
    _, second = _second_copy(lengths, starts, T)
    _, i = second.nonzero(as_tuple=True)
    return float((1.0 / (i + 1).double()).mean())


def copying_scores(model: AttentionOnly) -> torch.Tensor:
    """(L, nh): sum(eig) / sum(|eig|) of each head's OV circuit W_U W_O^h W_V^h W_E (real parts)."""
    W_E, W_U = model.wte.weight, model.lm_head.weight  # (V, C) both
    out = []
    with torch.no_grad():
        for attn in model.attn:
            C, hs = attn.n_embd, attn.head_dim
            W_V = attn.qkv.weight[2 * C:]  # (C, C): rows = value channels of every head
            W_O = attn.proj.weight  # (C, C): columns = heads' channels
            row = []
            for h in range(attn.n_head):
                ov = W_O[:, h * hs:(h + 1) * hs] @ W_V[h * hs:(h + 1) * hs]  # (C, C)
                m = W_U @ ov @ W_E.T  # (V, V)
                ev = torch.linalg.eigvals(m.double()).real
                row.append(float(ev.sum() / ev.abs().sum().clamp(min=1e-12)))
            out.append(row)
    return torch.tensor(out)


def measure(model: AttentionOnly, probe: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """Loss, in-context learning score, prefix-matching and copying scores per head, on the probe batch."""
    x, lengths, starts = probe
    model.eval()
    w: list[torch.Tensor] = []
    with torch.no_grad():
        logits = model(x[:, :-1], weights=w)
        loss = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (B, T-1)
    model.train()
    first, second = (m[:, :-1] for m in _second_copy(lengths, starts, x.size(1)))
    early, late = loss[first].mean(), loss[second].mean()
    return {"loss": float(loss.mean()), "loss_early": float(early), "loss_late": float(late),
            "icl": float(late - early),
            "prefix": [prefix_matching(a, lengths, starts).tolist() for a in w],
            "copying": copying_scores(model).tolist()}


@dataclass
class InductionRun:
    n_layer: int
    steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    checkpoints: list[dict[str, Any]] = field(default_factory=list)
    attention_before: list[list[float]] = field(default_factory=list)  # best head's probe map, first checkpoint
    attention_after: list[list[float]] = field(default_factory=list)  # the same head, last checkpoint
    best_head: tuple[int, int] = (0, 0)
    formed_at: int | None = None  # first checkpoint where a last-layer head's prefix score > 0.3
    seconds: float = 0.0

    def max_prefix(self, layer: int = -1) -> float:
        return max(self.checkpoints[-1]["prefix"][layer])


def train_induction(n_layer: int, cfg: InductionConfig,
                    on_checkpoint: Callable[[int, dict[str, Any]], None] | None = None) -> InductionRun:
    """Train one attention-only model and measure it every cfg.eval_every steps (step 0 included)."""
    t0 = time.monotonic()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    probe = repeated_batch(cfg.probe, cfg.vocab, cfg.half, torch.Generator().manual_seed(cfg.seed + 10_000))
    model = AttentionOnly(cfg.vocab, 2 * cfg.half, n_layer, cfg.n_embd, cfg.n_head)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    run = InductionRun(n_layer=n_layer)
    maps: list[torch.Tensor] = []

    def checkpoint(step: int) -> None:
        m = measure(model, probe)
        m["step"] = step
        run.checkpoints.append(m)
        w: list[torch.Tensor] = []
        with torch.no_grad():
            model(probe[0][:1], weights=w)
        maps.append(torch.stack([x[0] for x in w]))  # (L, nh, T, T)
        if run.formed_at is None and max(m["prefix"][-1]) > 0.3:
            run.formed_at = step
        if on_checkpoint:
            on_checkpoint(step, m)

    checkpoint(0)
    for step in range(1, cfg.max_iters + 1):
        x = repeated_batch(cfg.batch, cfg.vocab, cfg.half, gen)[0]
        loss = F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run.steps.append(step)
        run.train_loss.append(float(loss.detach()))
        if step % cfg.eval_every == 0 or step == cfg.max_iters:
            checkpoint(step)
    last = run.checkpoints[-1]["prefix"]
    layer = len(last) - 1
    head = max(range(len(last[layer])), key=lambda h: last[layer][h])
    run.best_head = (layer, head)
    run.attention_before = maps[0][layer, head].tolist()
    run.attention_after = maps[-1][layer, head].tolist()
    run.seconds = time.monotonic() - t0
    return run


def run_experiment(cfg: InductionConfig | None = None) -> dict[str, Any]:
    """The 2-layer model and the 1-layer control on the same data; JSON-ready."""
    cfg = cfg or InductionConfig()
    two, one = train_induction(2, cfg), train_induction(1, cfg)
    probe_gen = torch.Generator().manual_seed(cfg.seed + 10_000)
    _, lengths, starts = repeated_batch(cfg.probe, cfg.vocab, cfg.half, probe_gen)
    chance = chance_prefix(lengths, starts, 2 * cfg.half)
    return {"config": asdict(cfg), "chance_prefix": chance, "two_layer": asdict(two), "one_layer": asdict(one)}


# ----------------------------------------------------------------------------- the page


def _svg_curve(series: dict[str, tuple[list[float], list[float]]], w: int = 560, h: int = 220) -> str:
    xs = [x for s in series.values() for x in s[0]]
    ys = [y for s in series.values() for y in s[1]]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    colors = ["#c33", "#36c", "#393", "#a6c"]
    parts = [f"<svg width='{w}' height='{h + 20}' class='curve'>"]
    for (name, (sx, sy)), c in zip(series.items(), colors):
        pts = " ".join(f"{(x - x0) / max(x1 - x0, 1e-9) * (w - 40) + 35:.1f},"
                       f"{h - (y - y0) / max(y1 - y0, 1e-9) * (h - 10):.1f}" for x, y in zip(sx, sy))
        parts.append(f"<polyline fill='none' stroke='{c}' stroke-width='1.5' points='{pts}'>"
                     f"<title>{html.escape(name)}</title></polyline>")
        parts.append(f"<text x='{w - 150}' y='{15 + 15 * list(series).index(name)}' fill='{c}' font-size='12'>"
                     f"{html.escape(name)}</text>")
    parts.append(f"<text x='0' y='12' font-size='11'>{y1:.2f}</text><text x='0' y='{h}' font-size='11'>{y0:.2f}"
                 f"</text><text x='35' y='{h + 15}' font-size='11'>step {x0:g}</text>"
                 f"<text x='{w - 80}' y='{h + 15}' font-size='11'>step {x1:g}</text></svg>")
    return "".join(parts)


def _svg_map(m: list[list[float]], cell: int = 8) -> str:
    n = len(m)
    rects = "".join(f"<rect x='{j * cell}' y='{i * cell}' width='{cell}' height='{cell}' "
                    f"fill='rgb({int(255 * (1 - v))},{int(255 * (1 - v))},255)'><title>q{i} k{j}: {v:.3f}</title>"
                    f"</rect>" for i, row in enumerate(m) for j, v in enumerate(row) if v > 0.01)
    return f"<svg width='{n * cell}' height='{n * cell}' style='border:1px solid #ccc'>{rects}</svg>"


def induction_page(result: dict[str, Any]) -> str:
    """A self-contained HTML page: loss curves, scores per head per checkpoint, a head before and after."""
    two, one = result["two_layer"], result["one_layer"]

    def smooth(v: list[float], k: int = 20) -> list[float]:
        return [sum(v[max(0, i - k):i + 1]) / len(v[max(0, i - k):i + 1]) for i in range(len(v))]

    rows = []
    for r in (two, one):
        for c in r["checkpoints"]:
            cells = [f"{r['n_layer']}-layer", str(c["step"]), f"{c['loss']:.3f}", f"{c['icl']:.3f}"]
            cells.append(" ".join(f"L{layer}.H{h}:{v:.2f}" for layer, row in enumerate(c["prefix"])
                                  for h, v in enumerate(row)))
            cells.append(" ".join(f"L{layer}.H{h}:{v:.2f}" for layer, row in enumerate(c["copying"])
                                  for h, v in enumerate(row)))
            rows.append("<tr>" + "".join(f"<td>{html.escape(x)}</td>" for x in cells) + "</tr>")
    bl, bh = two["best_head"]
    return ("<!doctype html><html><head><meta charset='utf-8'><title>llmlab induction heads</title><style>"
            "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}"
            "</style></head><body><h1>Induction heads forming during training</h1>"
            f"<p>2-layer attention-only model vs 1-layer control, {result['config']['max_iters']} steps. "
            f"Chance prefix-matching score {result['chance_prefix']:.3f}. Best last-layer prefix score: 2-layer "
            f"{max(two['checkpoints'][-1]['prefix'][-1]):.3f} (first above 0.3 at step {two['formed_at']}), "
            f"1-layer {max(one['checkpoints'][-1]['prefix'][-1]):.3f}.</p><h2>Training loss</h2>"
            + _svg_curve({"2-layer": (two["steps"], smooth(two["train_loss"])),
                          "1-layer": (one["steps"], smooth(one["train_loss"]))})
            + "<h2>In-context learning score (late minus early loss)</h2>"
            + _svg_curve({"2-layer": ([c["step"] for c in two["checkpoints"]], [c["icl"] for c in two["checkpoints"]]),
                          "1-layer": ([c["step"] for c in one["checkpoints"]], [c["icl"] for c in one["checkpoints"]])})
            + f"<h2>Layer {bl} head {bh} on a probe sequence, before and after</h2>"
            + _svg_map(two["attention_before"]) + " " + _svg_map(two["attention_after"])
            + "<h2>Scores per checkpoint</h2><table><tr><th>model</th><th>step</th><th>loss</th><th>ICL</th>"
            "<th>prefix matching</th><th>copying</th></tr>" + "".join(rows) + "</table></body></html>")

