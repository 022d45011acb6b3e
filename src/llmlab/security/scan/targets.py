"""Chat targets the scanner talks to: an llmlab run (in process, through the chat template) or any
OpenAI-compatible endpoint (`openai:MODEL@BASE_URL`: llmlab serve, llama.cpp, vLLM, Ollama, a hosted API)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...errors import LlmlabError
from ..targets import ChatTarget

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
        from ...interop import load

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
        from ...assistant import generate_from_ids, prompt_ids
        from ...generate import GenerationConfig

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
