"""An OpenAI-compatible HTTP server for llmlab models (FastAPI): /v1/models, /v1/completions,
/v1/chat/completions (plain and streamed with server-sent events), /health.

Generation is CPU-bound, so it runs in a worker thread, one request at a time behind a lock (a queue):
each request decodes with its own KV caches, and requests never see each other's state. Errors have the
OpenAI shape {"error": {"message", "type", "param", "code"}} with 4xx codes for anything the client
can fix (malformed JSON and validation errors included: 400, not FastAPI's 422).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import anyio
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmlab.chat import check_messages
from llmlab.errors import LlmlabError
from llmlab.generate.causal import GenerationConfig
from llmlab.generate.chat import Completion, generate_from_ids, prompt_ids
from llmlab.interop import load


@dataclass
class ServeLimits:
    """What one request may ask for. max_prompt_tokens 0 = the model's context minus one."""

    max_request_bytes: int = 1_000_000
    max_prompt_tokens: int = 0
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_prompts: int = 16
    max_stop: int = 4
    max_waiting: int = 256


class APIError(Exception):
    """An error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _err(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
         code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


# ----------------------------------------------------------------------------- request bodies


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(..., max_length=256)
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool | None = False
    n: int | None = Field(1, ge=1, le=1, description="only 1 is supported")
    user: str | None = None


class CompletionRequest(_Base):
    """POST /v1/completions."""

    prompt: str | list[str] = Field(..., description="a prompt or a list of prompts")
    echo: bool | None = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class ChatRequest(_Base):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    stream_options: StreamOptions | None = None


# ----------------------------------------------------------------------------- the engine


class Engine:
    """The model behind a lock: one generation at a time, in a worker thread, each with fresh KV caches."""

    def __init__(self, model: torch.nn.Module, name: str, threads: int = 0):
        if model.config.arch != "gpt" or model.tokenizer is None:
            raise LlmlabError("llmlab serve needs a decoder-only (gpt) model with a tokenizer; give a GPT run folder")
        self.model, self.name, self.threads = model.eval(), name, threads
        self.lock = threading.Lock()
        self.waiting = 0
        self.served = 0
        self.created = int(time.time())

    def run(self, prompts: Sequence[Sequence[int]], cfg: GenerationConfig,
            on_text: Callable[[int, str], None] | None = None,
            cancelled: Callable[[], bool] | None = None) -> list[Completion]:
        with self.lock:
            if self.threads:
                torch.set_num_threads(self.threads)
            try:
                return generate_from_ids(self.model, prompts, cfg, on_text, cancelled)
            finally:
                self.served += 1


def _auth(api_key: str | None) -> Callable[[Request], None]:
    def check(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                           code="missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    return check


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes is answered 413 before the app reads it."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = False
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.limit
                except ValueError:
                    too_big = False
        chunks: list[bytes] = []
        more = not too_big
        size = 0
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            if size > self.limit:
                too_big = True
                break
            chunks.append(body)
            more = msg.get("more_body", False)
        if too_big:
            resp = _err(413, f"The request body is larger than the limit of {self.limit} bytes.",
                        code="request_too_large")
            await resp(scope, receive, send)
            return
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay_receive() -> dict:
            if replay:
                return replay.pop()
            return await receive()

        await self.app(scope, replay_receive, send)


def _first_error(exc: RequestValidationError) -> tuple[str, str | None, str | None]:
    errs = exc.errors()
    if not errs:
        return "Invalid request.", None, None
    e = errs[0]
    if e.get("type") == "json_invalid":
        return ("We could not parse the JSON body of your request. The API expects a JSON payload.", None,
                "invalid_json")
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    # pydantic reports a union per member ("prompt.str", "prompt.list[str]"): keep the field path
    loc = [x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool")]
    param = ".".join(loc) or None
    msg = e.get("msg", "invalid value")
    if e.get("type") == "missing":
        return f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
    return f"Invalid value for '{param}': {msg}.", param, "invalid_value"


# ----------------------------------------------------------------------------- the app


def create_app(model: torch.nn.Module, name: str = "llmlab", api_key: str | None = None,
               limits: ServeLimits | None = None, threads: int = 0) -> FastAPI:
    """The FastAPI app serving `model` under the model id `name`."""
    limits = limits or ServeLimits()
    engine = Engine(model, name, threads)
    block = model.config.block_size
    max_prompt = min(limits.max_prompt_tokens or block - 1, block - 1)
    app = FastAPI(title="llmlab", description="OpenAI-compatible API for llmlab models", version="1")
    app.state.engine = engine
    auth = Depends(_auth(api_key))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _err(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        msg, param, code = _first_error(exc)
        return _err(400, msg, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"Unknown request URL: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            msg = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            msg = str(exc.detail)
        return _err(exc.status_code, msg, code="unknown_url" if exc.status_code == 404 else None,
                    headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return _err(500, f"The server had an error processing the request ({type(exc).__name__}).", "server_error")

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": engine.created, "owned_by": "llmlab"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: always open (no API key), with the queue length."""
        return {"status": "ok", "model": name, "waiting": engine.waiting, "served": engine.served}

    @app.get("/v1/models", dependencies=[auth])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=[auth])
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return model_card()

    def gen_config(req: _Base, max_tokens: int | None, extra_stop: Sequence[str] = ()) -> GenerationConfig:
        if req.model != name:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{name}'.",
                           param="model", code="model_not_found")
        mt = limits.default_max_tokens if max_tokens is None else max_tokens
        if mt < 1:
            raise APIError(400, f"Invalid 'max_tokens': {mt}; it must be at least 1.", param="max_tokens",
                           code="invalid_value")
        if mt > limits.max_tokens:
            raise APIError(400, f"Invalid 'max_tokens': {mt}; this server allows at most {limits.max_tokens}.",
                           param="max_tokens", code="invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > limits.max_stop:
            raise APIError(400, f"Invalid 'stop': at most {limits.max_stop} stop sequences.", param="stop",
                           code="invalid_value")
        temperature = 1.0 if req.temperature is None else req.temperature
        return GenerationConfig(max_new_tokens=mt, temperature=temperature,
                                top_p=1.0 if req.top_p is None else req.top_p,
                                stop=tuple(s for s in stop if s) + tuple(extra_stop), seed=req.seed)

    def check_prompt(ids: list[int], param: str) -> list[int]:
        if len(ids) > max_prompt:
            raise APIError(400, f"This model's maximum prompt length is {max_prompt} tokens; your prompt has "
                                f"{len(ids)} tokens. Shorten it.", param=param, code="context_length_exceeded")
        return ids

    def encode_text(text: str) -> list[int]:
        tok = model.tokenizer
        try:
            ids = tok.encode(text)
        except LlmlabError as e:
            raise APIError(400, f"The prompt cannot be tokenized: {e}", param="prompt", code="invalid_value") from None
        if not ids:
            ids = [tok.eos_id] if tok.eos_id is not None else tok.encode("\n")
        return ids

    def check_busy() -> None:
        if engine.waiting >= limits.max_waiting:
            raise APIError(429, "The server is busy; retry later.", "rate_limit_error", code="server_busy")

    async def run(prompts: list[list[int]], cfg: GenerationConfig, on_text: Callable[[int, str], None] | None = None,
                  cancelled: Callable[[], bool] | None = None) -> list[Completion]:
        check_busy()
        engine.waiting += 1
        try:
            return await anyio.to_thread.run_sync(engine.run, prompts, cfg, on_text, cancelled)
        finally:
            engine.waiting -= 1

    def usage(res: Sequence[Completion]) -> dict[str, int]:
        p = sum(c.prompt_tokens for c in res)
        c = sum(c.completion_tokens for c in res)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(prompts: list[list[int]], cfg: GenerationConfig,
                            chunk: Callable[[int, str | None, str | None], dict[str, Any]],
                            first: list[dict[str, Any]], final_usage: Callable[[list[Completion]], Any] | None
                            ) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def on_text(i: int, text: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, ("text", i, text))

        async def work() -> None:
            try:
                res = await run(prompts, cfg, on_text, cancel.is_set)
                queue.put_nowait(("done", res, None))
            except Exception as e:  # noqa: BLE001 - reported in the stream
                queue.put_nowait(("error", e, None))

        task = asyncio.create_task(work())
        try:
            for obj in first:
                yield sse(obj)
            while True:
                kind, a, b = await queue.get()
                if kind == "text":
                    yield sse(chunk(a, b, None))
                elif kind == "error":
                    err = a if isinstance(a, APIError) else APIError(500, "generation failed", "server_error")
                    yield sse(error_body(err.message, err.type, err.param, err.code))
                    break
                else:
                    for i, c in enumerate(a):
                        yield sse(chunk(i, None, c.finish_reason))
                    if final_usage is not None:
                        yield sse(final_usage(a))
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()
            if not task.done():
                await asyncio.shield(asyncio.wait([task]))

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(req: CompletionRequest) -> Any:
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise APIError(400, "Invalid 'prompt': give a string or a non-empty list of strings.", param="prompt",
                           code="invalid_value")
        if len(prompts) > limits.max_prompts:
            raise APIError(400, f"Invalid 'prompt': at most {limits.max_prompts} prompts per request.",
                           param="prompt", code="invalid_value")
        cfg = gen_config(req, req.max_tokens if "max_tokens" in req.model_fields_set else 16)
        ids = [check_prompt(encode_text(p), "prompt") for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        echo = bool(req.echo)

        def body(choices: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices,
                    **kw}

        if req.stream:
            def chunk(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
                return body([{"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}])

            first = [chunk(i, p, None) for i, p in enumerate(prompts)] if echo else []
            check_busy()
            return StreamingResponse(stream_events(ids, cfg, chunk, first, None), media_type="text/event-stream")
        res = await run(ids, cfg)
        choices = [{"index": i, "text": (prompts[i] if echo else "") + c.text, "logprobs": None,
                    "finish_reason": c.finish_reason} for i, c in enumerate(res)]
        return body(choices, usage=usage(res))

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(req: ChatRequest) -> Any:
        msgs = []
        for i, m in enumerate(req.messages):
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
            role = "system" if m.role == "developer" else m.role
            msgs.append({"role": role, "content": content})
            if len(content) > limits.max_request_bytes:
                raise APIError(400, f"Invalid 'messages[{i}].content': too long.", param=f"messages.{i}.content")
        try:
            ids, extra_stop = prompt_ids(model, check_messages(msgs))
        except LlmlabError as e:
            raise APIError(400, f"Invalid 'messages': {e}", param="messages", code="invalid_value") from None
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        cfg = gen_config(req, mt, extra_stop)
        check_prompt(ids, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def body(obj: str, choices: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
            return {"id": rid, "object": obj, "created": created, "model": name, "system_fingerprint": "llmlab",
                    "choices": choices, **kw}

        if req.stream:
            def chunk(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
                delta = {"content": text} if text is not None else {}
                return body("chat.completion.chunk", [{"index": i, "delta": delta, "logprobs": None,
                                                       "finish_reason": finish}])

            first = [body("chat.completion.chunk", [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}])]
            include = bool(req.stream_options and req.stream_options.include_usage)
            final = (lambda res: body("chat.completion.chunk", [], usage=usage(res))) if include else None
            check_busy()
            return StreamingResponse(stream_events([ids], cfg, chunk, first, final), media_type="text/event-stream")
        res = await run([ids], cfg)
        c = res[0]
        return body("chat.completion", [{"index": 0, "message": {"role": "assistant", "content": c.text},
                                         "logprobs": None, "finish_reason": c.finish_reason}], usage=usage(res))

    wrapped = BodyLimit(app, limits.max_request_bytes)
    app.state.asgi = wrapped
    return app


def asgi_app(app: FastAPI) -> Any:
    """The app with its request-size limit in front (what uvicorn should run)."""
    return app.state.asgi


def load_for_serving(path: str) -> torch.nn.Module:
    """The model of a run folder (or Hugging Face GPT-2 folder) checked for serving."""

    model = load(path)
    if model.config.arch != "gpt" or model.tokenizer is None:
        raise LlmlabError(f"{path} is a {model.config.arch} model or has no tokenizer; serve a GPT run folder")
    return model


class ServerThread:
    """uvicorn running the app in a background thread on host:port (tests and benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(asgi_app(app), host=host, port=port, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
