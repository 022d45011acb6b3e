"""Attention against PyTorch's own implementations: the formula, the masks, multi-head attention,
rotary positions and the KV cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import randomize_
from llmlab.attention import (
    KVCache,
    MultiHeadAttention,
    RotaryEmbedding,
    bool_to_additive,
    causal_mask,
    combine_masks,
    fused_attention,
    padding_mask,
    scaled_dot_product_attention,
)
from llmlab.config import ModelConfig
from llmlab.errors import ConfigError, LlmlabError

TOL = 1e-5


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- masks


def test_causal_mask_square():
    m = causal_mask(4)
    assert m.shape == (4, 4) and m.dtype == torch.float32
    allowed = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    assert torch.all(m[allowed] == 0)
    assert torch.all(m[~allowed] == float("-inf"))


def test_causal_mask_aligns_queries_to_the_end_of_the_keys():
    m = causal_mask(2, 5)  # two new queries at positions 3 and 4 of five keys (a KV cache)
    assert m.shape == (2, 5)
    expected_allowed = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(m == 0, expected_allowed)
    assert torch.all(m[~expected_allowed] == float("-inf"))
    # one query against all keys sees everything
    assert torch.all(causal_mask(1, 6) == 0)


def test_padding_mask_shape_and_values():
    real = torch.tensor([[1, 1, 0], [1, 1, 1]])
    m = padding_mask(real)
    assert m.shape == (2, 1, 1, 3)
    assert m[0, 0, 0, 2] == float("-inf")
    assert torch.all(m[0, 0, 0, :2] == 0) and torch.all(m[1] == 0)
    assert torch.equal(padding_mask(real.bool()), m)


def test_combine_masks_keeps_every_masked_key():
    a = causal_mask(3)
    b = padding_mask(torch.tensor([[1, 0, 1]]))
    c = combine_masks(None, a, None, b)
    assert c.shape == (1, 1, 3, 3)
    expected = torch.tril(torch.ones(3, 3, dtype=torch.bool)) & torch.tensor([True, False, True])
    assert torch.equal(c[0, 0] == 0, expected)
    assert combine_masks(None, None) is None
    assert combine_masks(a) is a


def test_bool_to_additive():
    allowed = torch.tensor([[True, False], [False, True]])
    add = bool_to_additive(allowed)
    assert torch.equal(add, torch.tensor([[0.0, float("-inf")], [float("-inf"), 0.0]]))


# ----------------------------------------------------------------------------- the formula vs F.sdpa

B, H, TQ, TK, D = 2, 3, 5, 7, 8


def _qkv(tq: int = TQ, tk: int = TK):
    return torch.randn(B, H, tq, D), torch.randn(B, H, tk, D), torch.randn(B, H, tk, D)


def _check_weights(w: torch.Tensor, allowed: torch.Tensor | None) -> None:
    """Rows sum to 1 over the keys; exactly 0 where a key is masked."""
    assert torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-6)
    assert torch.all(w >= 0)
    if allowed is not None:
        allowed = allowed.expand(w.shape)
        assert torch.all(w[~allowed] == 0)
        assert torch.all(w[allowed] > 0)


def test_sdpa_no_mask():
    q, k, v = _qkv()
    out, w = scaled_dot_product_attention(q, k, v)
    assert out.shape == (B, H, TQ, D) and w.shape == (B, H, TQ, TK)
    assert maxdiff(out, F.scaled_dot_product_attention(q, k, v)) <= TOL
    ref_w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(D), -1)
    assert maxdiff(w, ref_w) <= TOL
    _check_weights(w, None)


def test_sdpa_causal():
    q, k, v = _qkv(6, 6)
    out, w = scaled_dot_product_attention(q, k, v, causal_mask(6))
    assert maxdiff(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) <= TOL
    _check_weights(w, torch.tril(torch.ones(6, 6, dtype=torch.bool)))
    assert torch.all(torch.triu(w, diagonal=1) == 0)


def test_sdpa_key_padding():
    q, k, v = _qkv()
    real = torch.ones(B, TK, dtype=torch.bool)
    real[0, 4:] = False
    real[1, :2] = False
    out, w = scaled_dot_product_attention(q, k, v, padding_mask(real))
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :])
    assert maxdiff(out, ref) <= TOL
    _check_weights(w, real[:, None, None, :])


def test_sdpa_causal_and_padding_combined():
    T = 6
    q, k, v = _qkv(T, T)
    real = torch.ones(B, T, dtype=torch.bool)
    real[0, 4:] = False  # right padding: every query keeps key 0
    real[1, 2] = False
    mask = combine_masks(causal_mask(T), padding_mask(real))
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool)) & real[:, None, None, :]
    out, w = scaled_dot_product_attention(q, k, v, mask)
    assert maxdiff(out, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)) <= TOL
    _check_weights(w, allowed)


def test_sdpa_boolean_mask():
    q, k, v = _qkv()
    allowed = torch.rand(B, H, TQ, TK) > 0.4
    allowed[..., 0] = True  # no empty row
    out, w = scaled_dot_product_attention(q, k, v, allowed)
    assert maxdiff(out, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)) <= TOL
    _check_weights(w, allowed)
    # the boolean and the additive form agree
    out2, w2 = scaled_dot_product_attention(q, k, v, bool_to_additive(allowed))
    assert torch.equal(out, out2) and torch.equal(w, w2)


def test_sdpa_cross_tq_ne_tk_with_padding():
    q, k, v = _qkv(3, 9)
    real = torch.ones(B, 9, dtype=torch.bool)
    real[1, 6:] = False
    out, w = scaled_dot_product_attention(q, k, v, padding_mask(real))
    assert out.shape == (B, H, 3, D) and w.shape == (B, H, 3, 9)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :])
    assert maxdiff(out, ref) <= TOL
    _check_weights(w, real[:, None, None, :])


def test_sdpa_value_dim_may_differ_from_key_dim():
    q, k = torch.randn(2, 4, 8), torch.randn(2, 6, 8)
    v = torch.randn(2, 6, 5)
    out, _ = scaled_dot_product_attention(q, k, v)
    assert maxdiff(out, F.scaled_dot_product_attention(q, k, v)) <= TOL


def test_sdpa_query_with_no_allowed_key_gets_zero_weights():
    q, k, v = _qkv(3, 4)
    allowed = torch.ones(B, H, 3, 4, dtype=torch.bool)
    allowed[0, 1, 2] = False  # one query that may see nothing
    out, w = scaled_dot_product_attention(q, k, v, allowed)
    assert not torch.isnan(out).any() and not torch.isnan(w).any()
    assert torch.all(w[0, 1, 2] == 0) and torch.all(out[0, 1, 2] == 0)
    assert torch.allclose(w[0, 1, :2].sum(-1), torch.ones(2), atol=1e-6)


# ----------------------------------------------------------------------------- multi-head attention


C, NH = 32, 4


def _mha_pair(bias: bool = True):
    ref = nn.MultiheadAttention(C, NH, batch_first=True, bias=bias).eval()
    if bias:
        randomize_(ref, scale=0.5)  # in_proj_bias and out_proj.bias start at zero
    ours = MultiHeadAttention(C, NH, bias=bias).eval()
    with torch.no_grad():
        ours.qkv.weight.copy_(ref.in_proj_weight)
        ours.proj.weight.copy_(ref.out_proj.weight)
        if bias:
            ours.qkv.bias.copy_(ref.in_proj_bias)
            ours.proj.bias.copy_(ref.out_proj.bias)
    return ours, ref


@pytest.mark.parametrize("bias", [True, False])
def test_mha_self_attention_causal_matches_torch(bias):
    ours, ref = _mha_pair(bias)
    x = torch.randn(2, 6, C)
    with torch.no_grad():
        r, rw = ref(x, x, x, attn_mask=causal_mask(6), average_attn_weights=False)
        y, w = ours(x, is_causal=True, need_weights=True)
        y_fused, w_none = ours(x, is_causal=True)
    assert w_none is None
    assert w.shape == (2, NH, 6, 6)
    assert maxdiff(y, r) <= TOL
    assert maxdiff(w, rw) <= TOL
    assert maxdiff(y_fused, r) <= TOL
    assert torch.all(torch.triu(w, 1) == 0)


def test_mha_self_attention_no_mask_matches_torch():
    ours, ref = _mha_pair()
    x = torch.randn(3, 5, C)
    with torch.no_grad():
        r, rw = ref(x, x, x, average_attn_weights=False)
        y, w = ours(x, need_weights=True)
        y_fused, _ = ours(x)
    assert maxdiff(y, r) <= TOL and maxdiff(w, rw) <= TOL and maxdiff(y_fused, r) <= TOL


def test_mha_key_padding_matches_torch():
    ours, ref = _mha_pair()
    x = torch.randn(2, 7, C)
    real = torch.ones(2, 7, dtype=torch.bool)
    real[0, 5:] = False
    real[1, 3:] = False
    with torch.no_grad():
        r, rw = ref(x, x, x, key_padding_mask=~real, average_attn_weights=False)  # True = pad there
        y, w = ours(x, mask=padding_mask(real), need_weights=True)
        y_fused, _ = ours(x, mask=padding_mask(real))
    assert maxdiff(y, r) <= TOL
    assert maxdiff(w, rw) <= TOL
    assert maxdiff(y_fused, y) <= TOL
    assert torch.all(w[0, :, :, 5:] == 0) and torch.all(w[1, :, :, 3:] == 0)


def test_mha_causal_plus_key_padding_matches_torch():
    ours, ref = _mha_pair()
    x = torch.randn(2, 6, C)
    real = torch.ones(2, 6, dtype=torch.bool)
    real[1, 4:] = False
    with torch.no_grad():
        future = ~torch.tril(torch.ones(6, 6, dtype=torch.bool))  # nn.MultiheadAttention: True = may not attend
        r, rw = ref(x, x, x, attn_mask=future, key_padding_mask=~real, average_attn_weights=False)
        y, w = ours(x, mask=padding_mask(real), is_causal=True, need_weights=True)
        y_fused, _ = ours(x, mask=padding_mask(real), is_causal=True)
    assert maxdiff(y, r) <= TOL and maxdiff(w, rw) <= TOL and maxdiff(y_fused, y) <= TOL


def test_mha_cross_attention_matches_torch():
    ours, ref = _mha_pair()
    x, mem = torch.randn(2, 5, C), torch.randn(2, 9, C)
    real = torch.ones(2, 9, dtype=torch.bool)
    real[0, 6:] = False
    with torch.no_grad():
        r, rw = ref(x, mem, mem, average_attn_weights=False)
        y, w = ours(x, memory=mem, need_weights=True)
        y_fused, _ = ours(x, memory=mem)
        rp, rpw = ref(x, mem, mem, key_padding_mask=~real, average_attn_weights=False)
        yp, wp = ours(x, memory=mem, mask=padding_mask(real), need_weights=True)
        yp_fused, _ = ours(x, memory=mem, mask=padding_mask(real))
    assert w.shape == (2, NH, 5, 9)
    assert maxdiff(y, r) <= TOL and maxdiff(w, rw) <= TOL and maxdiff(y_fused, r) <= TOL
    assert maxdiff(yp, rp) <= TOL and maxdiff(wp, rpw) <= TOL and maxdiff(yp_fused, rp) <= TOL
    assert torch.all(wp[0, :, :, 6:] == 0)


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_self_attention_cache_matches_full(need_weights):
    ours, _ = _mha_pair()
    x = torch.randn(2, 9, C)
    with torch.no_grad():
        full, _ = ours(x, is_causal=True, need_weights=need_weights)
        cache = KVCache()
        outs, start = [], 0
        for n in (3, 1, 2, 1, 2):  # chunks of several tokens and single tokens
            y, _ = ours(x[:, start:start + n], is_causal=True, cache=cache, need_weights=need_weights)
            outs.append(y)
            start += n
    assert cache.length == 9
    assert maxdiff(torch.cat(outs, 1), full) <= TOL


def test_mha_cross_attention_cache_is_computed_once():
    ours, _ = _mha_pair()
    x, mem = torch.randn(2, 4, C), torch.randn(2, 6, C)
    with torch.no_grad():
        full, _ = ours(x, memory=mem)
        cache = KVCache(static=True)
        first, _ = ours(x[:, :1], memory=mem, cache=cache)
        k_first = cache.k
        rest, _ = ours(x[:, 1:], memory=mem * 0, cache=cache)  # memory ignored once cached
    assert cache.k is k_first and cache.length == 6
    assert maxdiff(torch.cat([first, rest], 1), full) <= TOL


def test_mha_width_not_divisible_raises_value_error():
    with pytest.raises(ValueError, match="divisible"):
        MultiHeadAttention(30, 4)


def test_config_width_not_divisible_raises_config_error():
    with pytest.raises(ConfigError, match="divisible") as e:
        ModelConfig(n_embd=30, n_head=4)
    assert isinstance(e.value, LlmlabError)


# ----------------------------------------------------------------------------- rotary positions


def _rope_reference(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Complex-number form: channel pair (2i, 2i+1) as a + ib, multiplied by exp(i * pos * theta^(-2i/d))."""
    d = x.size(-1)
    x64 = x.double()
    z = torch.complex(x64[..., 0::2], x64[..., 1::2])
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64), pos.double()[:, None] * freq)
    out = z * rot
    return torch.stack((out.real, out.imag), -1).flatten(-2)


