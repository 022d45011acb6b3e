"""Chat generation: a conversation through the model's template, decoded with stop on end-of-turn."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llmlab.chat import PLAIN_STOP, Message, encode_chat, has_chat_template, render_plain
from llmlab.errors import LlmlabError
from llmlab.generate.causal import GenerationConfig, TextStream, generate_ids


def own_template(tok: Any) -> str | None:
    """The model's own (Jinja, Hugging Face style) chat template, if its tokenizer carries one."""
    t = getattr(tok, "chat_template", None)
    return t if isinstance(t, str) and t else None


def template_supports_tools(tok: Any) -> bool:
    """Whether the model's chat template renders tool definitions or tool messages (it mentions them)."""
    t = own_template(tok)
    return t is not None and ("tool" in t)


def prompt_ids(model: torch.nn.Module, messages: Sequence[Mapping[str, Any]],
               tools: Sequence[Mapping[str, Any]] | None = None) -> tuple[list[int], tuple[str, ...]]:
    """The prompt ids of a conversation for this model (its own Jinja chat template, else llmlab's chat
    template, else the plain rendering) and the stop strings that go with it. Tool definitions and tool
    messages need a template with tool support (LlmlabError otherwise)."""
    tok = model.tokenizer
    if tok is None:
        raise LlmlabError("this model has no tokenizer; use a run folder")
    needs_tools = bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
    if needs_tools and not template_supports_tools(tok):
        raise LlmlabError("this model's chat template has no tool support, so tool definitions and 'tool' "
                          "messages cannot be rendered; send plain system/user/assistant messages")
    if own_template(tok) is not None:
        from llmlab.chat_template import encode_chat as encode_own

        kw = {"tools": list(tools)} if tools else {}
        return encode_own(tok, list(messages), True, **kw), ()
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
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
        generate_ids(model, [list(p) for p in prompts], cfg, eos_id=eos, pad_id=pad, on_step=col.step,
                     ended=lambda: col.done)
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
