"""Llama as a configuration of llmlab's one decoder: grouped-query attention, RoPE with a configurable base,
RMSNorm, SwiGLU, no biases, tied or untied embeddings — checked against transformers' LlamaForCausalLM on
random small models, through the Hugging Face folder import and export."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import llmlab
from conftest import randomize_
from llmlab.attention import (
    MultiHeadAttention,
    RotaryEmbedding,
    repeat_kv,
    rope_rows_from_halves,
    rope_rows_to_halves,
    scaled_dot_product_attention,
)
from llmlab.chat_template import apply_chat_template
from llmlab.config import ModelConfig, llama_config
from llmlab.errors import ConfigError, ModelLoadError
from llmlab.interop import export, export_llama
from llmlab.models import GPT, Bert, Seq2Seq, build_model, from_weights
from llmlab.tokenizers import BPETokenizer

TOL = 1e-5
V = 97


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def hf_llama(n_head: int = 6, n_kv: int = 2, tie: bool = False, bias: bool = False, seed: int = 0,
             **kw) -> LlamaForCausalLM:
    """A random LlamaForCausalLM with non-default RoPE base and norm epsilon, and non-trivial norm weights."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=8 * n_head, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=n_head, num_key_value_heads=n_kv, max_position_embeddings=64,
                      rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, attention_bias=bias,
                      mlp_bias=bias, bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # bigger weights than the 0.02 initialisation, so attention is not near-uniform
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.copy_(1.0 + 0.1 * torch.randn_like(p)) \
                if "norm" in name else p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module", params=[(6, 6), (6, 2), (6, 1)], ids=["mha", "gqa-3", "mqa"])
def pair(request, tmp_path_factory):
    """(transformers model, llmlab model via the HF-folder import) for GQA ratios 1, 3 and 6 (one KV head)."""
    n_head, n_kv = request.param
    hf = hf_llama(n_head, n_kv)
    folder = tmp_path_factory.mktemp(f"llama_{n_head}_{n_kv}")
    hf.save_pretrained(folder)
    return hf, llmlab.load(folder)


# ----------------------------------------------------------------------------- grouped-query attention


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_gqa_equals_multi_head_attention_on_repeated_keys_and_values(n_kv):
    """GQA with n_kv key/value heads is multi-head attention whose key/value heads are copies: query head h
    reads key/value head h // (n_head / n_kv)."""
    C, nh = 32, 4
    hs, g = C // nh, nh // n_kv
    gqa = MultiHeadAttention(C, nh, bias=True, n_kv_head=n_kv)
    mha = MultiHeadAttention(C, nh, bias=True)
    with torch.no_grad():
        for p in gqa.parameters():
            p.normal_(0.0, 0.3)
        wq, wk, wv = gqa.qkv.weight.split([C, n_kv * hs, n_kv * hs])
        bq, bk, bv = gqa.qkv.bias.split([C, n_kv * hs, n_kv * hs])
        rep = lambda w: w.view(n_kv, hs, *w.shape[1:]).repeat_interleave(g, 0).reshape(C, *w.shape[1:])  # noqa
        mha.qkv.weight.copy_(torch.cat([wq, rep(wk), rep(wv)]))
        mha.qkv.bias.copy_(torch.cat([bq, rep(bk), rep(bv)]))
        mha.proj.load_state_dict(gqa.proj.state_dict())
    assert gqa.qkv.out_features == C + 2 * n_kv * hs  # fewer key/value rows
    x = torch.randn(2, 9, C)
    pad = torch.zeros(2, 1, 1, 9)
    pad[0, ..., :3] = float("-inf")
    with torch.no_grad():
        for kw in ({}, {"is_causal": True}, {"mask": pad, "is_causal": True}):
            y, _ = gqa(x, **kw)
            assert maxdiff(y, mha(x, **kw)[0]) <= 1e-5, kw
            yw, w = gqa(x, need_weights=True, **kw)  # the explicit formula path
            assert maxdiff(yw, y) <= 1e-5 and w.shape == (2, nh, 9, 9)
        # the formula, written out: repeat K/V per group, then plain attention
        q, k, v = gqa._heads_all(gqa.qkv(x))
        assert k.shape == (2, n_kv, 9, hs)
        ref, _ = scaled_dot_product_attention(q, repeat_kv(k, g), repeat_kv(v, g))
        assert maxdiff(gqa.proj(ref.transpose(1, 2).reshape(2, 9, C)), gqa(x)[0]) <= 1e-5


