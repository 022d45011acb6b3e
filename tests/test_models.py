"""The model families against torch.nn reference implementations, incremental decoding, attention
maps and the configuration."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
import torch.nn as nn

from conftest import randomize_
from llmlab.attention import padding_mask
from llmlab.blocks import Block, sinusoidal_positions
from llmlab.config import ModelConfig, bert_config, gpt2_config, transformer2017_config
from llmlab.errors import ConfigError, LlmlabError
from llmlab.models import GPT, Bert, Seq2Seq, build_model

TOL = 1e-5


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------- Seq2Seq vs nn.Transformer

D, NHEAD, FF, V = 32, 4, 64, 50


def transformer_to_seq2seq(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """nn.Transformer state-dict names -> Seq2Seq names."""
    out = {}
    for k, v in sd.items():
        k2 = k.replace("layers.", "")
        for a, b in (("self_attn.in_proj_weight", "attn.qkv.weight"), ("self_attn.in_proj_bias", "attn.qkv.bias"),
                     ("self_attn.out_proj", "attn.proj"), ("multihead_attn.in_proj_weight", "cross.qkv.weight"),
                     ("multihead_attn.in_proj_bias", "cross.qkv.bias"), ("multihead_attn.out_proj", "cross.proj"),
                     ("linear1", "mlp.fc"), ("linear2", "mlp.proj")):
            k2 = k2.replace(a, b)
        if k2.startswith("decoder."):  # the decoder's norm2 sits after cross-attention, norm3 after the MLP
            k2 = k2.replace("norm2", "norm_cross").replace("norm3", "norm2")
        k2 = k2.replace("encoder.norm.", "enc_norm.").replace("decoder.norm.", "dec_norm.")
        out[k2] = v
    return out


def _seq2seq_pair(prenorm: bool, final_norm: bool):
    with warnings.catch_warnings():  # "enable_nested_tensor is True, but ... norm_first was True"
        warnings.simplefilter("ignore", UserWarning)
        ref = nn.Transformer(d_model=D, nhead=NHEAD, num_encoder_layers=2, num_decoder_layers=2,
                             dim_feedforward=FF, dropout=0.0, batch_first=True, norm_first=prenorm)
    ref.encoder.use_nested_tensor = False  # keep torch on its plain (non-nested) path
    if not final_norm:
        ref.encoder.norm = None
        ref.decoder.norm = None
    randomize_(ref, scale=0.3)
    ref.eval()
    ours = Seq2Seq(transformer2017_config(vocab_size=V, n_embd=D, n_head=NHEAD, n_layer=2, n_dec_layer=2,
                                          n_inner=FF, prenorm=prenorm, final_norm=final_norm)).eval()
    missing, unexpected = ours.load_state_dict(transformer_to_seq2seq(ref.state_dict()), strict=False)
    assert unexpected == []
    assert sorted(missing) == ["lm_head.weight", "tok_emb.weight"]  # embeddings are not part of nn.Transformer
    return ours, ref


CASES = [pytest.param(False, True, id="postln-final_norm"), pytest.param(False, False, id="postln-no_final_norm"),
         pytest.param(True, True, id="preln-final_norm")]


@pytest.mark.parametrize("prenorm,final_norm", CASES)
def test_seq2seq_matches_nn_transformer(prenorm, final_norm):
    ours, ref = _seq2seq_pair(prenorm, final_norm)
    src, tgt = torch.randn(2, 7, D), torch.randn(2, 5, D)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        r = ref(src, tgt, tgt_mask=causal, tgt_is_causal=True)
        mem = ours.encoder_stack(src)
        r_mem = ref.encoder(src)
        mine = ours.decoder_stack(tgt, mem)
    assert maxdiff(mem, r_mem) <= TOL
    assert maxdiff(mine, r) <= TOL


@pytest.mark.parametrize("prenorm,final_norm", CASES)
def test_seq2seq_matches_nn_transformer_with_source_padding(prenorm, final_norm):
    ours, ref = _seq2seq_pair(prenorm, final_norm)
    src, tgt = torch.randn(2, 7, D), torch.randn(2, 6, D)
    real = torch.ones(2, 7, dtype=torch.bool)
    real[0, 4:] = False
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    with torch.no_grad():
        r = ref(src, tgt, tgt_mask=causal, tgt_is_causal=True, src_key_padding_mask=~real,
                memory_key_padding_mask=~real)
        r_mem = ref.encoder(src, src_key_padding_mask=~real)
        mem = ours.encoder_stack(src, real.long())
        mine = ours.decoder_stack(tgt, mem, src_mask=real.long())
    # torch's fast path may zero padded positions of the encoder output: compare real ones only
    assert maxdiff(mem[real], r_mem[real]) <= TOL
    assert maxdiff(mine, r) <= TOL


def test_seq2seq_embedding_is_scaled_tokens_plus_sinusoids():
    cfg = transformer2017_config(vocab_size=V, n_embd=D, n_head=NHEAD, n_layer=1, n_dec_layer=1, n_inner=FF)
    model = Seq2Seq(cfg).eval()
    ids = torch.randint(0, V, (2, 6))
    pos = torch.arange(3, 9, dtype=torch.float64)[:, None]
    i = torch.arange(0, D, 2, dtype=torch.float64)
    pe = torch.zeros(6, D, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos / 10000 ** (i / D))
    pe[:, 1::2] = torch.cos(pos / 10000 ** (i / D))
    expected = model.tok_emb.weight.double()[ids] * math.sqrt(D) + pe
    with torch.no_grad():
        assert maxdiff(model.embed(ids, offset=3).double(), expected) <= 1e-5
    assert maxdiff(sinusoidal_positions(9, D)[3:].double(), pe) <= 1e-5


def _tiny_seq2seq(**kw) -> Seq2Seq:
    cfg = transformer2017_config(vocab_size=V, n_embd=D, n_head=NHEAD, n_layer=2, n_dec_layer=2, n_inner=FF,
                                 block_size=32, **kw)
    return randomize_(Seq2Seq(cfg)).eval()


@pytest.mark.parametrize("kw", [{}, {"prenorm": True, "final_norm": True}, {"position": "learned"}],
                         ids=["postln", "preln", "learned"])
def test_seq2seq_incremental_decoding_matches_full_decode(kw):
    model = _tiny_seq2seq(**kw)
    src = torch.randint(1, V, (2, 8))
    src_mask = torch.ones(2, 8, dtype=torch.long)
    src_mask[1, 5:] = 0
    tgt = torch.randint(1, V, (2, 7))
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        full = model.decode(tgt, memory, src_mask)
        assert maxdiff(full, model(src, tgt, src_mask)) <= TOL
        caches = model.new_caches()
        outs = [model.decode(tgt[:, :3], memory, src_mask, caches=caches)]
        for t in range(3, 7):
            outs.append(model.decode(tgt[:, t:t + 1], memory, src_mask, caches=caches))
    assert full.shape == (2, 7, V)
    assert maxdiff(torch.cat(outs, 1), full) <= TOL
    self_caches, cross_caches = caches
    assert all(c.length == 7 for c in self_caches)
    assert all(c.length == 8 for c in cross_caches)


# ----------------------------------------------------------------------------- BERT block vs nn.TransformerEncoderLayer


def test_bert_postln_block_matches_transformer_encoder_layer():
    cfg = bert_config(vocab_size=V, n_layer=1, n_head=NHEAD, n_embd=D, n_inner=FF, block_size=16)
    ref = nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, activation="gelu", batch_first=True,
                                     norm_first=False, layer_norm_eps=cfg.norm_eps)
    randomize_(ref, scale=0.3)
    ref.eval()
    block = Block(cfg).eval()
    names = {"self_attn.in_proj_weight": "attn.qkv.weight", "self_attn.in_proj_bias": "attn.qkv.bias",
             "self_attn.out_proj.weight": "attn.proj.weight", "self_attn.out_proj.bias": "attn.proj.bias",
             "linear1.weight": "mlp.fc.weight", "linear1.bias": "mlp.fc.bias",
             "linear2.weight": "mlp.proj.weight", "linear2.bias": "mlp.proj.bias",
             "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
             "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias"}
    block.load_state_dict({names[k]: v for k, v in ref.state_dict().items()}, strict=True)
    x = torch.randn(2, 9, D)
    real = torch.ones(2, 9, dtype=torch.bool)
    real[1, 6:] = False
    with torch.no_grad():
        assert maxdiff(block(x), ref(x)) <= TOL
        mine = block(x, mask=padding_mask(real))
        r = ref(x, src_key_padding_mask=~real)
    assert maxdiff(mine[real], r[real]) <= TOL


# ----------------------------------------------------------------------------- attention maps


def _rows_sum_to_one(w: torch.Tensor) -> bool:
    return torch.allclose(w.sum(-1), torch.ones(w.shape[:-1]), atol=1e-5)


def test_gpt_attention_maps():
    cfg = gpt2_config(vocab_size=V, n_layer=3, n_head=NHEAD, n_embd=D, block_size=32)
    model = GPT(cfg).eval()
    ids = torch.randint(0, V, (2, 10))
    weights: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        logits = model(ids, weights=weights)
        plain = model(ids)
    assert maxdiff(logits, plain) <= TOL  # the explicit path (maps) equals the fused one
    assert set(weights) == {"self"}
    assert len(weights["self"]) == 3
    for w in weights["self"]:
        assert w.shape == (2, NHEAD, 10, 10)
        assert _rows_sum_to_one(w)
        assert torch.all(torch.triu(w, diagonal=1) == 0)
        assert torch.all(w[..., torch.tril(torch.ones(10, 10, dtype=torch.bool))] > 0)


def test_bert_attention_maps_hide_padding():
    cfg = bert_config(vocab_size=V, n_layer=2, n_head=NHEAD, n_embd=D, n_inner=FF, block_size=16)
    model = Bert(cfg).eval()
    ids = torch.randint(1, V, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, 5:] = 0
    weights: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        h = model(ids, mask, weights=weights)
        plain = model(ids, mask)
    assert maxdiff(h, plain) <= TOL
    assert set(weights) == {"self"} and len(weights["self"]) == 2
    for w in weights["self"]:
        assert w.shape == (2, NHEAD, 8, 8)
        assert _rows_sum_to_one(w)
        assert torch.all(w[0, :, :, 5:] == 0)
        assert torch.all(w[1] > 0)  # bidirectional: every key visible


def test_seq2seq_attention_maps():
    model = _tiny_seq2seq()
    src, tgt = torch.randint(1, V, (2, 7)), torch.randint(1, V, (2, 5))
    src_mask = torch.ones(2, 7, dtype=torch.long)
    src_mask[1, 4:] = 0
    weights: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        logits = model(src, tgt, src_mask, weights=weights)
        plain = model(src, tgt, src_mask)
    assert maxdiff(logits, plain) <= TOL
    assert set(weights) == {"self", "cross"}
    # "self" holds the encoder layers' maps, then the decoder layers' maps
    assert len(weights["self"]) == 2 + 2 and len(weights["cross"]) == 2
    for w in weights["self"][:2]:
        assert w.shape == (2, NHEAD, 7, 7)
        assert _rows_sum_to_one(w)
        assert torch.all(w[1, :, :, 4:] == 0)
    for w in weights["self"][2:]:
        assert w.shape == (2, NHEAD, 5, 5)
        assert _rows_sum_to_one(w)
        assert torch.all(torch.triu(w, diagonal=1) == 0)
    for w in weights["cross"]:
        assert w.shape == (2, NHEAD, 5, 7)
        assert _rows_sum_to_one(w)
        assert torch.all(w[1, :, :, 4:] == 0)
        assert torch.all(w[0] > 0)


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize("preset,arch,prenorm", [(gpt2_config, "gpt", True), (bert_config, "bert", False),
                                                 (transformer2017_config, "seq2seq", False)])
def test_presets_validate_and_round_trip(preset, arch, prenorm):
    cfg = preset()
    cfg.validate()
    assert cfg.arch == arch and cfg.prenorm is prenorm
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(n_layer=1).n_layer == 1 and cfg.n_layer != 1


def test_preset_values():
    g, b, t = gpt2_config(), bert_config(), transformer2017_config()
    assert (g.n_layer, g.n_head, g.n_embd, g.vocab_size, g.block_size) == (12, 12, 768, 50257, 1024)
    assert g.activation == "gelu_tanh" and g.tie_embeddings and g.inner == 3072
    assert b.norm_eps == 1e-12 and b.type_vocab_size == 2 and b.activation == "gelu"
    assert t.position == "sinusoidal" and t.activation == "relu" and t.scale_embeddings and t.inner == 2048
    assert g.head_dim == 64 and t.head_dim == 64


def test_every_preset_builds_its_family():
    small = dict(n_layer=1, n_head=2, n_embd=16, n_inner=32, vocab_size=V, block_size=16)
    assert isinstance(build_model(gpt2_config(**small)), GPT)
    assert isinstance(build_model(bert_config(**small)), Bert)
    assert isinstance(build_model(transformer2017_config(n_dec_layer=1, **small)), Seq2Seq)


def test_from_dict_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict({"n_layers": 3, "n_embd": 64, "bogus": 1})
    msg = str(e.value)
    assert "n_layers" in msg and "bogus" in msg
    for f in dataclasses.fields(ModelConfig):
        assert f.name in msg
    assert isinstance(e.value, LlmlabError)


@pytest.mark.parametrize("bad", [{"arch": "rnn"}, {"norm": "batchnorm"}, {"activation": "tanh"},
                                 {"position": "alibi"}, {"n_layer": 0}, {"n_head": -1}, {"vocab_size": 0},
                                 {"dropout": 1.0}, {"dropout": -0.1}, {"n_embd": 30, "n_head": 4},
                                 {"position": "rope", "n_embd": 12, "n_head": 4}, {"n_layer": None}])
def test_invalid_config_raises_config_error(bad):
    with pytest.raises(ConfigError):
        ModelConfig.from_dict(bad)


@pytest.mark.parametrize("bad", [{"n_layer": "four"}, {"n_layer": 2.5}, {"vocab_size": "65"}])
def test_non_integer_sizes_raise_config_error(bad):
    with pytest.raises(ConfigError):
        ModelConfig.from_dict(bad)
