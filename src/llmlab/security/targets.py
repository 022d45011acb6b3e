"""The two interfaces security experiments see a model through.

- WhiteBox: a causal LM and its tokenizer — logits for token ids, per-token log-probabilities, and input
  embeddings (for gradients with respect to the prompt, as GCG needs). llmlab runs, Hugging Face GPT-2 and
  Llama folders, GGUF files and `smollm2` provide it.
- ChatTarget: text in, text out, optionally with a system prompt. llmlab chat models and any
  OpenAI-compatible endpoint provide it (implementations live with the scanner).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from llmlab.attention import KVCache
from llmlab.errors import LlmlabError
from llmlab.evaluate import token_logprobs
from llmlab.generate.causal import GenerationConfig
from llmlab.generate.chat import prompt_ids
from llmlab.interop import load
from llmlab.serve.engine import BatchEngine, Job
from llmlab.serve.prefix_cache import PrefixCache


class WhiteBox:
    """A causal LM with its tokenizer, seen from the inside."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "model", path: str | Path | None = None):  # noqa: ANN001
        if getattr(model.config, "arch", "gpt") != "gpt":
            raise LlmlabError(f"{name} is a {model.config.arch} model; this experiment needs a decoder-only GPT")
        if tokenizer is None:
            raise LlmlabError(f"{name} has no tokenizer; use a run folder or a Hugging Face folder with one")
        self.model, self.tokenizer, self.name, self.path = model.eval(), tokenizer, name, path

    @classmethod
    def load(cls, path: str | Path, dtype: torch.dtype | str | None = None) -> WhiteBox:
        """A WhiteBox for an llmlab run folder, a local Hugging Face GPT-2 or Llama folder, a GGUF file or
        `smollm2`. An endpoint (`openai:MODEL@URL`) has no weights: it can only be a transfer target."""
        if str(path).startswith(("openai:", "http://", "https://")):
            raise LlmlabError(f"{path} is an endpoint (text in, text out): it has no weights to take gradients "
                              "of, so it can only be a transfer target, not the model a suffix is optimised on")
        model = load(path, dtype=dtype)
        return cls(model, model.tokenizer, name=str(path), path=None if str(path) == "smollm2" else path)

    @property
    def block_size(self) -> int:
        return self.model.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def logits(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits."""
        return self.model(ids, attention_mask=attention_mask)

    def embedding_matrix(self) -> torch.Tensor:
        """(V, C) token embeddings; one-hot (B, T, V) @ this = input embeddings."""
        return self.model.wte.weight

    def logits_from_embeds(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, T, C) input embeddings -> (B, T, V) logits (differentiable)."""
        return self.model(inputs_embeds=embeds)

    # ---- what gradient attacks on the prompt need (GCG: llmlab.security.adversarial.gcg) --------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.model.wte.weight.dtype

    @torch.no_grad()
    def prefix_caches(self, ids: Sequence[int]) -> list[KVCache]:
        """Per-layer key/value caches of a fixed prompt prefix (batch 1), computed once and then shared by
        every forward pass that continues it (expand_caches)."""
        caches = self.model.new_caches()
        if len(ids):
            self.hidden(self.model.wte(torch.tensor([list(ids)])), caches)
        return caches

    @staticmethod
    def expand_caches(caches: Sequence[KVCache], batch: int) -> list[KVCache]:
        """Fresh caches for `batch` rows that all start from the (batch 1) prefix `caches`; the prefix is
        left untouched (appending copies it into the new caches' own buffers)."""
        out = []
        for c in caches:
            n = KVCache(dtype=c.dtype)
            if c.k is not None and c.length:
                n.k = c.k[:, :, : c.length].expand(batch, -1, -1, -1)
                n.v = c.v[:, :, : c.length].expand(batch, -1, -1, -1)
                n.length = c.length
            out.append(n)
        return out

    def hidden(self, embeds: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """(B, T, C) input embeddings continuing `caches` -> (B, T, C) final-norm hidden states: the model's
        forward pass without the output head, so a caller projects only the positions it needs (head)."""
        m = self.model
        B, T, _ = embeds.shape
        past = caches[0].length if caches else 0
        if past + T > self.block_size:
            raise LlmlabError(f"{self.name}: a prompt of {past + T} tokens does not fit the context of "
                              f"{self.block_size}; use a shorter goal, suffix or system prompt")
        pos = torch.arange(past, past + T, device=embeds.device)
        x = embeds
        if m.wpe is not None:
            x = x + m.wpe(pos)
        elif m.pe is not None:
            x = x + m.pe[pos].to(x.dtype)
        for i, block in enumerate(m.h):
            x = block(x, is_causal=True, positions=pos, cache=caches[i] if caches else None)
        return m.ln_f(x)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., V)."""
        return self.model.lm_head(h)

    def forbidden_tokens(self, allow_non_ascii: bool = False, allow_special: bool = False) -> torch.Tensor:
        """(V,) bool mask of the token ids an attack may not put in a suffix: ids past the tokenizer's
        vocabulary, special and added control tokens (unless allow_special), and tokens whose text is not
        printable ASCII (unless allow_non_ascii), as in nanoGCG and llm-attacks."""
        key = (allow_non_ascii, allow_special)
        memo = getattr(self, "_forbidden", {})
        if key in memo:
            return memo[key]
        from llmlab.chat import CHAT_SPECIALS

        V, n = self.vocab_size, self.tokenizer.vocab_size
        bad = torch.zeros(V, dtype=torch.bool)
        bad[min(n, V):] = True
        if not allow_special:
            specials = set(getattr(self.tokenizer, "special_tokens", {}).values())
            hf = getattr(self.tokenizer, "hf_tokenizer", None)
            if hf is not None:
                specials |= {i for i, t in hf.get_added_tokens_decoder().items() if t.special}
            specials |= {i for i in (self.tokenizer.token_to_id(t) for t in CHAT_SPECIALS) if i is not None}
            for i in specials:
                if 0 <= i < V:
                    bad[i] = True
        if not allow_non_ascii:
            texts = self.tokenizer.decode_batch([[i] for i in range(min(n, V))], skip_special_tokens=False)
            for i, t in enumerate(texts):
                if not t or not t.isascii() or not t.isprintable():
                    bad[i] = True
        memo[key] = bad
        self._forbidden = memo
        return bad

    def place(self, goal: str, system: str | None = None, template: bool = True,
              assistant_prefix: str = "") -> tuple[list[int], list[int]]:
        """(before, after) token ids such that before + suffix + after is the prompt a real user's
        `goal + suffix` gives (a suffix carries its own leading space, " ! ! !") in this model's chat
        template (its own Jinja template, llmlab's template, or the plain "User: ... Assistant:" rendering),
        the assistant's turn opened and `assistant_prefix` written after it. template=False: plain text
        completion of `goal + suffix`."""
        mark = "\x00llmlab-suffix\x00"
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": goal + mark}]
        if not template:
            text = f"{system}\n\n" if system else ""
            text += messages[-1]["content"]
        else:
            from llmlab.chat import has_chat_template, render_chat, render_plain
            from llmlab.generate.chat import own_template

            if own_template(self.tokenizer) is not None:
                from llmlab.chat_template import apply_chat_template

                text = apply_chat_template(self.tokenizer, messages)
            elif has_chat_template(self.tokenizer):
                text = render_chat(messages)
            else:
                text = render_plain(messages)
        if text.count(mark) != 1:
            raise LlmlabError(f"{self.name}: the chat template does not keep the user's text as written, so a "
                              "suffix cannot be placed in it; attack without the template")
        before, after = text.split(mark)
        after += assistant_prefix
        enc = self.tokenizer.encode
        return (enc(before) if before else []), (enc(after) if after else [])

    @torch.no_grad()
    def token_logprobs(self, ids: Sequence[int]) -> torch.Tensor:
        """l_t = log p(x_t | x_<t) for t = 1..n-1 of one sequence, in windows of the context."""

        return token_logprobs(self.model, ids)

    @torch.no_grad()
    def batch_token_stats(self, seqs: Sequence[Sequence[int]]) -> list[dict[str, torch.Tensor]]:
        """For each sequence (cut to the context): l_t, and the mean mu_t and standard deviation sigma_t of
        log p(. | x_<t) over the vocabulary (as Min-K%++ needs). One padded forward pass for the batch."""
        seqs = [list(s)[: self.block_size + 1] for s in seqs]
        T = max(len(s) for s in seqs) - 1
        ids = torch.zeros(len(seqs), T, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s) - 1] = torch.tensor(s[:-1])
        logp = F.log_softmax(self.model(ids).float(), -1)  # (B, T, V); right padding is harmless when causal
        p = logp.exp()
        mu = (p * logp).sum(-1)  # E_{z~p}[log p(z)]
        sigma = ((p * logp.square()).sum(-1) - mu.square()).clamp(min=0).sqrt()
        out = []
        for i, s in enumerate(seqs):
            n = len(s) - 1
            tgt = torch.tensor(s[1:])
            out.append({"logp": logp[i, torch.arange(n), tgt], "mu": mu[i, :n], "sigma": sigma[i, :n]})
        return out


class ChatTarget:
    """Text in, text out. Subclasses implement `chat`. `model_name` is what the report header shows."""

    name: str = "target"
    model_name: str | None = None

    def chat(self, user: str, system: str | None = None, max_tokens: int = 128, temperature: float = 0.0,
             seed: int | None = None) -> str:
        raise NotImplementedError


Request = tuple[str | None, str]  # (system, user)


class TargetError(LlmlabError):
    """The target failed to answer one request (HTTP error, timeout, context too long)."""


class PromptTooLong(TargetError):
    """The request does not fit the model's context: not sent (reported apart from target failures)."""


class BatchChatTarget(ChatTarget):
    """A ChatTarget that can also answer many (system, user) requests at once."""

    def chat_many(self, requests: Sequence[Request], max_tokens: int = 64, temperature: float = 0.0,
                  seed: int | None = None) -> list[str | TargetError]:
        """A reply (or the TargetError) for each request, in order."""
        out: list[str | TargetError] = []
        for system, user in requests:
            try:
                out.append(self.chat(user, system, max_tokens, temperature, seed))
            except TargetError as e:
                out.append(e)
        return out


BUILTIN_CHAT_MODELS = ("smollm2",)


class LlmlabChatTarget(BatchChatTarget):
    """An llmlab model (a run folder, a Hugging Face or GGUF model, or `smollm2`) answering through its chat
    template: up to `batch_size` requests decoded together with continuous batching (a request joins as soon as
    another ends; llmlab.serve.engine, run in the caller's thread). With `prefix_cache_mb` > 0 the keys and
    values of recent prompts are kept (that many megabytes), so a prompt that starts like an earlier one — the
    same system prompt and attack under another defence — prefills only the rest."""

    def __init__(self, model: Any, name: str = "llmlab", path: str | Path | None = None, batch_size: int = 16,
                 prefix_cache_mb: float = 0.0):
        if getattr(model.config, "arch", "gpt") != "gpt" or model.tokenizer is None:
            raise LlmlabError(f"{name} is not a decoder-only model with a tokenizer; scan a GPT run folder")
        self.model, self.name, self.path, self.batch_size = model.eval(), name, path, max(1, batch_size)
        self.model_name = name
        self.prefix_cache = PrefixCache.for_model(model, prefix_cache_mb)

    @classmethod
    def load(cls, path: str | Path, batch_size: int = 16, prefix_cache_mb: float = 0.0) -> LlmlabChatTarget:
        local = None if str(path) in BUILTIN_CHAT_MODELS else path
        return cls(load(path), name=str(path), path=local, batch_size=batch_size, prefix_cache_mb=prefix_cache_mb)

    @staticmethod
    def _messages(system: str | None, user: str) -> list[dict[str, str]]:
        return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]

    def chat(self, user: str, system: str | None = None, max_tokens: int = 128, temperature: float = 0.0,
             seed: int | None = None) -> str:
        r = self.chat_many([(system, user)], max_tokens, temperature, seed)[0]
        if isinstance(r, TargetError):
            raise r
        return r

    def chat_many(self, requests: Sequence[Request], max_tokens: int = 64, temperature: float = 0.0,
                  seed: int | None = None) -> list[str | TargetError]:
        block = self.model.config.block_size
        out: list[str | TargetError | None] = [None] * len(requests)
        todo: list[tuple[int, Job]] = []
        for i, (system, user) in enumerate(requests):
            ids, stop = prompt_ids(self.model, self._messages(system, user))
            if len(ids) + 1 >= block:
                out[i] = PromptTooLong(f"prompt of {len(ids)} tokens does not fit the context of {block}")
            else:
                cfg = GenerationConfig(max_new_tokens=max(1, min(max_tokens, block - len(ids))),
                                       temperature=temperature, seed=seed, stop=stop)
                todo.append((i, Job(ids, cfg)))
        todo.sort(key=lambda t: len(t[1].prompt))  # similar lengths decoded together: less left padding
        engine = BatchEngine(self.model, self.batch_size, prefix_cache=self.prefix_cache, start=False)
        engine.run_here([job for _, job in todo])
        for i, job in todo:
            out[i] = job.text if job.error is None else TargetError(f"generation failed: {job.error}")
        return out  # type: ignore[return-value]


_SAMPLING_WORDS = ("max_tokens", "temperature", "max_completion_tokens", "unsupported parameter", "not supported")


class OpenAITarget(BatchChatTarget):
    """Any OpenAI-compatible /v1/chat/completions endpoint, over HTTP (httpx), `concurrency` requests in
    flight at once (a batching server decodes them together). The API key is read from an environment
    variable (none sent when it is unset, as local servers need none). sampling=False never sends
    max_tokens, temperature or seed (some hosted reasoning models refuse them); with sampling=True a 400
    that names one of them is retried once without them, and they stay off for the rest of the scan."""

    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 concurrency: int = 4, retries: int = 2, sampling: bool = True):
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise LlmlabError(f"base URL {base_url!r} must start with http:// or https://")
        self.model, self.base_url = model, base_url.rstrip("/")
        self.name = f"openai:{model}@{self.base_url}"
        self.model_name = model
        self.concurrency, self.retries, self.sampling = max(1, concurrency), retries, sampling
        self.dropped_sampling = False  # set when the server refused the sampling fields
        key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)

    def _body(self, messages: list[dict[str, str]], max_tokens: int, temperature: float, seed: int | None
              ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        if self.sampling:
            body.update(max_tokens=max_tokens, temperature=temperature)
            if seed is not None:
                body["seed"] = seed
        return body

    def chat(self, user: str, system: str | None = None, max_tokens: int = 128, temperature: float = 0.0,
             seed: int | None = None) -> str:
        import httpx

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        url = f"{self.base_url}/chat/completions"
        attempt = 0
        while True:
            try:
                r = self.client.post(url, json=self._body(messages, max_tokens, temperature, seed))
            except httpx.HTTPError as e:
                if attempt < self.retries:
                    time.sleep(0.5 * 2 ** attempt)
                    attempt += 1
                    continue
                raise TargetError(f"{url}: {type(e).__name__}: {e}") from None
            if r.status_code in (429, 500, 502, 503, 504) and attempt < self.retries:
                time.sleep(0.5 * 2 ** attempt)
                attempt += 1
                continue
            if r.status_code != 200:
                try:
                    msg = str(r.json()["error"]["message"])
                except Exception:  # noqa: BLE001 - any non-OpenAI error body
                    msg = r.text[:200]
                if r.status_code == 400 and self.sampling and any(w in msg.lower() for w in _SAMPLING_WORDS):
                    self.sampling, self.dropped_sampling = False, True  # retry once without them
                    continue
                raise TargetError(f"{url}: HTTP {r.status_code}: {msg}")
            try:
                return r.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise TargetError(f"{url}: the reply is not an OpenAI chat completion") from None

    def chat_many(self, requests: Sequence[Request], max_tokens: int = 64, temperature: float = 0.0,
                  seed: int | None = None) -> list[str | TargetError]:
        def one(req: Request) -> str | TargetError:
            try:
                return self.chat(req[1], req[0], max_tokens, temperature, seed)
            except TargetError as e:
                return e

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, requests))

    def close(self) -> None:
        self.client.close()


def parse_target(spec: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 timeout: float = 60.0, sampling: bool = True, batch_size: int = 16, retries: int = 2,
                 prefix_cache_mb: float = 0.0) -> BatchChatTarget:
    """A target from `openai:MODEL@BASE_URL`, `smollm2`, or a model folder (an llmlab run or a Hugging Face
    folder) or GGUF file (`batch_size` and `prefix_cache_mb`: see LlmlabChatTarget)."""
    if spec.startswith("openai:"):
        model, at, url = spec[len("openai:"):].partition("@")
        if not model or not at or not url:
            raise LlmlabError(f"target {spec!r} is not openai:MODEL@BASE_URL (e.g. openai:llmlab@http://127.0.0.1:8000/v1)")
        return OpenAITarget(model, url, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
                            sampling=sampling, retries=retries)
    if spec not in BUILTIN_CHAT_MODELS and not Path(spec).exists():
        raise LlmlabError(f"target {spec!r} is neither openai:MODEL@BASE_URL, smollm2, nor an existing model folder")
    return LlmlabChatTarget.load(spec, batch_size=batch_size, prefix_cache_mb=prefix_cache_mb)
