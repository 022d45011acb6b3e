"""Hugging Face interop: GPT-2 and BERT folders against the transformers implementations, export to
GPT-2, the real pretrained MiniLM against transformers and sentence-transformers, and bad folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
)

import llmlab
from conftest import TINY_GPT2, randomize_
from llmlab.blocks import RMSNorm
from llmlab.config import ModelConfig, gpt2_config
from llmlab.errors import ConfigError, LlmlabError, ModelLoadError
from llmlab.interop import minilm_path
from llmlab.models import GPT, Bert

TOL = 1e-5
V = TINY_GPT2["vocab_size"]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def hf_gpt2(tiny_gpt2_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()


@pytest.fixture(scope="module")
def gpt2(tiny_gpt2_dir):
    return llmlab.load(tiny_gpt2_dir)


def incremental_logits(model, ids: torch.Tensor, prefix: int, attention_mask: torch.Tensor | None = None):
    """Logits from feeding ids[:, :prefix] then one token at a time through KV caches."""
    caches = model.new_caches()
    am = None if attention_mask is None else attention_mask[:, :prefix]
    outs = [model(ids[:, :prefix], caches=caches, attention_mask=am)]
    for t in range(prefix, ids.size(1)):
        am = None if attention_mask is None else attention_mask[:, :t + 1]
        outs.append(model(ids[:, t:t + 1], caches=caches, attention_mask=am))
    return torch.cat(outs, 1)


# ----------------------------------------------------------------------------- GPT-2


def test_gpt2_load_matches_transformers(gpt2, hf_gpt2):
    assert isinstance(gpt2, GPT)
    assert not gpt2.training and not any(m.training for m in gpt2.modules())
    assert gpt2.config.n_layer == 2 and gpt2.config.n_embd == 64 and gpt2.config.vocab_size == V
    ids = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        ours = gpt2(ids)
        ref = hf_gpt2(ids).logits
    assert ours.shape == (3, 20, V)
    assert maxdiff(ours, ref) <= TOL


def test_gpt2_attention_mask_matches_transformers(gpt2, hf_gpt2):
    ids = torch.randint(1, V, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[0, :3] = 0  # left padding
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = gpt2(ids, attention_mask=am)
        ref = hf_gpt2(ids, attention_mask=am, position_ids=pos).logits
    real = am.bool()
    assert maxdiff(ours[real], ref[real]) <= TOL


def test_gpt2_export_round_trip_through_transformers(gpt2, tmp_path):
    out = llmlab.export_gpt2(gpt2, tmp_path / "exported")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        ours = gpt2(ids)
        assert maxdiff(hf(ids).logits, ours) <= TOL
        assert maxdiff(llmlab.load(out)(ids), ours) <= TOL


def test_untied_gpt_exports_its_lm_head(tmp_path):
    cfg = gpt2_config(vocab_size=V, n_layer=2, n_head=4, n_embd=32, block_size=32, tie_embeddings=False)
    model = randomize_(GPT(cfg)).eval()
    assert model.lm_head.weight is not model.wte.weight
    llmlab.export_gpt2(model, tmp_path)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert not hf.config.tie_word_embeddings
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        ours = model(ids)
        assert maxdiff(hf(ids).logits, ours) <= TOL
        back = llmlab.load(tmp_path)
        assert maxdiff(back(ids), ours) <= TOL
    assert back.lm_head.weight is not back.wte.weight


def test_untied_hf_gpt2_loads(tmp_path):
    hf = randomize_(GPT2LMHeadModel(GPT2Config(**{**TINY_GPT2, "tie_word_embeddings": False}))).eval()
    hf.save_pretrained(tmp_path)
    model = llmlab.load(tmp_path)
    assert not model.config.tie_embeddings
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert maxdiff(model(ids), hf(ids).logits) <= TOL


def test_gpt2_kv_cache_decoding_matches_full_forward(gpt2):
    ids = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        full = gpt2(ids)
        step = incremental_logits(gpt2, ids, prefix=5)
        # several tokens at a time after the prefix
        caches = gpt2.new_caches()
        chunks = [gpt2(ids[:, a:b], caches=caches) for a, b in ((0, 4), (4, 7), (7, 8), (8, 20))]
    assert maxdiff(step, full) <= TOL
    assert maxdiff(torch.cat(chunks, 1), full) <= TOL
    assert caches[0].length == 20


def test_gpt2_left_padded_batch_matches_unpadded_sequences(gpt2):
    a, b = torch.randint(1, V, (1, 14)), torch.randint(1, V, (1, 20))
    pad = 0
    ids = torch.cat([torch.cat([torch.full((1, 6), pad), a], 1), b])
    am = torch.ones(2, 20, dtype=torch.long)
    am[0, :6] = 0
    with torch.no_grad():
        batched = gpt2(ids, attention_mask=am)
        solo_a, solo_b = gpt2(a), gpt2(b)
        # the same through KV caches, as batched generation does
        cached = incremental_logits(gpt2, ids, prefix=10, attention_mask=am)
    assert torch.isfinite(batched).all() and torch.isfinite(cached).all()  # padded rows too (no empty row)
    assert maxdiff(batched[0, 6:], solo_a[0]) <= TOL
    assert maxdiff(batched[1], solo_b[0]) <= TOL
    assert maxdiff(cached[0, 6:], solo_a[0]) <= TOL
    assert maxdiff(cached[1], solo_b[0]) <= TOL


def _options_gpt() -> GPT:
    cfg = ModelConfig(arch="gpt", vocab_size=V, block_size=48, n_layer=2, n_head=4, n_embd=32, position="rope",
                      norm="rmsnorm", activation="swiglu", bias=False, tie_embeddings=False)
    return randomize_(GPT(cfg)).eval()


def test_gpt_with_options_builds_and_runs():
    model = _options_gpt()
    assert model.wpe is None
    assert model.lm_head.weight is not model.wte.weight
    assert not any(name.endswith("bias") for name, _ in model.named_parameters())
    assert isinstance(model.ln_f, RMSNorm) and isinstance(model.h[0].norm1, RMSNorm)
    assert model.h[0].mlp.fc.out_features == 2 * model.config.inner  # SwiGLU: gate and up
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        logits = model(ids)
        assert logits.shape == (2, 12, V) and torch.isfinite(logits).all()
        # rotary positions matter: a token's logits depend on where it sits
        shifted = model(torch.cat([ids[:, :1], ids], 1))[:, 1:]
    assert maxdiff(shifted, logits) > 1e-4


def test_gpt_with_options_kv_cache_and_left_padding():
    model = _options_gpt()
    ids = torch.randint(1, V, (2, 30))
    with torch.no_grad():
        full = model(ids)
        assert maxdiff(incremental_logits(model, ids, prefix=4), full) <= TOL
        # left padding: rotary positions count real tokens only
        padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[:1]], 1)
        am = torch.ones(1, 35, dtype=torch.long)
        am[0, :5] = 0
        assert maxdiff(model(padded, attention_mask=am)[0, 5:], full[0]) <= TOL


def test_gpt_with_options_cannot_be_exported(tmp_path):
    with pytest.raises(ConfigError) as e:
        llmlab.export_gpt2(_options_gpt(), tmp_path / "out")
    assert "learned positions" in str(e.value) and "LayerNorm" in str(e.value)
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- bad folders


def _bad_folder(kind: str, root, tiny_gpt2_dir):
    """Create the broken input `kind` under root; return the path to pass to llmlab.load."""
    folder = root / kind
    gpt2_cfg = json.loads((tiny_gpt2_dir / "config.json").read_text())
    if kind == "missing":
        return folder
    if kind == "file":
        folder.write_text("not a folder")
        return folder
    folder.mkdir()
    if kind == "empty":
        return folder
    if kind == "malformed_json":
        (folder / "config.json").write_text('{"model_type": "gpt2", ')
    elif kind == "json_not_object":
        (folder / "config.json").write_text("[1, 2, 3]")
    elif kind == "binary_config":
        (folder / "config.json").write_bytes(b"\xff\xfe\x00\x81garbage")
    elif kind == "no_weights":
        (folder / "config.json").write_text(json.dumps(gpt2_cfg))
    elif kind == "truncated_weights":
        shutil.copy(tiny_gpt2_dir / "config.json", folder / "config.json")
        data = (tiny_gpt2_dir / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "unsupported_type":
        (folder / "config.json").write_text(json.dumps({"model_type": "mamba", "hidden_size": 8}))
        save_file({"x": torch.zeros(2)}, str(folder / "model.safetensors"))
    elif kind == "missing_field":
        del gpt2_cfg["n_embd"]
        (folder / "config.json").write_text(json.dumps(gpt2_cfg))
        shutil.copy(tiny_gpt2_dir / "model.safetensors", folder / "model.safetensors")
    elif kind == "weights_do_not_match":
        gpt2_cfg["n_layer"] = 3  # the weights have 2 layers
        (folder / "config.json").write_text(json.dumps(gpt2_cfg))
        shutil.copy(tiny_gpt2_dir / "model.safetensors", folder / "model.safetensors")
    elif kind == "invalid_shape":
        gpt2_cfg["n_head"] = 5  # 64 is not divisible by 5
        (folder / "config.json").write_text(json.dumps(gpt2_cfg))
        shutil.copy(tiny_gpt2_dir / "model.safetensors", folder / "model.safetensors")
    else:
        raise AssertionError(kind)
    return folder


BAD = ["missing", "file", "empty", "malformed_json", "json_not_object", "binary_config", "no_weights",
       "truncated_weights", "unsupported_type", "missing_field", "weights_do_not_match", "invalid_shape"]


@pytest.mark.parametrize("kind", BAD)
def test_load_bad_folder_raises_model_load_error_naming_the_path(kind, tmp_path, tiny_gpt2_dir):
    path = _bad_folder(kind, tmp_path, tiny_gpt2_dir)
    with pytest.raises(ModelLoadError) as e:
        llmlab.load(path)
    assert isinstance(e.value, LlmlabError)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("text", ['{"llmlab": 1}', '{"llmlab": {"format_version": 1}, "model": [1]}',
                                  '{"llmlab": {"format_version": 1}, "model": {"n_layer": "four"}}'],
                         ids=["llmlab_not_object", "model_not_object", "n_layer_not_int"])
def test_malformed_run_config_raises_model_load_error(text, tmp_path):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelLoadError):
        llmlab.load(tmp_path)


def test_untied_gpt2_without_lm_head_is_rejected(tmp_path, tiny_gpt2_dir):
    cfg = json.loads((tiny_gpt2_dir / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shutil.copy(tiny_gpt2_dir / "model.safetensors", tmp_path / "model.safetensors")  # has no lm_head.weight
    with pytest.raises(ModelLoadError):
        llmlab.load(tmp_path)


def test_gpt2_without_attention_scaling_is_matched_or_refused(tmp_path):
    hf = randomize_(GPT2LMHeadModel(GPT2Config(**{**TINY_GPT2, "scale_attn_weights": False}))).eval()
    hf.save_pretrained(tmp_path)
    try:
        model = llmlab.load(tmp_path)
    except ModelLoadError:
        return
    ids = torch.randint(0, V, (2, 10))
    with torch.no_grad():
        assert maxdiff(model(ids), hf(ids).logits) <= TOL


def test_load_error_messages_say_what_is_wrong(tmp_path, tiny_gpt2_dir):
    def msg(kind: str) -> str:
        with pytest.raises(ModelLoadError) as e:
            llmlab.load(_bad_folder(kind, tmp_path, tiny_gpt2_dir))
        return str(e.value)

    assert "does not exist" in msg("missing")
    assert "not a model folder" in msg("file")
    assert "not valid JSON" in msg("malformed_json")
    assert "truncated or corrupt" in msg("truncated_weights")
    unsupported = msg("unsupported_type")
    assert "mamba" in unsupported and "Llama" in unsupported  # what it is, and what llmlab loads
    assert "n_embd" in msg("missing_field")


def test_model_load_error_is_an_llmlab_error():
    assert issubclass(ModelLoadError, LlmlabError) and issubclass(ConfigError, LlmlabError)


# ----------------------------------------------------------------------------- random BERT heads


def _tiny_bert_config() -> BertConfig:
    return BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40, type_vocab_size=2)


def _bert_inputs():
    ids = torch.randint(1, 99, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    ids[1, 7:] = 0
    types = torch.zeros(2, 11, dtype=torch.long)
    types[:, 5:] = 1
    return ids, mask, types


def test_random_bert_mlm_matches_transformers(tmp_path):
    hf = randomize_(BertForMaskedLM(_tiny_bert_config())).eval()
    hf.save_pretrained(tmp_path)
    model = llmlab.load(tmp_path)
    assert isinstance(model, Bert) and not model.training and model.config.mlm_head
    ids, mask, types = _bert_inputs()
    with torch.no_grad():
        ours = model.mlm_logits(model(ids, mask))
        ref = hf(input_ids=ids, attention_mask=mask).logits
        assert ours.shape == (2, 11, 99)
        assert maxdiff(ours, ref) <= TOL
        ours_t = model.mlm_logits(model(ids, mask, types))
        ref_t = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert maxdiff(ours_t, ref_t) <= TOL
    assert maxdiff(ours_t, ours) > 1e-3  # token types are used


def test_random_untied_bert_mlm_matches_transformers(tmp_path):
    hf = randomize_(BertForMaskedLM(BertConfig(**{**_tiny_bert_config().to_dict(), "tie_word_embeddings": False})))
    with torch.no_grad():
        hf.cls.predictions.decoder.weight.normal_(0, 0.05)
    hf.eval().save_pretrained(tmp_path)
    model = llmlab.load(tmp_path)
    ids, mask, _ = _bert_inputs()
    with torch.no_grad():
        assert maxdiff(model.mlm_logits(model(ids, mask)), hf(input_ids=ids, attention_mask=mask).logits) <= TOL


def test_random_bert_mlm_with_relu_matches_transformers(tmp_path):
    hf = randomize_(BertForMaskedLM(BertConfig(**{**_tiny_bert_config().to_dict(), "hidden_act": "relu"}))).eval()
    hf.save_pretrained(tmp_path)
    model = llmlab.load(tmp_path)
    ids, mask, _ = _bert_inputs()
    with torch.no_grad():
        assert maxdiff(model(ids, mask), hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state) <= TOL
        assert maxdiff(model.mlm_logits(model(ids, mask)), hf(input_ids=ids, attention_mask=mask).logits) <= TOL


def test_random_bert_classifier_matches_transformers(tmp_path):
    hf = randomize_(BertForSequenceClassification(_tiny_bert_config())).eval()  # 2 labels, with pooler
    hf.save_pretrained(tmp_path)
    model = llmlab.load(tmp_path)
    assert model.pooler is not None and model.config.n_classes == 2
    ids, mask, types = _bert_inputs()
    with torch.no_grad():
        assert maxdiff(model.classify(ids, mask), hf(input_ids=ids, attention_mask=mask).logits) <= TOL


# ----------------------------------------------------------------------------- the real pretrained MiniLM

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world!",
    "Unaffable naïve CAFÉ owners paid $1,234.56 for 3 croissants.",
    "Transformers use self-attention; RNNs don't.",
    "  odd   spacing\tand\nnewlines  ",
    "中文字符 and emoji 🙂 are rare",
]


@pytest.fixture(scope="session")
def minilm():
    return llmlab.load("minilm")


@pytest.fixture(scope="session")
def minilm_dir():
    return minilm_path()


@pytest.fixture(scope="session")
def hf_minilm(minilm_dir):
    from transformers import AutoTokenizer, BertModel

    return AutoTokenizer.from_pretrained(str(minilm_dir)), BertModel.from_pretrained(str(minilm_dir)).eval()


@pytest.fixture(scope="session")
def st_minilm(minilm_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir), device="cpu")


def _batch(minilm, sentences):
    enc = [minilm.tokenizer.encode(s, add_special_tokens=True) for s in sentences]
    T = max(map(len, enc))
    pad = minilm.tokenizer.pad_id
    ids = torch.tensor([e + [pad] * (T - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e in enc])
    return ids, mask


def test_minilm_loads_as_bert(minilm):
    assert isinstance(minilm, Bert) and not minilm.training
    c = minilm.config
    assert (c.n_layer, c.n_head, c.n_embd, c.vocab_size) == (6, 12, 384, 30522)
    assert minilm.tokenizer is not None


def test_minilm_tokenizer_matches_transformers(minilm, hf_minilm):
    hf_tok, _ = hf_minilm
    for s in SENTENCES:
        assert minilm.tokenizer.encode(s, add_special_tokens=True) == hf_tok(s)["input_ids"], s
    assert minilm.tokenizer.pad_id == hf_tok.pad_token_id


def test_minilm_hidden_states_match_transformers(minilm, hf_minilm):
    _, hf = hf_minilm
    ids, mask = _batch(minilm, SENTENCES[:2])  # lengths differ: the second one is padded
    assert (mask == 0).any()
    with torch.no_grad():
        ours = minilm(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert maxdiff(ours[real], ref[real]) <= 1e-4


def test_minilm_sentence_embeddings_match_sentence_transformers(minilm, st_minilm):
    ids, mask = _batch(minilm, SENTENCES)
    with torch.no_grad():
        ours = minilm.sentence_embedding(ids, mask)
    ref = st_minilm.encode(SENTENCES, convert_to_tensor=True)
    assert ours.shape == (len(SENTENCES), 384)
    assert maxdiff(ours, ref.cpu()) <= 1e-5
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(SENTENCES)), atol=1e-5)