def test_gqa_kv_cache_holds_only_the_shared_heads_and_decodes_like_recompute():
    cfg = llama_config(vocab_size=V, block_size=64, n_layer=2, n_head=6, n_kv_head=2, n_embd=48, n_inner=64)
    model = randomize_(GPT(cfg)).eval()
    ids = torch.randint(0, V, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        for am in (None, mask):
            full = model(ids, attention_mask=am)
            caches = model.new_caches()
            outs = [model(ids[:, :5], caches=caches, attention_mask=None if am is None else am[:, :5])]
            for t in range(5, 14):
                outs.append(model(ids[:, t:t + 1], caches=caches, attention_mask=None if am is None else am[:, :t + 1]))
            real = slice(None) if am is None else am.bool()
            assert maxdiff(torch.cat(outs, 1)[real], full[real]) <= TOL
    assert caches[0].k.shape[1] == 2  # (B, n_kv_head, T, hs): a third of the multi-head cache


def test_n_kv_head_must_divide_n_head():
    with pytest.raises(ConfigError, match="n_kv_head"):
        ModelConfig(n_head=4, n_embd=32, n_kv_head=3)
    with pytest.raises(ConfigError, match="n_kv_head"):
        ModelConfig(n_head=4, n_embd=32, n_kv_head=0)
    assert ModelConfig(n_head=4, n_embd=32).kv_heads == 4
    assert ModelConfig(n_head=4, n_embd=32, n_kv_head=1).kv_heads == 1


def test_old_config_dicts_without_new_fields_still_load():
    old = ModelConfig(n_head=4, n_embd=32).to_dict()
    old.pop("n_kv_head")
    cfg = ModelConfig.from_dict(old)
    assert cfg.n_kv_head is None and cfg.kv_heads == 4
    model = build_model(cfg)
    assert model.h[0].attn.qkv.weight.shape == (96, 32)  # the (3C, C) layout of earlier run folders


# ----------------------------------------------------------------------------- RoPE


def test_rope_base_is_configurable_and_used():
    a, b = RotaryEmbedding(16, 32, theta=10000.0), RotaryEmbedding(16, 32, theta=500000.0)
    x = torch.randn(1, 2, 8, 16)
    pos = torch.arange(8)
    assert maxdiff(a(x[:, :, :1], pos[:1]), x[:, :, :1]) <= 1e-6  # position 0 is the identity
    assert maxdiff(a(x, pos), b(x, pos)) > 1e-3
    cfg = llama_config(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, rope_theta=123.0)
    assert GPT(cfg).h[0].attn.rotary.theta == 123.0


def test_rope_tables_stay_float32_when_the_model_is_cast():
    cfg = llama_config(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)
    model = GPT(cfg).to(torch.bfloat16)
    rope = model.h[0].attn.rotary
    assert rope.cos.dtype == torch.float32 and rope.sin.dtype == torch.float32
    assert model(torch.randint(0, V, (1, 5))).dtype == torch.bfloat16


def test_rope_row_permutation_round_trips_and_is_llama_cpps():
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)  # 2 heads of size 8
    p = rope_rows_from_halves(w, 2)
    assert torch.equal(rope_rows_to_halves(p, 2), w)
    # head 0: HF rows (0..3 | 4..7) -> pairs (0, 4), (1, 5), (2, 6), (3, 7)
    assert p[:8, 0].tolist() == [0, 12, 3, 15, 6, 18, 9, 21]


# ----------------------------------------------------------------------------- against transformers


def test_preset_is_the_decoder_with_llama_options():
    cfg = llama_config()
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.inner, cfg.vocab_size) == (30, 9, 3, 576, 1536,
                                                                                             49152)
    small = GPT(llama_config(vocab_size=V, block_size=32, n_layer=1, n_head=4, n_kv_head=2, n_embd=32, n_inner=48))
    assert type(small.h[0]).__name__ == "Block" and not any(n.endswith("bias") for n, _ in small.named_parameters())
    assert small.lm_head.weight is small.wte.weight  # tied, as SmolLM2


