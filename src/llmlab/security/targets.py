"""The two interfaces security experiments see a model through.

- WhiteBox: a causal LM and its tokenizer — logits for token ids, per-token log-probabilities, and input
  embeddings (for gradients with respect to the prompt, as GCG needs). llmlab runs and imported Hugging
  Face GPT-2 folders provide it.
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

from llmlab.errors import LlmlabError
from llmlab.evaluate import token_logprobs
from llmlab.generate.causal import GenerationConfig
from llmlab.generate.chat import generate_from_ids, prompt_ids
from llmlab.interop import load


class WhiteBox:
    """A causal LM with its tokenizer, seen from the inside."""

    def __init__(self, model: torch.nn.Module, tokenizer, name: str = "model", path: str | Path | None = None):  # noqa: ANN001
        if getattr(model.config, "arch", "gpt") != "gpt":
            raise LlmlabError(f"{name} is a {model.config.arch} model; this experiment needs a decoder-only GPT")
        if tokenizer is None:
            raise LlmlabError(f"{name} has no tokenizer; use a run folder or a Hugging Face folder with one")
        self.model, self.tokenizer, self.name, self.path = model.eval(), tokenizer, name, path

    @classmethod
    def load(cls, path: str | Path) -> WhiteBox:
        """A WhiteBox for an llmlab run folder or a local Hugging Face GPT-2 folder."""

        model = load(path)
        return cls(model, model.tokenizer, name=str(path), path=path)

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
    """Text in, text out. Subclasses implement `chat`."""

    name: str = "target"

    def chat(self, user: str, system: str | None = None, max_tokens: int = 128, temperature: float = 0.0,
             seed: int | None = None) -> str:
        raise NotImplementedError





Request = tuple[str | None, str]  # (system, user)


class TargetError(LlmlabError):
    """The target failed to answer one request (HTTP error, timeout, context too long)."""


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


class LlmlabChatTarget(BatchChatTarget):
    """An llmlab model (a run folder or a Hugging Face GPT-2 folder) answering through its chat template."""

    def __init__(self, model: Any, name: str = "llmlab", path: str | Path | None = None, batch_size: int = 16):
        if getattr(model.config, "arch", "gpt") != "gpt" or model.tokenizer is None:
            raise LlmlabError(f"{name} is not a decoder-only model with a tokenizer; scan a GPT run folder")
        self.model, self.name, self.path, self.batch_size = model.eval(), name, path, batch_size

    @classmethod
    def load(cls, path: str | Path) -> LlmlabChatTarget:

        return cls(load(path), name=str(path), path=path)

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
        todo: list[tuple[int, list[int], tuple[str, ...]]] = []
        for i, (system, user) in enumerate(requests):
            ids, stop = prompt_ids(self.model, self._messages(system, user))
            if len(ids) >= block:
                out[i] = TargetError(f"prompt of {len(ids)} tokens does not fit the context of {block}")
            else:
                todo.append((i, ids, stop))
        for k in range(0, len(todo), self.batch_size):
            chunk = todo[k:k + self.batch_size]
            cfg = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                                   stop=chunk[0][2])
            for (i, _, _), c in zip(chunk, generate_from_ids(self.model, [ids for _, ids, _ in chunk], cfg)):
                out[i] = c.text
        return out  # type: ignore[return-value]


class OpenAITarget(BatchChatTarget):
    """Any OpenAI-compatible /v1/chat/completions endpoint, over HTTP (httpx). The API key is read from an
    environment variable (none sent when it is unset, as local servers need none)."""

    def __init__(self, model: str, base_url: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 concurrency: int = 4, retries: int = 2):
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise LlmlabError(f"base URL {base_url!r} must start with http:// or https://")
        self.model, self.base_url = model, base_url.rstrip("/")
        self.name = f"openai:{model}@{self.base_url}"
        self.concurrency, self.retries = max(1, concurrency), retries
        key = os.environ.get(api_key_env) if api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(timeout=timeout, headers=headers)

    def chat(self, user: str, system: str | None = None, max_tokens: int = 128, temperature: float = 0.0,
             seed: int | None = None) -> str:
        import httpx

        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.retries + 1):
            try:
                r = self.client.post(url, json=body)
            except httpx.HTTPError as e:
                if attempt < self.retries:
                    time.sleep(0.5 * 2 ** attempt)
                    continue
                raise TargetError(f"{url}: {type(e).__name__}: {e}") from None
            if r.status_code in (429, 500, 502, 503, 504) and attempt < self.retries:
                time.sleep(0.5 * 2 ** attempt)
                continue
            if r.status_code != 200:
                try:
                    msg = r.json()["error"]["message"]
                except Exception:  # noqa: BLE001 - any non-OpenAI error body
                    msg = r.text[:200]
                raise TargetError(f"{url}: HTTP {r.status_code}: {msg}")
            try:
                return r.json()["choices"][0]["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                raise TargetError(f"{url}: the reply is not an OpenAI chat completion") from None
        raise TargetError(f"{url}: no answer after {self.retries + 1} tries")

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
                 timeout: float = 60.0) -> BatchChatTarget:
    """A target from `openai:MODEL@BASE_URL` or a model folder (an llmlab run or a Hugging Face folder)."""
    if spec.startswith("openai:"):
        model, at, url = spec[len("openai:"):].partition("@")
        if not model or not at or not url:
            raise LlmlabError(f"target {spec!r} is not openai:MODEL@BASE_URL (e.g. openai:llmlab@http://127.0.0.1:8000/v1)")
        return OpenAITarget(model, url, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout)
    if not Path(spec).exists():
        raise LlmlabError(f"target {spec!r} is neither openai:MODEL@BASE_URL nor an existing model folder")
    return LlmlabChatTarget.load(spec)
