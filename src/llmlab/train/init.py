"""Fine-tuning: a run that starts from another model's weights and tokenizer (TrainConfig.init_from).

The source is anything llmlab.load reads: a run folder, a Hugging Face folder, a GGUF file, or a built-in
name ("smollm2"). The new run takes the source's model config and tokenizer; a model flag that names a
different shape is refused (one line), except a shorter block_size, which only shortens the training
sequences (learned position vectors are then cut to the first block_size rows)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmlab.config import ModelConfig
from llmlab.errors import ConfigError, LlmlabError, ModelLoadError
from llmlab.train.config import PRESETS, RunConfig

# model fields a fine-tune may set without contradicting the source's weights
FREE_FIELDS = {"dropout", "block_size", "vocab_size", "pad_token_id", "extra"}


@dataclass
class InitSource:
    """What a fine-tune starts from: the source model (None when resuming: the checkpoint has the weights),
    its tokenizer and its model config."""

    name: str
    model: torch.nn.Module | None
    tokenizer: Any
    config: ModelConfig


def load_init_source(cfg: RunConfig, run: Path, resume: bool) -> InitSource | None:
    """The source of cfg.train.init_from (None without one). Resuming, the run's own saved tokenizer and config
    are used (they are the source's), so the source need not be loaded again."""
    name = cfg.train.init_from.strip()
    if not name:
        return None
    if resume:
        from llmlab.tokenizers import load_tokenizer

        if not (run / "tokenizer").is_dir():
            raise ModelLoadError(f"{run} was fine-tuned from {name} but has no tokenizer folder; train it again")
        return InitSource(name, None, load_tokenizer(run / "tokenizer"), cfg.model)
    from llmlab.interop import load

    try:
        model = load(name)
    except LlmlabError as e:
        raise ConfigError(f"--init-from {name}: {e}") from None
    if getattr(model, "tokenizer", None) is None:
        raise ConfigError(f"--init-from {name} has no tokenizer; give a run folder, a Hugging Face folder with "
                          "its tokenizer, a .gguf file, or smollm2")
    model.float()
    return InitSource(name, model, model.tokenizer, model.config)


def init_model_config(cfg: RunConfig, src: InitSource, task: str = "lm") -> ModelConfig:
    """The model config of a fine-tune: the source's, with a shorter block_size if one was asked for. A model
    flag set to something else than both the preset's default and the source's value is a ConfigError."""
    if task not in ("lm", "assistant"):
        raise ConfigError(f"--init-from fine-tunes decoder-only models with task lm or assistant, not "
                          f"{task!r} (a classifier starts from an encoder with --base)")
    s = src.config
    if s.arch != "gpt":
        raise ConfigError(f"--init-from {src.name} is a {s.arch} model; the lm and assistant objectives train "
                          "decoder-only (gpt) models")
    preset = ModelConfig.from_dict({**ModelConfig().to_dict(), **PRESETS.get(cfg.preset, {}).get("model", {})})
    asked = cfg.model
    for f in dataclasses.fields(ModelConfig):
        if f.name in FREE_FIELDS:
            continue
        mine, default, theirs = getattr(asked, f.name), getattr(preset, f.name), getattr(s, f.name)
        if mine != default and mine != theirs:
            flag = "--" + f.name.replace("_", "-")
            raise ConfigError(f"{flag} {mine} contradicts --init-from {src.name}, whose {f.name} is {theirs}; "
                              f"drop {flag} (a fine-tune keeps the shape of the model it starts from)")
    if asked.block_size != preset.block_size and asked.block_size > s.block_size:
        raise ConfigError(f"--block-size {asked.block_size} is longer than the context of --init-from {src.name} "
                          f"({s.block_size}); give at most {s.block_size}")
    return s.replace(block_size=min(asked.block_size, s.block_size), dropout=asked.dropout)


def load_init_weights(model: torch.nn.Module, src: InitSource) -> None:
    """Copy the source's weights into the freshly built model (learned positions cut to its block_size)."""
    if src.model is None:
        return
    target = model.state_dict()
    state = {}
    for k, v in src.model.state_dict().items():
        t = target.get(k)
        if t is not None and t.shape != v.shape and k.endswith("wpe.weight") and v.shape[0] > t.shape[0]:
            v = v[:t.shape[0]]
        state[k] = v
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"--init-from {src.name}: its weights do not fit the model built from its config "
                             f"({str(e).splitlines()[0]})") from None
    src.model = None  # the copy is made; free the source


def encode_with_template(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation rendered by the tokenizer's own (Jinja) chat template: the mask is 1
    on the tokens after the prompt (the last assistant reply and the template's end of turn), 0 before. The
    prompt must be a prefix of the whole conversation's ids (true of ChatML templates such as SmolLM2's); an
    example where it is not, or whose last message is not the assistant's, gets an all-zero mask (skipped)."""
    from llmlab.chat_template import encode_chat

    if not messages or messages[-1].get("role") != "assistant":
        return encode_chat(tokenizer, messages, add_generation_prompt=False), []
    full = encode_chat(tokenizer, messages, add_generation_prompt=False)
    prompt = encode_chat(tokenizer, messages[:-1], add_generation_prompt=True)
    if full[:len(prompt)] != prompt:
        return full, [0] * len(full)
    return full, [0] * len(prompt) + [1] * (len(full) - len(prompt))
