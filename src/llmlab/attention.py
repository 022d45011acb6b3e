"""Attention, written from the formula: softmax(Q K^T / sqrt(d_k) + M) V.

Vaswani et al. 2017, "Attention Is All You Need", eq. (1). M is an additive mask: 0 where a query may
look at a key, -inf where it may not. Everything else here (masks, heads, the KV cache, rotary
positions) exists to feed that one line.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- the formula


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (softmax(q k^T / sqrt(d_k) + mask) v, attention weights).

    q: (..., Tq, d_k), k: (..., Tk, d_k), v: (..., Tk, d_v); mask is additive and broadcasts to
    (..., Tq, Tk) (0 = allowed, -inf = masked), or boolean (True = allowed). The weights sum to 1 over
    the keys and are exactly 0 where masked; a query with no allowed key gets all-zero weights.
    """
    d_k = q.size(-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(d_k)  # (..., Tq, Tk)
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = bool_to_additive(mask, scores.dtype)
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    weights = torch.nan_to_num(weights, nan=0.0)  # rows where every key is masked
    return weights @ v, weights


# ----------------------------------------------------------------------------- masks


def bool_to_additive(allowed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Turn a boolean mask (True = may attend) into the additive form (0 / -inf)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return out.masked_fill(~allowed, float("-inf"))


def causal_mask(t_q: int, t_k: int | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Additive causal mask (Tq, Tk): query i (the last Tq positions of Tk) sees keys 0..its own position."""
    t_k = t_q if t_k is None else t_k
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    return bool_to_additive(k_pos <= q_pos)


def padding_mask(key_padding: torch.Tensor) -> torch.Tensor:
    """Additive mask (B, 1, 1, Tk) from a key mask (B, Tk) where True/1 marks a real token, False/0 padding."""
    return bool_to_additive(key_padding.bool())[:, None, None, :]


def combine_masks(*masks: torch.Tensor | None) -> torch.Tensor | None:
    """Sum additive masks (broadcasting); a key masked by any of them stays masked."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out + m
    return out


# ----------------------------------------------------------------------------- rotary positions


class RotaryEmbedding(nn.Module):
    """Rotary position embeddings (Su et al. 2021, "RoFormer"): rotate each pair of channels of q and k
    by the angle pos * theta^(-2i/d), so q.k depends on the relative position only."""

    def __init__(self, head_dim: int, max_positions: int = 2048, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError("rotary embeddings need an even head size")
        inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # (P, hs/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, nh, T, hs) at integer positions (T,) or (B, T)."""
        cos, sin = self.cos[positions], self.sin[positions]  # (T, hs/2) or (B, T, hs/2)
        if cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of one attention layer kept between decoding steps.

    Self-attention appends each step's keys and values into preallocated buffers; cross-attention
    computes them once from the encoder output and reuses them (`static`)."""

    def __init__(self, static: bool = False):
        self.static = static
        self.k: torch.Tensor | None = None  # (B, nh, capacity, hs)
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, nh, t, hs) keys/values; return all keys/values so far."""
        t = k.size(2)
        need = self.length + t
        if self.k is None or need > self.k.size(2):
            cap = max(need, 2 * (self.k.size(2) if self.k is not None else 64))
            new_k = k.new_empty(k.size(0), k.size(1), cap, k.size(3))
            new_v = v.new_empty(v.size(0), v.size(1), cap, v.size(3))
            if self.k is not None and self.length:
                new_k[:, :, : self.length] = self.k[:, :, : self.length]
                new_v[:, :, : self.length] = self.v[:, :, : self.length]
            self.k, self.v = new_k, new_v
        self.k[:, :, self.length : need] = k
        self.v[:, :, self.length : need] = v
        self.length = need
        return self.k[:, :, :need], self.v[:, :, :need]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search)."""
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


# ----------------------------------------------------------------------------- multi-head attention


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention (same arguments), computed in float32 for bf16/fp16 inputs
    on a CPU: its CPU kernels are about 3.5x slower forward+backward in bf16 than in float32 (4 heads,
    64 tokens, measured with torch 2.13), which made bf16 autocast training slower than float32."""
    if q.device.type == "cpu" and (q.dtype in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled("cpu")):
        low = q.dtype if q.dtype != torch.float32 else torch.get_autocast_dtype("cpu")
        mask = kwargs.get("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.is_floating_point():
            kwargs["attn_mask"] = mask.float()
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back down
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)  # type: ignore[arg-type]
        return y.to(low)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)  # type: ignore[arg-type]


class MultiHeadAttention(nn.Module):
    """h heads of scaled dot-product attention over learned projections, then an output projection.

    MultiHead(X, Y) = Concat(head_1..head_h) W_O, head_i = Attention(X W_Q_i, Y W_K_i, Y W_V_i); Y = X for
    self-attention, the encoder output for cross-attention. The q, k, v projections are one (3C, C)
    matrix stacked in that order, the layout of `nn.MultiheadAttention.in_proj_weight`.
    """

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, dropout: float = 0.0,
                 rotary: RotaryEmbedding | None = None):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"width {n_embd} is not divisible by {n_head} heads")
        self.n_head, self.n_embd, self.head_dim = n_head, n_embd, n_embd // n_head
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.rotary = rotary

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend from x (B, T, C) to itself, or to `memory` (B, S, C) for cross-attention.

        mask: additive, broadcastable to (B, nh, T, Tk) — padding and any custom masking. is_causal adds
        the causal mask (aligned to the end of the keys, so it is right with a cache too). positions:
        (T,) or (B, T) token positions for rotary embeddings. Returns (output (B, T, C), weights
        (B, nh, T, Tk) when need_weights else None).
        """
        B, T, C = x.shape
        if memory is None:
            q, k, v = self._heads_all(self.qkv(x))
            if self.rotary is not None:
                pos = positions if positions is not None else torch.arange(T, device=x.device)
                q, k = self.rotary(q, pos), self.rotary(k, pos)
            if cache is not None:
                k, v = cache.append(k, v)
        else:
            w_q, w_kv = self.qkv.weight.split([C, 2 * C])
            b_q, b_kv = self.qkv.bias.split([C, 2 * C]) if self.qkv.bias is not None else (None, None)
            q = self._heads(F.linear(x, w_q, b_q))
            if cache is not None and cache.k is not None:
                k, v = cache.k, cache.v
            else:
                k, v = (self._heads(t) for t in F.linear(memory, w_kv, b_kv).split(C, dim=2))
                if cache is not None:
                    cache.k, cache.v, cache.length = k, v, k.size(2)
        t_k = k.size(2)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            full = combine_masks(causal_mask(T, t_k, x.device) if is_causal else None, mask)
            y, w = scaled_dot_product_attention(q, k, v, full)
            if dropout:
                y = F.dropout(w, dropout) @ v
        else:
            w = None
            if mask is None and is_causal and T == t_k:
                y = fused_attention(q, k, v, dropout_p=dropout, is_causal=True)
            else:
                full = combine_masks(causal_mask(T, t_k, x.device) if is_causal and T > 1 else None, mask)
                y = fused_attention(q, k, v, attn_mask=full, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side
        return self.proj(y), w

    def _heads_all(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self._heads(t) for t in qkv.split(self.n_embd, dim=2))  # type: ignore[return-value]