def test_rope_matches_complex_rotation_reference():
    rope = RotaryEmbedding(16, max_positions=64)
    x = torch.randn(2, 3, 10, 16)
    pos = torch.arange(20, 30)
    out = rope(x, pos)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert maxdiff(out.double(), _rope_reference(x, pos)) <= 1e-4
    # position 0 is the identity; other positions are not
    assert maxdiff(rope(x, torch.zeros(10, dtype=torch.long)), x) == 0
    assert maxdiff(out, x) > 1e-2


def test_rope_preserves_norms():
    rope = RotaryEmbedding(32, max_positions=128)
    x = torch.randn(2, 4, 50, 32)
    out = rope(x, torch.arange(50) * 2)
    assert maxdiff(out.norm(dim=-1), x.norm(dim=-1)) <= 1e-4 * x.norm(dim=-1).max().item()


def test_rope_dot_product_depends_only_on_relative_position():
    hs = 16
    rope = RotaryEmbedding(hs, max_positions=256)
    q = F.normalize(torch.randn(1, 1, 1, hs), dim=-1)
    k = F.normalize(torch.randn(1, 1, 1, hs), dim=-1)

    def dot(m: int, n: int) -> float:
        rq = rope(q, torch.tensor([m]))
        rk = rope(k, torch.tensor([n]))
        return (rq * rk).sum().item()

    for m, n in ((3, 0), (0, 5), (7, 7), (10, 2)):
        base = dot(m, n)
        for s in (1, 13, 100):
            assert abs(dot(m + s, n + s) - base) <= 1e-5, (m, n, s)
    # ... and it does depend on the relative position
    assert abs(dot(3, 0) - dot(4, 0)) > 1e-3