def test_random_llama_matches_transformers(pair):
    hf, ours = pair
    assert isinstance(ours, GPT) and not ours.training
    assert ours.config.kv_heads == hf.config.num_key_value_heads
    assert ours.config.rope_theta == 5000.0 and ours.config.norm_eps == 1e-6
    ids = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        assert maxdiff(ours(ids), hf(ids).logits) <= TOL


def test_random_llama_padded_batch_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, V, (3, 16))
    am = torch.ones_like(ids)
    am[0, :5], am[2, :11] = 0, 0
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a, b = ours(ids, attention_mask=am), hf(ids, attention_mask=am, position_ids=pos).logits
    real = am.bool()
    assert maxdiff(a[real], b[real]) <= TOL


def test_random_llama_kv_cache_decoding_equals_recompute(pair):
    _, ours = pair
    ids = torch.randint(0, V, (2, 18))
    with torch.no_grad():
        full = ours(ids)
        caches = ours.new_caches()
        chunks = [ours(ids[:, a:b], caches=caches) for a, b in ((0, 6), (6, 7), (7, 10), (10, 18))]
    assert maxdiff(torch.cat(chunks, 1), full) <= TOL


def test_random_llama_greedy_generation_equals_transformers(pair):
    from llmlab.generate import GenerationConfig, generate_ids

    hf, ours = pair
    prompt = torch.randint(0, V, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, min_new_tokens=12,
                          do_sample=False, pad_token_id=0)[0, 7:].tolist()
    assert generate_ids(ours, [prompt[0].tolist()], GenerationConfig(max_new_tokens=12, temperature=0.0)) == [ref]


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_embeddings(tie, tmp_path):
    hf = hf_llama(4, 2, tie=tie)
    hf.save_pretrained(tmp_path)
    ours = llmlab.load(tmp_path)
    assert ours.config.tie_embeddings is tie
    assert (ours.lm_head.weight is ours.wte.weight) is tie
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert maxdiff(ours(ids), hf(ids).logits) <= TOL


def test_llama_with_biases_matches_transformers(tmp_path):
    hf = hf_llama(4, 2, bias=True)
    hf.save_pretrained(tmp_path)
    ours = llmlab.load(tmp_path)
    assert ours.config.bias and ours.h[0].attn.qkv.bias is not None
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert maxdiff(ours(ids), hf(ids).logits) <= TOL


def test_weights_are_copied_not_shared_with_the_source(pair):
    hf, ours = pair
    assert ours.wte.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize(("change", "words"), [({"hidden_act": "gelu"}, "activation"),
                                               ({"rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                     "rope_theta": 1e4}}, "RoPE scaling"),
                                               ({"head_dim": 16}, "head_dim"),
                                               ({"attention_bias": True, "mlp_bias": False}, "biases")])
def test_unsupported_llama_variants_are_refused_by_name(change, words, tmp_path):
    hf = hf_llama(4, 2)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=words):
        llmlab.load(tmp_path)


def test_sharded_hf_folder_loads(tmp_path):
    hf = hf_llama(4, 2)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert maxdiff(llmlab.load(tmp_path)(ids), hf(ids).logits) <= TOL


def test_bf16_weights_on_request(pair, tmp_path):
    hf, _ = pair
    hf.save_pretrained(tmp_path)
    ours = llmlab.load(tmp_path, dtype="bfloat16")
    assert ours.wte.weight.dtype == torch.bfloat16
    ids = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        ref = hf(ids).logits
        assert maxdiff(ours(ids).float(), ref) <= 0.1 * ref.abs().max().item()


# ----------------------------------------------------------------------------- export


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer() -> BPETokenizer:
    text = "the quick brown fox jumps over the lazy dog 0123456789 " * 20
    tok = BPETokenizer.train([text], vocab_size=300, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok.chat_template = TEMPLATE
    return tok


def test_export_llama_round_trips_through_transformers(tmp_path):
    tok = _tokenizer()
    cfg = llama_config(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=6, n_kv_head=2, n_embd=48,
                       n_inner=64, rope_theta=20000.0, tie_embeddings=False)
    model = randomize_(GPT(cfg)).eval()
    model.tokenizer = tok
    out = export(model, tmp_path / "hf")  # export() picks Llama for a Llama-shaped GPT
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    hf = LlamaForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, tok.vocab_size, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        assert maxdiff(hf(ids).logits, ref) <= TOL
        back = llmlab.load(out)
        assert maxdiff(back(ids), ref) <= TOL
    # the tokenizer travels with it, chat template included
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = "the lazy fox 42 <|im_end|> jumps"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text) == back.tokenizer.encode(text)
    msgs = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        apply_chat_template(back.tokenizer, msgs)
    assert back.tokenizer.eos_id == tok.eos_id and hf.config.eos_token_id == tok.eos_id


def test_export_refuses_a_model_that_is_not_a_llama(tmp_path):
    model = GPT(ModelConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=16))
    with pytest.raises(ConfigError, match="Llama needs"):
        export_llama(model, tmp_path)


