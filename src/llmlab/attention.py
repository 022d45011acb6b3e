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
    """Rotary position embeddings (Su et al. 2021, "RoFormer"): rotate each pair of channels (x_2i, x_2i+1)
    of q and k by the angle pos * theta^(-2i/d), so q.k depends on the relative position only:

        (x_2i, x_2i+1) -> (x_2i cos a - x_2i+1 sin a, x_2i sin a + x_2i+1 cos a),  a = pos * theta^(-2i/d)

    computed as x * cos + partner(x) * sin, partner(x) putting each channel's pair partner in its place (the
    sines carry the signs). Which channels pair up is a layout choice, equivalent up to a permutation of the
    q/k projection rows: "interleaved" pairs (2i, 2i+1), as the RoFormer paper, Meta's Llama code and
    llama.cpp's GGUF files do; "halves" pairs (i, i + d/2), as GPT-NeoX and Hugging Face's Llama do (see
    rope_rows_from_halves for the permutation)."""

    def __init__(self, head_dim: int, max_positions: int = 2048, theta: float = 10000.0, layout: str = "interleaved"):
        super().__init__()
        if head_dim % 2:
            raise ValueError("rotary embeddings need an even head size")
        if layout not in ("interleaved", "halves"):
            raise ValueError(f"rotary layout {layout!r} is not interleaved or halves")
        self.head_dim, self.max_positions, self.theta, self.layout = head_dim, max_positions, theta, layout
        # theta^(-2i/d) computed as transformers computes it, so imported models agree to the last bit
        cpu = torch.device("cpu")  # real tables even while a model is built on the meta device
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=cpu).float() / head_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=cpu), inv_freq)  # (P, hs/2)
        # float32 tables kept as plain attributes, not buffers, so that model.to(bfloat16) leaves them exact
        cos, sin = angles.cos(), angles.sin()
        if layout == "interleaved":  # (P, hs): channel 2i gets (cos a_i, -sin a_i), channel 2i+1 (cos a_i, sin a_i)
            self.cos = cos.repeat_interleave(2, dim=-1)
            self.sin = torch.stack((-sin, sin), dim=-1).flatten(-2)
        else:  # (P, hs): channel i < hs/2 gets (cos a_i, -sin a_i), channel i + hs/2 (cos a_i, sin a_i)
            self.cos = torch.cat((cos, cos), dim=-1)
            self.sin = torch.cat((-sin, sin), dim=-1)
        self._memo: tuple[torch.Tensor, tuple, torch.Tensor, torch.Tensor] | None = None

    def tables(self, positions: torch.Tensor, heads_first: bool = True,
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for integer positions (T,) or (B, T), shaped to broadcast over x (B, nh, T, hs) (or over
        (B, T, nh, hs) when not heads_first), in `dtype`. Every layer of one forward pass gets the same
        positions tensor, so the lookup is done once and reused."""
        memo = self._memo
        compiling = torch.compiler.is_compiling()
        version = -1 if compiling or positions.is_inference() else positions._version  # inference tensors have none
        key = (version, heads_first, dtype)
        if not compiling and memo is not None and memo[0] is positions and memo[1] == key:
            return memo[2], memo[3]
        if self.cos.device != positions.device:
            self.cos, self.sin = self.cos.to(positions.device), self.sin.to(positions.device)
        cos, sin = self.cos[positions], self.sin[positions]  # (T, hs) or (B, T, hs)
        if heads_first and cos.dim() == 3:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hs)
        elif not heads_first:
            cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, hs) or (B, T, 1, hs)
        cos, sin = cos.to(dtype), sin.to(dtype)
        if not compiling:
            self._memo = (positions, key, cos, sin)
        return cos, sin

    def forward(self, x: torch.Tensor, positions: torch.Tensor, heads_first: bool = True) -> torch.Tensor:
        """Rotate x (B, nh, T, hs) — or (B, T, nh, hs) with heads_first=False, the layout the projections
        come out in, where the element-wise work is fastest — at integer positions (T,) or (B, T). Float32
        and float64 inputs rotate in float32 or better; bf16/fp16 ones in their own precision (as transformers
        does), which spares converting q and k back and forth."""
        low = x.dtype in (torch.bfloat16, torch.float16)
        cos, sin = self.tables(positions, heads_first, x.dtype if low else torch.float32)
        if self.layout == "interleaved":
            partner = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x_2i+1, x_2i) for each pair
        else:
            partner = x.roll(self.head_dim // 2, dims=-1)  # (x_i+hs/2 | x_i)
        return (x * cos + partner * sin).type_as(x)


def rope_rows_from_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """q/k projection rows of a "halves" RoPE layout (HF) -> the "interleaved" one (Meta, llama.cpp).

    Row (head, half, j) moves to (head, j, half), so channels j and j + hs/2 become 2j and 2j+1: the
    permutation llama.cpp's convert_hf_to_gguf.py applies. w: (n_heads * hs, ...) weight or bias."""
    hs = w.size(0) // n_heads
    return w.reshape(n_heads, 2, hs // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_rows_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of rope_rows_from_halves ("interleaved" -> "halves"), as transformers' GGUF loader does."""
    hs = w.size(0) // n_heads
    return w.reshape(n_heads, hs // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- KV cache


class KVCache:
    """Keys and values of one attention layer kept between decoding steps.

    Self-attention appends each step's keys and values into preallocated buffers; cross-attention
    computes them once from the encoder output and reuses them (`static`). `dtype` stores them in another
    precision than they arrive in (float32 for a bf16 model on a CPU, whose attention runs in float32
    anyway: see fused_attention)."""

    def __init__(self, static: bool = False, dtype: torch.dtype | None = None):
        self.static = static
        self.dtype = dtype
        self.k: torch.Tensor | None = None  # (B, nh, capacity, hs)
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, nh, t, hs) keys/values; return all keys/values so far."""
        t = k.size(2)
        need = self.length + t
        if self.k is None or need > self.k.size(2):
            cap = max(need, 2 * (self.k.size(2) if self.k is not None else 64))
            new_k = k.new_empty(k.size(0), k.size(1), cap, k.size(3), dtype=self.dtype or k.dtype)
            new_v = v.new_empty(v.size(0), v.size(1), cap, v.size(3), dtype=self.dtype or v.dtype)
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


LOW_PRECISION_ATTENTION_MIN_QUERIES = 256


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention (same arguments), computed in float32 for bf16/fp16 inputs
    on a CPU: its CPU kernels are about 3.5x slower forward+backward in bf16 than in float32 (4 heads,
    64 tokens, measured with torch 2.13), which made bf16 autocast training slower than float32. Inference
    (no gradients) over 256 or more queries at once — a long prompt's prefill — is the exception: there
    the bf16 kernel is faster than converting (about 2.5x at 512 tokens, SmolLM2's 9 heads)."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, **kwargs)  # type: ignore[arg-type]
    autocast = torch.is_autocast_enabled("cpu")
    if q.dtype in (torch.bfloat16, torch.float16) and not autocast and not torch.is_grad_enabled() and \
            q.size(-2) >= LOW_PRECISION_ATTENTION_MIN_QUERIES:
        mask = kwargs.get("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.is_floating_point():
            kwargs["attn_mask"] = mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), **kwargs)  # type: ignore[arg-type]
    if q.dtype in (torch.bfloat16, torch.float16) or autocast:
        low = q.dtype if q.dtype != torch.float32 else torch.get_autocast_dtype("cpu")
        mask = kwargs.get("attn_mask")
        if isinstance(mask, torch.Tensor) and mask.is_floating_point():
            kwargs["attn_mask"] = mask.float()
        if not autocast:  # bf16 weights without autocast (inference): no context to enter
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(low)  # type: ignore
        with torch.autocast("cpu", enabled=False):  # autocast would cast the inputs back down
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)  # type: ignore[arg-type]
        return y.to(low)
    mask = kwargs.get("attn_mask")
    if isinstance(mask, torch.Tensor) and mask.is_floating_point() and mask.dtype != q.dtype:
        # torch 2.13's CPU kernel silently misreads a 4-D additive mask of another float dtype (a float32 mask
        # with float64 queries gave outputs off by ~3); the mask is cast to the queries' dtype
        kwargs["attn_mask"] = mask.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kwargs)  # type: ignore[arg-type]


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Grouped-query attention's sharing, written out: query head h reads key/value head h // groups, so each
    of the n_kv_head heads (B, n_kv_head, T, hs) is repeated `groups` times -> (B, n_head, T, hs)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


class MultiHeadAttention(nn.Module):
    """h heads of scaled dot-product attention over learned projections, then an output projection.

    MultiHead(X, Y) = Concat(head_1..head_h) W_O, head_i = Attention(X W_Q_i, Y W_K_g(i), Y W_V_g(i)); Y = X for
    self-attention, the encoder output for cross-attention. With multi-head attention (Vaswani et al. 2017)
    g(i) = i; with grouped-query attention (Ainslie et al. 2023) n_kv_head < n_head key/value heads are shared
    by groups of n_head / n_kv_head query heads, g(i) = i // (n_head / n_kv_head) (multi-query attention,
    Shazeer 2019, is n_kv_head = 1); the KV cache shrinks by the same factor. The q, k, v projections are one
    ((n_head + 2 n_kv_head) hs, C) matrix stacked in that order; with n_kv_head = n_head it is the (3C, C)
    layout of `nn.MultiheadAttention.in_proj_weight`.
    """

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, dropout: float = 0.0,
                 rotary: RotaryEmbedding | None = None, n_kv_head: int | None = None):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"width {n_embd} is not divisible by {n_head} heads")
        n_kv_head = n_kv_head or n_head
        if n_head % n_kv_head:
            raise ValueError(f"{n_head} query heads cannot share {n_kv_head} key/value heads in equal groups")
        self.n_head, self.n_embd, self.head_dim = n_head, n_embd, n_embd // n_head
        self.n_kv_head, self.groups = n_kv_head, n_head // n_kv_head
        self.kv_dim = n_kv_head * self.head_dim
        self.qkv = nn.Linear(n_embd, n_embd + 2 * self.kv_dim, bias=bias)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.rotary = rotary

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, C // self.head_dim, self.head_dim).transpose(1, 2)  # (B, nh or n_kv, T, hs)

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
            qkv = self.qkv(x)
            if self.rotary is None:
                q, k, v = self._heads_all(qkv)  # (B, nh, T, hs), (B, n_kv, T, hs) twice
            else:  # q and k heads side by side, rotated in one go
                pos = positions if positions is not None else torch.arange(T, device=x.device)
                qk = qkv[..., : C + self.kv_dim].view(B, T, self.n_head + self.n_kv_head, self.head_dim)
                qk = self.rotary(qk, pos, heads_first=False)  # (B, T, nh + n_kv, hs)
                q, k = qk[:, :, : self.n_head].transpose(1, 2), qk[:, :, self.n_head:].transpose(1, 2)
                v = self._heads(qkv[..., C + self.kv_dim:])
            if cache is not None:
                k, v = cache.append(k, v)
        else:
            w_q, w_kv = self.qkv.weight.split([C, 2 * self.kv_dim])
            b_q, b_kv = self.qkv.bias.split([C, 2 * self.kv_dim]) if self.qkv.bias is not None else (None, None)
            q = self._heads(F.linear(x, w_q, b_q))
            if cache is not None and cache.k is not None:
                k, v = cache.k, cache.v
            else:
                k, v = (self._heads(t) for t in F.linear(memory, w_kv, b_kv).split(self.kv_dim, dim=2))
                if cache is not None:
                    cache.k, cache.v, cache.length = k, v, k.size(2)
        t_k = k.size(2)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            full = combine_masks(causal_mask(T, t_k, x.device) if is_causal else None, mask)
            k, v = repeat_kv(k.to(q.dtype), self.groups), repeat_kv(v.to(q.dtype), self.groups)
            y, w = scaled_dot_product_attention(q, k, v, full)
            if dropout:
                y = F.dropout(w, dropout) @ v
        else:
            w = None
            y = self._fused(q, k, v, mask, is_causal, dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side
        return self.proj(y), w

    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool, dropout: float) -> torch.Tensor:
        """The same attention through torch's fused kernel (B, nh, T, hs); key/value heads are shared in place
        (enable_gqa) rather than copied."""
        B, _, T, hs = q.shape
        t_k = k.size(2)
        g = self.groups
        if g > 1 and T == 1 and (mask is None or (mask.dim() == 4 and mask.shape[1:3] == (1, 1))):
            # one query per head: the `groups` queries that share a key/value head are attended as one
            # (B, n_kv, groups, hs) block, the cheapest form for token-by-token decoding
            m = None if mask is None else mask.expand(B, 1, 1, t_k)
            y = fused_attention(q.view(B, self.n_kv_head, g, hs), k, v, attn_mask=m, dropout_p=dropout)
            return y.view(B, self.n_head, 1, hs)
        gqa = {"enable_gqa": True} if g > 1 else {}
        if mask is None and is_causal and T == t_k:
            return fused_attention(q, k, v, dropout_p=dropout, is_causal=True, **gqa)
        full = combine_masks(causal_mask(T, t_k, q.device) if is_causal and T > 1 else None, mask)
        return fused_attention(q, k, v, attn_mask=full, dropout_p=dropout, **gqa)

    def _heads_all(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = qkv.split([self.n_embd, self.kv_dim, self.kv_dim], dim=2)
        return self._heads(q), self._heads(k), self._heads(v)
