"""Pictures: attention heat maps and loss curves, written as PNG files (matplotlib, no screen needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
import torch  # noqa: E402

matplotlib.use("Agg")


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def attention_grid(weights: torch.Tensor, tokens: Sequence[str], path: str | Path, title: str = "",
                   highlight: tuple[int, int] | None = None, key_tokens: Sequence[str] | None = None) -> Path:
    """A layers x heads grid of attention maps (rows: queries, columns: keys), one small panel each."""
    L, H = weights.shape[:2]
    fig, axes = plt.subplots(L, H, figsize=(1.6 * H + 1, 1.6 * L + 1), squeeze=False)
    for layer in range(L):
        for head in range(H):
            ax = axes[layer][head]
            ax.imshow(weights[layer, head].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
            ax.set_xticks([])
            ax.set_yticks([])
            if highlight == (layer, head):
                for s in ax.spines.values():
                    s.set_edgecolor("red")
                    s.set_linewidth(3)
            if layer == 0:
                ax.set_title(f"head {head}", fontsize=8)
            if head == 0:
                ax.set_ylabel(f"layer {layer}", fontsize=8)
    fig.suptitle(title or "attention: every layer (rows) and head (columns); query down, key across")
    return _save(fig, path)


def attention_map(weights: torch.Tensor, tokens: Sequence[str], path: str | Path, title: str = "",
                  key_tokens: Sequence[str] | None = None, mark_query: int | None = None) -> Path:
    """One large attention map (T_q, T_k) with token labels and the weights written in each cell."""
    keys = list(key_tokens) if key_tokens is not None else list(tokens)
    Tq, Tk = weights.shape
    fig, ax = plt.subplots(figsize=(0.55 * Tk + 2.5, 0.5 * Tq + 2))
    im = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=float(weights.max()) or 1.0)
    ax.set_xticks(range(Tk), keys, rotation=60, ha="right", fontsize=9)
    ax.set_yticks(range(Tq), tokens, fontsize=9)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    if Tq * Tk <= 900:
        for i in range(Tq):
            for j in range(Tk):
                v = float(weights[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="black" if v > 0.5 * float(weights.max()) else "white")
    if mark_query is not None:
        ax.axhline(mark_query - 0.5, color="red", lw=1.5)
        ax.axhline(mark_query + 0.5, color="red", lw=1.5)
    fig.colorbar(im, ax=ax, fraction=0.04)
    ax.set_title(title)
    return _save(fig, path)


def loss_curves(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]], path: str | Path,
                title: str = "loss") -> Path:
    """Train and validation loss against step."""
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), label="val", marker="o", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)



def metric_curves(series: dict[str, Sequence[tuple[int, float]]], path: str | Path, title: str = "") -> Path:
    """One panel per evaluation (the part of each metric's name before "/"), its metrics against step."""
    groups: dict[str, list[str]] = {}
    for name in series:
        groups.setdefault(name.split("/")[0], []).append(name)
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 3 * max(1, len(groups))), squeeze=False)
    for ax, (group, names) in zip(axes[:, 0], groups.items()):
        for name in names:
            if series[name]:
                ax.plot(*zip(*series[name]), marker="o", ms=3, lw=1, label=name.split("/", 1)[-1])
        ax.set_title(f"{title}: {group}" if title else group)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def confusion_png(matrix: np.ndarray, labels: Sequence[str], path: str | Path, title: str = "") -> Path:
    """The confusion matrix as a heat map with counts (rows: true label, columns: predicted)."""

    n = len(labels)
    short = [lab if len(lab) <= 28 else lab[:26] + "…" for lab in labels]
    fig, ax = plt.subplots(figsize=(0.7 * n + 3.5, 0.6 * n + 2.5))
    norm = matrix / np.maximum(matrix.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), short, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), short, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(title or "confusion matrix (held-out split)")
    return _save(fig, path)
