"""Building blocks shared by all three families: norms, feed-forward, the transformer block."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab.attention import KVCache, MultiHeadAttention, RotaryEmbedding
from llmlab.config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * g — LayerNorm without centring."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The configured normalisation layer over n_embd channels."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class FeedForward(nn.Module):
    """Position-wise feed-forward: proj(act(fc(x))); SwiGLU (Shazeer 2020) is proj(silu(x W) * (x V))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        width = cfg.inner * (2 if cfg.activation == "swiglu" else 1)
        self.fc = nn.Linear(cfg.n_embd, width, bias=cfg.bias)
        self.proj = nn.Linear(cfg.inner, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = activate(h, self.activation)
        return self.proj(h)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """GELU (erf), GELU (tanh approximation) or ReLU, by name."""
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if activation == "relu":
        return F.relu(h)
    return F.gelu(h)


class Block(nn.Module):
    """One transformer layer: self-attention, optional cross-attention, feed-forward, each a residual
    branch. Pre-LN: x + f(norm(x)) (GPT-2). Post-LN: norm(x + f(x)) (BERT, the 2017 paper)."""

    def __init__(self, cfg: ModelConfig, cross: bool = False, rotary: RotaryEmbedding | None = None):
        super().__init__()
        self.prenorm = cfg.prenorm
        self.norm1 = make_norm(cfg)
        self.attn = MultiHeadAttention(cfg.n_embd, cfg.n_head, cfg.bias, cfg.dropout, rotary, cfg.kv_heads)
        if cross:
            self.norm_cross = make_norm(cfg)
            self.cross = MultiHeadAttention(cfg.n_embd, cfg.n_head, cfg.bias, cfg.dropout, n_kv_head=cfg.kv_heads)
        self.has_cross = cross
        self.norm2 = make_norm(cfg)
        self.mlp = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        memory: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
        cross_cache: KVCache | None = None,
        weights: dict[str, list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). When `weights` is a dict, attention maps are appended to
        weights["self"] (and weights["cross"]), each (B, nh, T, Tk)."""
        need = weights is not None
        drop = self.drop if self.training and self.drop.p > 0 else (lambda y: y)  # no module call at inference

        def sub(norm: nn.Module, fn) -> torch.Tensor:  # one residual branch
            nonlocal x
            if self.prenorm:
                x = x + drop(fn(norm(x)))
            else:
                x = norm(x + drop(fn(x)))
            return x

        def self_attn(h: torch.Tensor) -> torch.Tensor:
            y, w = self.attn(h, mask=mask, is_causal=is_causal, positions=positions, cache=cache,
                             need_weights=need)
            if need:
                weights.setdefault("self", []).append(w)
            return y

        def cross_attn(h: torch.Tensor) -> torch.Tensor:
            y, w = self.cross(h, memory=memory, mask=memory_mask, cache=cross_cache, need_weights=need)
            if need:
                weights.setdefault("cross", []).append(w)
            return y

        sub(self.norm1, self_attn)
        if self.has_cross:
            sub(self.norm_cross, cross_attn)
        sub(self.norm2, self.mlp)
        return x


def sinusoidal_positions(n_pos: int, dim: int) -> torch.Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d)) (Vaswani et al. 2017)."""
    cpu = torch.device("cpu")  # a real table even while a model is built on the meta device (models.from_weights)
    pos = torch.arange(n_pos, dtype=torch.float32, device=cpu)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=cpu) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n_pos, dim, device=cpu)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)[:, : dim // 2]
    return pe