def test_rope_batched_positions_equal_per_row_positions():
    rope = RotaryEmbedding(8, max_positions=32)
    x = torch.randn(2, 2, 5, 8)
    pos = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])  # (B, T), e.g. left padding
    out = rope(x, pos)
    for b in range(2):
        assert maxdiff(out[b:b + 1], rope(x[b:b + 1], pos[b])) == 0


def test_rope_odd_head_size_rejected():
    with pytest.raises(ValueError):
        RotaryEmbedding(7)
    with pytest.raises(ConfigError):
        ModelConfig(position="rope", n_embd=12, n_head=4)  # head size 3


# ----------------------------------------------------------------------------- KV cache


def test_kv_cache_append_returns_concatenation():
    cache = KVCache()
    ks, vs = [], []
    for t in (5, 1, 60, 1, 7, 100, 3):  # grows past the first and second capacity
        k, v = torch.randn(2, 3, t, 4), torch.randn(2, 3, t, 4)
        ks.append(k)
        vs.append(v)
        all_k, all_v = cache.append(k, v)
        assert torch.equal(all_k, torch.cat(ks, 2))
        assert torch.equal(all_v, torch.cat(vs, 2))
        assert cache.length == all_k.size(2)
    assert cache.length == 177


def test_kv_cache_reorder_keeps_rows():
    cache = KVCache()
    k, v = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    cache.append(k, v)
    cache.reorder(torch.tensor([2, 0]))
    k2, v2 = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    all_k, all_v = cache.append(k2, v2)
    assert torch.equal(all_k, torch.cat([k[[2, 0]], k2], 2))
    assert torch.equal(all_v, torch.cat([v[[2, 0]], v2], 2))


def test_fused_attention_with_a_float32_mask_on_float64_queries() -> None:
    """A float64 model's padding mask is float32: the fused kernel must still apply it right (torch 2.13's CPU
    kernel silently misreads a 4-D mask of another float dtype, so llmlab casts it)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, dtype=torch.float64) for _ in range(3))
    mask = causal_mask(40)[None, None]  # float32
    assert mask.dtype == torch.float32
    torch.testing.assert_close(fused_attention(q, k, v, attn_mask=mask),
                               F.scaled_dot_product_attention(q, k, v, is_causal=True))