def test_export_writes_a_char_tokenizer_that_transformers_reads(tmp_path):
    from llmlab.tokenizers import CharTokenizer

    tok = CharTokenizer.train("hello world\n", specials=("<|endoftext|>",))
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=16)).eval()
    model.tokenizer = tok
    export(model, tmp_path)  # GPT-2 shaped
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "hello\nworld<|endoftext|>"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf_tok.decode(tok.encode(text)) == text
    assert llmlab.load(tmp_path).tokenizer.encode(text) == tok.encode(text)


# ----------------------------------------------------------------------------- families


def test_token_embedding_has_one_name_in_all_three_families():
    small = dict(vocab_size=V, block_size=16, n_layer=1, n_dec_layer=1, n_head=2, n_embd=16)
    for cls, arch, own in ((GPT, "gpt", "wte"), (Bert, "bert", "word_embeddings"), (Seq2Seq, "seq2seq", "tok_emb")):
        model = cls(ModelConfig(arch=arch, **small))
        assert model.token_embedding is getattr(model, own)  # checkpoints keep their own names


def test_from_weights_skips_initialisation_but_not_checks():
    cfg = llama_config(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, n_inner=24)
    ref = randomize_(GPT(cfg)).eval()
    state = {k: v.clone() for k, v in ref.state_dict().items() if k != "lm_head.weight"}
    model = from_weights(cfg, state)
    assert model.lm_head.weight is model.wte.weight
    ids = torch.randint(0, V, (1, 6))
    with torch.no_grad():
        assert maxdiff(model(ids), ref(ids)) == 0
    with pytest.raises(KeyError, match="ln_f"):
        from_weights(cfg, {k: v for k, v in state.items() if k != "ln_f.weight"})
    with pytest.raises(ValueError, match="shape"):
        from_weights(cfg, {**state, "ln_f.weight": torch.ones(3)})


def test_bf16_one_token_steps_use_torch_kernels_and_agree_with_recompute():
    cfg = llama_config(vocab_size=V, block_size=64, n_layer=2, n_head=6, n_kv_head=2, n_embd=48, n_inner=64)
    model = randomize_(GPT(cfg)).eval().to(torch.bfloat16)
    ids = torch.randint(0, V, (1, 12))
    seen = []
    model.h[0].mlp.fc.register_forward_hook(lambda *a: seen.append(torch.backends.mkldnn.enabled))
    with torch.no_grad():
        full = model(ids).float()
        caches = model.new_caches()
        steps = [model(ids[:, :4], caches=caches)] + [model(ids[:, t:t + 1], caches=caches) for t in range(4, 12)]
    assert seen[0] and seen[1] and not any(seen[2:])  # oneDNN for many rows, torch's gemv for one
    assert torch.backends.mkldnn.enabled  # the setting is restored
    assert caches[0].k.dtype == torch.float32  # attention runs in float32; the cache is kept in it
    assert maxdiff(torch.cat(steps, 1).float(), full) <= 0.05 * full.abs().max().item()


def test_cli_export_writes_a_llama_folder_for_a_llama_model(tmp_path, capsys):
    from llmlab.cli import main

    tok = _tokenizer()
    cfg = llama_config(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=4, n_kv_head=2, n_embd=32,
                       n_inner=48)
    model = randomize_(GPT(cfg)).eval()
    model.tokenizer = tok
    src = export(model, tmp_path / "src")
    assert main(["export", str(src), "--out", str(tmp_path / "out")]) == 0
    assert "LlamaForCausalLM.from_pretrained" in capsys.readouterr().out
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, tok.vocab_size, (1, 8))
    with torch.no_grad():
        assert maxdiff(hf(ids).logits, model(ids)) <= TOL
    assert main(["export", str(src), "--out", str(tmp_path / "out")]) == 2  # not empty: nothing overwritten
