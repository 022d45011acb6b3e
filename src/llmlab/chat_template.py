"""Jinja chat templates, as pretrained chat models ship them (a GGUF's `tokenizer.chat_template`, a Hugging
Face folder's tokenizer_config.json or chat_template.jinja).

A chat template is a small program in the model file: it turns a list of messages into the one string the
model was trained on, e.g. SmolLM2's

    <|im_start|>system\\nYou are ...<|im_end|>\\n<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n

Templates come from downloaded files, so they are untrusted code: they run in Jinja's immutable sandbox
(no attribute access to Python internals, no mutation of the messages), with the same settings and helpers
as transformers' `apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, `raise_exception`,
`tojson`, `strftime_now`), so a template renders here exactly as it does there.

    render(template, messages, add_generation_prompt=True)        -> str
    apply_chat_template(tokenizer, messages)                      -> str (the tokenizer's own template)
    encode_chat(tokenizer, messages)                              -> token ids
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmlab.errors import LlmlabError

__all__ = ["render", "apply_chat_template", "encode_chat", "template_of"]


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' marker of assistant text): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names (no way to reach Python internals through it)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's Namespace signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates may not set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise LlmlabError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message}); "
                          "fix the template or pass another one") from None


def _plain(value: Any) -> Any:
    """A fresh copy of messages made of dicts, lists, strings and numbers only."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def render(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
           **kwargs: Any) -> str:
    """The conversation `messages` ([{"role": ..., "content": ...}, ...]) rendered by a Jinja chat template.

    add_generation_prompt appends the opening of an assistant turn, so the model writes the reply next.
    Extra keyword arguments (bos_token, eos_token, tools, ...) are visible to the template as variables.
    Raises LlmlabError for a malformed template, bad messages, or the template's own raise_exception."""
    if not isinstance(template, str) or not template:
        raise LlmlabError("no chat template given; this model has none — format the prompt yourself")
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise LlmlabError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise LlmlabError(f"messages[{i}] must be a dict with a 'role' string and a 'content'")
    compiled = _compile(template)
    try:
        return compiled.render(messages=_plain(messages), add_generation_prompt=add_generation_prompt,
                               **_plain(kwargs))
    except jinja2.exceptions.SecurityError as e:
        raise LlmlabError(f"the chat template tried an operation the sandbox forbids ({e}); "
                          "do not use this template") from None
    except jinja2.exceptions.TemplateError as e:
        raise LlmlabError(f"the chat template refused the conversation: {e}") from None


def template_of(tokenizer: Any) -> str:
    """The tokenizer's chat template, or an LlmlabError saying the model has none."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise LlmlabError("this model's tokenizer has no chat template; load a chat model (e.g. 'smollm2') or "
                          "pass a template")
    return template


def special_token_strings(tokenizer: Any) -> dict[str, str]:
    """{"bos_token": "<s>", "eos_token": ...} for the tokenizer's special tokens, as templates expect them."""
    return {f"{role}_token": tokenizer.id_to_token(i) for role, i in getattr(tokenizer, "special_tokens", {}).items()}


def apply_chat_template(tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                        template: str | None = None, **kwargs: Any) -> str:
    """render() with the tokenizer's own template (or `template`) and its special tokens (bos_token, eos_token,
    ...) passed in, as transformers' tokenizer.apply_chat_template(..., tokenize=False) does."""
    return render(template or template_of(tokenizer), messages, add_generation_prompt,
                  **{**special_token_strings(tokenizer), **kwargs})


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                template: str | None = None, **kwargs: Any) -> list[int]:
    """Token ids of the rendered conversation. Special-token strings the *template* writes become their ids;
    the template already holds any BOS it wants, so none is added. Special-token strings inside message
    *content* stay ordinary text (llmlab.chat.encode_untrusted): a user who types "<|im_end|><|im_start|>system"
    cannot close their turn and open a system one. Content without such strings is encoded exactly as the
    rendered text (the ids transformers' apply_chat_template gives)."""
    from llmlab.chat import _specials_of, encode_untrusted

    text = apply_chat_template(tokenizer, messages, add_generation_prompt, template, **kwargs)
    specials = _specials_of(tokenizer)
    contents = [m.get("content") for m in messages]
    if not any(isinstance(c, str) and any(sp in c for sp in specials) for c in contents):
        return tokenizer.encode(text)
    # render with a marker in place of every content, then encode the template's text and the contents apart
    marks = [f"\x00llmlab-content-{i}\x00" if isinstance(c, str) else None for i, c in enumerate(contents)]
    masked = [{**m, "content": mk} if mk is not None else m for m, mk in zip(messages, marks)]
    skeleton = apply_chat_template(tokenizer, masked, add_generation_prompt, template, **kwargs)
    rebuilt = skeleton
    for mk, c in zip(marks, contents):
        if mk is not None:
            rebuilt = rebuilt.replace(mk, c, 1)
    if rebuilt != text:  # the template changes contents (e.g. trims them): mark what it would write instead
        contents = [c.strip() if isinstance(c, str) else c for c in contents]
    ids: list[int] = []
    rest = skeleton
    for mk, c in zip(marks, contents):
        if mk is None or mk not in rest:
            continue
        before, rest = rest.split(mk, 1)
        ids += tokenizer.encode(before) if before else []
        ids += encode_untrusted(tokenizer, c)
    return ids + (tokenizer.encode(rest) if rest else [])
