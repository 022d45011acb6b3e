"""Chat generation: a conversation through the model's template, decoded with stop on end-of-turn."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from llmlab.chat import PLAIN_STOP, Message, encode_chat, has_chat_template, render_plain
from llmlab.errors import LlmlabError
from llmlab.generate.causal import GenerationConfig, TextStream, generate_ids


def prompt_ids(model: torch.nn.Module, messages: Sequence[Message]) -> tuple[list[int], tuple[str, ...]]:
    """The prompt ids of a conversation for this model (its chat template, else the plain rendering) and
    the stop strings that go with it."""
    tok = model.tokenizer
    if tok is None:
        raise LlmlabError("this model has no tokenizer; use a run folder")
    if has_chat_template(tok):
        return encode_chat(tok, messages)[0], ()
    ids = tok.encode(render_plain(messages))
    return ids, PLAIN_STOP


@dataclass
class Completion:
    """One generated text: the text, why it ended (stop | length) and how many tokens it took."""

    text: str
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int


def generate_from_ids(model: torch.nn.Module, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
                      on_text: Callable[[int, str], None] | None = None,
                      cancelled: Callable[[], bool] | None = None) -> list[Completion]:
    """Completions of prompts given as token ids (batched, left padded), stopping at the tokenizer's eos,
    at cfg.stop strings (cut before them) or after cfg.max_new_tokens. on_text(row, new_text) streams;
    cancelled() returning True ends generation early."""
    tok = model.tokenizer
    eos = tok.eos_id
    pad = tok.pad_id if tok.pad_id is not None else (eos if eos is not None else 0)
    col = TextStream(tok, len(prompts), cfg.stop, eos, on_text, cancelled)
    if cfg.max_new_tokens > 0:
        generate_ids(model, [list(p) for p in prompts], cfg, eos_id=eos, pad_id=pad, on_step=col.step)
    col.flush()
    return [Completion(col.text[i], col.finish[i], col.count[i], len(prompts[i])) for i in range(len(prompts))]


def chat_generate(model: torch.nn.Module, conversations: Sequence[Sequence[Message]], cfg: GenerationConfig
                  ) -> list[str]:
    """The assistant's reply to each conversation (batched). A conversation longer than the context keeps
    its last tokens (the system prompt is then lost: keep prompts short)."""
    block = model.config.block_size
    prompts, stop = [], ()
    for conv in conversations:
        ids, stop = prompt_ids(model, conv)
        prompts.append(ids[-(block - 1):])
    if stop:
        cfg = GenerationConfig(**{**cfg.__dict__, "stop": tuple(cfg.stop) + stop})
    return [c.text for c in generate_from_ids(model, prompts, cfg)]
