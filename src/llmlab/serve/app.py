"""An OpenAI-compatible HTTP server for llmlab models (FastAPI): /v1/models, /v1/completions,
/v1/chat/completions (plain and streamed with server-sent events), /v1/embeddings (encoders), /health, and
vLLM's /tokenizer_info, /tokenize and /detokenize (the served model's own tokenizer, for evaluation harnesses).

Generation runs in one worker thread that decodes concurrent requests together (continuous batching, see
llmlab.serve.engine): each request keeps its own cache rows, sampling settings and seed, so requests never
see each other's state and greedy replies equal those of serving each alone. Errors have the
OpenAI shape {"error": {"message", "type", "param", "code"}} with 4xx codes for anything the client
can fix (malformed JSON and validation errors included: 400, not FastAPI's 422).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import re
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

from llmlab.errors import LlmlabError
from llmlab.generate.causal import GenerationConfig
from llmlab.generate.chat import prompt_ids
from llmlab.interop import load
from llmlab.serve.engine import BatchEngine, Job, TokenLogprob
from llmlab.serve.prefix_cache import PrefixCache


@dataclass
class ServeLimits:
    """What one request may ask for. max_prompt_tokens 0 = the model's context minus one."""

    max_request_bytes: int = 1_000_000
    max_prompt_tokens: int = 0
    max_tokens: int = 512
    default_max_tokens: int = 128
    max_prompts: int = 16
    max_stop: int = 16
    max_waiting: int = 256
    max_n: int = 16
    max_batch: int = 16  # requests decoded together (continuous batching); 1 = one at a time
    prefix_cache_mb: float = 0.0  # keys/values of recent prompts kept for reuse (llmlab.serve.prefix_cache); 0 = off
    max_embed_inputs: int = 256


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

# Fields a request may carry that the server accepts and does not act on (documented in the README).
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction", "web_search_options",
           "modalities", "reasoning_effort"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = False


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(..., max_length=256)
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1, le=128)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    # llmlab (and vLLM) extensions of the sampler
    top_k: int | None = Field(None, ge=-1)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    user: str | None = None


class CompletionRequest(_Base):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        ..., description="a prompt, a list of prompts, a prompt as token ids, or a list of those")
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatRequest(_Base):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class EmbeddingRequest(BaseModel):
    """POST /v1/embeddings."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(..., max_length=256)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class TokenizeRequest(BaseModel):
    """POST /tokenize (the vLLM protocol lm-evaluation-harness's remote tokenizer speaks)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, max_length=256)
    prompt: str
    add_special_tokens: bool | None = False


class DetokenizeRequest(BaseModel):
    """POST /detokenize."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, max_length=256)
    tokens: list[int]


def check_extra(req: BaseModel) -> None:
    """Refuse, naming it, a field the server neither implements nor documents as ignored."""
    for k in (req.model_extra or {}):
        if k not in IGNORED:
            raise APIError(400, f"Unsupported parameter: '{k}' is not implemented by llmlab serve.", param=k,
                           code="unsupported_parameter")


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean(text: str) -> str:
    """A lone UTF-16 surrogate (valid JSON, not valid UTF-8) becomes U+FFFD, so it can be tokenized and echoed."""
    return _SURROGATE.sub("\ufffd", text) if _SURROGATE.search(text) else text


_BYTE_DECODER: dict[str, int] = {}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the vocabulary string of a byte-level BPE token -> its bytes."""
    if not _BYTE_DECODER:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER.update({chr(c): b for b, c in zip(bs, cs)})
    return _BYTE_DECODER


class TokenText:
    """Token strings and bytes for log-probability answers (cached per id)."""

    def __init__(self, tok: Any):
        self.tok = tok
        hf = getattr(tok, "hf_tokenizer", None)
        self.byte_level = hf is not None and type(getattr(hf, "decoder", None)).__name__ == "ByteLevel"
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, i: int) -> tuple[str, list[int]]:
        got = self.cache.get(i)
        if got is None:
            text = self.tok.decode([i], skip_special_tokens=False)
            raw = None
            if self.byte_level:
                piece, table = self.tok.id_to_token(i), _byte_decoder()
                if all(c in table for c in piece):
                    raw = [table[c] for c in piece]
            got = (text, raw if raw is not None else list(text.encode("utf-8", "replace")))
            self.cache[i] = got
        return got


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
               limits: ServeLimits | None = None, threads: int = 0, batching: bool = True) -> FastAPI:
    """The FastAPI app serving `model` under the model id `name`: a decoder (gpt) answers completions and
    chat completions (continuous batching, see llmlab.serve.engine); an encoder (bert) answers embeddings."""
    limits = limits or ServeLimits()
    if model.tokenizer is None or model.config.arch not in ("gpt", "bert"):
        raise LlmlabError("llmlab serve needs a decoder-only (gpt) model or an encoder (bert) with a tokenizer")
    decoder = model.config.arch == "gpt"
    model.eval()
    tok = model.tokenizer
    engine = BatchEngine(model, limits.max_batch, threads, batching,
                         prefix_cache=PrefixCache.for_model(model, limits.prefix_cache_mb)) if decoder else None
    embed_lock = threading.Lock()
    state = {"waiting": 0, "served": 0, "created": int(time.time())}
    block = model.config.block_size
    max_prompt = min(limits.max_prompt_tokens or block - 1, block - 1)
    vocab = model.config.vocab_size
    token_text = TokenText(tok)
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
        return {"id": name, "object": "model", "created": state["created"], "owned_by": "llmlab"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness: always open (no API key), with the queue length."""
        return {"status": "ok", "model": name, "waiting": state["waiting"], "served": state["served"],
                "running": engine.busy if engine else 0}

    @app.get("/v1/models", dependencies=[auth])
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=[auth])
    async def get_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")
        return model_card()

    def check_model(m: str, endpoint: str) -> None:
        if m != name:
            raise APIError(404, f"The model '{m}' does not exist; this server serves '{name}'.",
                           param="model", code="model_not_found")
        if endpoint == "embeddings" and decoder:
            raise APIError(400, f"'{name}' is a decoder-only language model; /v1/embeddings needs an encoder "
                                "(serve one, e.g. `llmlab serve minilm`).", param="model", code="invalid_model")
        if endpoint not in ("embeddings", "tokenizer") and not decoder:
            raise APIError(400, f"'{name}' is an encoder model: it serves /v1/embeddings only.", param="model",
                           code="invalid_model")

    def gen_config(req: _Base, max_tokens: int | None, extra_stop: Sequence[str] = (), min_tokens: int = 1
                   ) -> GenerationConfig:
        check_extra(req)
        if req.stream_options is not None and req.stream_options.model_extra:
            k = next(iter(req.stream_options.model_extra))
            raise APIError(400, f"Unsupported parameter: 'stream_options.{k}'.", param=f"stream_options.{k}",
                           code="unsupported_parameter")
        mt = limits.default_max_tokens if max_tokens is None else max_tokens
        if mt < min_tokens:
            raise APIError(400, f"Invalid 'max_tokens': {mt}; it must be at least {min_tokens}.", param="max_tokens",
                           code="invalid_value")
        if mt > limits.max_tokens:
            raise APIError(400, f"Invalid 'max_tokens': {mt}; this server allows at most {limits.max_tokens}.",
                           param="max_tokens", code="invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > limits.max_stop:
            raise APIError(400, f"Invalid 'stop': at most {limits.max_stop} stop sequences (raise the limit with "
                                "`llmlab serve --max-stop`).", param="stop", code="invalid_value")
        if (req.n or 1) > limits.max_n:
            raise APIError(400, f"Invalid 'n': {req.n}; this server allows at most {limits.max_n}.", param="n",
                           code="invalid_value")
        rf = req.response_format
        if rf is not None and rf.get("type", "text") != "text":
            raise APIError(400, f"Invalid 'response_format': type {rf.get('type')!r} is not supported (llmlab serve "
                                "has no constrained decoding); only {\"type\": \"text\"}.", param="response_format",
                           code="unsupported_value")
        bias: dict[int, float] = {}
        for k, v in (req.logit_bias or {}).items():
            try:
                t = int(k)
            except ValueError:
                t = -1
            if not 0 <= t < vocab:
                raise APIError(400, f"Invalid 'logit_bias': {k!r} is not a token id of this model (0..{vocab - 1}).",
                               param="logit_bias", code="invalid_value")
            if not -100 <= v <= 100:
                raise APIError(400, f"Invalid 'logit_bias': the bias of token {k} must be in [-100, 100].",
                               param="logit_bias", code="invalid_value")
            bias[t] = float(v)
        temperature = 1.0 if req.temperature is None else req.temperature
        return GenerationConfig(max_new_tokens=mt, temperature=temperature,
                                top_p=1.0 if req.top_p is None else req.top_p,
                                top_k=max(0, req.top_k or 0), repetition_penalty=req.repetition_penalty or 1.0,
                                presence_penalty=req.presence_penalty or 0.0,
                                frequency_penalty=req.frequency_penalty or 0.0, logit_bias=bias or None,
                                stop=tuple(clean(s) for s in stop if s) + tuple(extra_stop), seed=req.seed)

    def check_prompt(ids: list[int], param: str) -> list[int]:
        if len(ids) > max_prompt:
            raise APIError(400, f"This model's maximum prompt length is {max_prompt} tokens; your prompt has "
                                f"{len(ids)} tokens. Shorten it.", param=param, code="context_length_exceeded")
        return ids

    def encode_text(text: str) -> list[int]:
        try:
            ids = tok.encode(clean(text))
        except LlmlabError as e:
            raise APIError(400, f"The prompt cannot be tokenized: {e}", param="prompt", code="invalid_value") from None
        if not ids:
            ids = [tok.eos_id] if tok.eos_id is not None else tok.encode("\n")
        return ids

    def check_ids(ids: list[int], param: str) -> list[int]:
        if not ids:
            raise APIError(400, f"Invalid '{param}': a prompt given as token ids is empty.", param=param,
                           code="invalid_value")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"Invalid '{param}': token id {bad[0]} is outside the vocabulary (0..{vocab - 1}).",
                           param=param, code="invalid_value")
        return ids

    def check_busy() -> None:
        if state["waiting"] >= limits.max_waiting:
            raise APIError(429, "The server is busy; retry later.", "rate_limit_error", code="server_busy")

    def seeds(cfg: GenerationConfig, n: int) -> list[GenerationConfig]:
        """n copies of cfg, each choice with its own seed (seed, seed + 1, ...) when a seed is given."""
        if n == 1:
            return [cfg]
        return [dataclasses.replace(cfg, seed=None if cfg.seed is None else cfg.seed + i) for i in range(n)]

    def raise_job_error(jobs: Sequence[Job]) -> None:
        for j in jobs:
            if j.error is not None:
                if isinstance(j.error, LlmlabError):
                    raise APIError(400, f"The request failed: {j.error}", code="invalid_value")
                raise APIError(500, f"generation failed ({type(j.error).__name__})", "server_error")

    async def run(jobs: list[Job]) -> list[Job]:
        check_busy()
        state["waiting"] += 1
        try:
            await anyio.to_thread.run_sync(engine.run, jobs)
        finally:
            state["waiting"] -= 1
            state["served"] += 1
        raise_job_error(jobs)
        return jobs

    def usage(prompts: Sequence[Sequence[int]], jobs: Sequence[Job]) -> dict[str, int]:
        p = sum(len(x) for x in prompts)
        c = sum(j.completion_tokens for j in jobs)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(jobs: list[Job], chunk: Callable[[int, str | None, list[TokenLogprob], str | None],
                                                                dict[str, Any] | None],
                            first: list[dict[str, Any]], final_usage: Callable[[], Any] | None) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        for i, j in enumerate(jobs):
            j.on_text = (lambda text, toks, i=i: loop.call_soon_threadsafe(queue.put_nowait, ("text", i, text, toks)))
            j.cancelled = cancel.is_set

        async def work() -> None:
            try:
                await run(jobs)
                queue.put_nowait(("done", None, None, None))
            except Exception as e:  # noqa: BLE001 - reported in the stream
                queue.put_nowait(("error", e, None, None))

        task = asyncio.create_task(work())
        try:
            for obj in first:
                yield sse(obj)
            while True:
                kind, a, b, c = await queue.get()
                if kind == "text":
                    obj = chunk(a, b, c, None)
                    if obj is not None:
                        yield sse(obj)
                elif kind == "error":
                    err = a if isinstance(a, APIError) else APIError(500, "generation failed", "server_error")
                    yield sse(error_body(err.message, err.type, err.param, err.code))
                    break
                else:
                    while not queue.empty():  # text reported just before the end
                        kind, a, b, c = queue.get_nowait()
                        if kind == "text":
                            obj = chunk(a, b, c, None)
                            if obj is not None:
                                yield sse(obj)
                    for i, j in enumerate(jobs):
                        yield sse(chunk(i, None, [], j.finish_reason))
                    if final_usage is not None:
                        yield sse(final_usage())
                    break
            yield "data: [DONE]\n\n"
        finally:
            cancel.set()
            if not task.done():
                await asyncio.shield(asyncio.wait([task]))

    # ------------------------------------------------------------------ /v1/completions

    def completion_logprobs(toks: Sequence[TokenLogprob], offset: int) -> dict[str, Any]:
        """The legacy completions `logprobs` object for tokens whose text starts at `offset`."""
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in toks:
            s = token_text(t.id)[0]
            out["tokens"].append(s)
            out["token_logprobs"].append(t.logprob)
            if t.logprob is None:
                out["top_logprobs"].append(None)
            else:
                top = {token_text(i)[0]: lp for i, lp in t.top}
                top.setdefault(s, t.logprob)
                out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(s)
        return out

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(req: CompletionRequest) -> Any:
        check_model(req.model, "completions")
        p = req.prompt
        if isinstance(p, str):
            raw: list[str | list[int]] = [p]
        elif p and all(isinstance(x, int) for x in p):
            raw = [list(p)]
        else:
            raw = list(p)
        if not raw:
            raise APIError(400, "Invalid 'prompt': give a string, a list of strings, a list of token ids or a list "
                                "of lists of token ids (non-empty).", param="prompt", code="invalid_value")
        if len(raw) > limits.max_prompts:
            raise APIError(400, f"Invalid 'prompt': at most {limits.max_prompts} prompts per request.",
                           param="prompt", code="invalid_value")
        if req.suffix:
            raise APIError(400, "Unsupported parameter: 'suffix' (insertion) is not implemented by llmlab serve.",
                           param="suffix", code="unsupported_parameter")
        n = req.n or 1
        if req.best_of is not None and req.best_of != n:
            raise APIError(400, "Unsupported parameter: 'best_of' other than n is not implemented by llmlab serve.",
                           param="best_of", code="unsupported_parameter")
        echo = bool(req.echo)
        cfg = gen_config(req, req.max_tokens if "max_tokens" in req.model_fields_set else 16, min_tokens=0)
        ids = [check_prompt(encode_text(x) if isinstance(x, str) else check_ids(x, "prompt"), "prompt") for x in raw]
        texts = [clean(x) if isinstance(x, str) else tok.decode(i) for x, i in zip(raw, ids)]
        lp = req.logprobs
        jobs = [Job(ids[k], c, logprobs=lp, prompt_logprobs=echo and lp is not None)
                for k in range(len(ids)) for c in seeds(cfg, n)]
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def body(choices: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
            return {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": choices,
                    **kw}

        def base(i: int) -> int:  # where choice i's generated text starts in prompt + completion
            return len(texts[i // n])

        if req.stream:
            offsets = [base(i) for i in range(len(jobs))]

            def chunk(i: int, text: str | None, toks: list[TokenLogprob], finish: str | None) -> dict[str, Any]:
                lps = None
                if lp is not None and finish is None:
                    lps = completion_logprobs(toks, offsets[i])
                    offsets[i] += sum(len(x) for x in lps["tokens"])
                return body([{"index": i, "text": text or "", "logprobs": lps, "finish_reason": finish}])

            first: list[dict[str, Any]] = []
            if echo:
                first = [body([{"index": i, "text": texts[i // n], "finish_reason": None, "logprobs": None}])
                         for i in range(len(jobs))]
            include = bool(req.stream_options and req.stream_options.include_usage)
            final = (lambda: body([], usage=usage(ids, jobs))) if include else None
            check_busy()
            if echo and lp is not None:  # the prompt's log-probabilities come first: score it

                async def prompt_first() -> AsyncIterator[str]:
                    scored = await run([Job(j.prompt, dataclasses.replace(j.cfg, max_new_tokens=0), logprobs=lp,
                                            prompt_logprobs=True) for j in jobs])
                    for i, s_ in enumerate(scored):
                        yield sse(body([{"index": i, "text": texts[i // n], "finish_reason": None,
                                         "logprobs": completion_logprobs(s_.prompt_tokens_lp, 0)}]))
                    for j in jobs:
                        j.prompt_logprobs = False
                    async for ev in stream_events(jobs, chunk, [], final):
                        yield ev

                return StreamingResponse(prompt_first(), media_type="text/event-stream")
            return StreamingResponse(stream_events(jobs, chunk, first, final), media_type="text/event-stream")
        await run(jobs)
        choices = []
        for i, j in enumerate(jobs):
            lps = None
            if lp is not None:
                toks = (j.prompt_tokens_lp if echo else []) + j.tokens
                lps = completion_logprobs(toks, 0 if echo else base(i))
            choices.append({"index": i, "text": (texts[i // n] if echo else "") + j.text, "logprobs": lps,
                            "finish_reason": j.finish_reason})
        return body(choices, usage=usage(ids, jobs))

    # ------------------------------------------------------------------ /v1/chat/completions

    def chat_logprobs(toks: Sequence[TokenLogprob], k: int) -> dict[str, Any]:
        content = []
        for t in toks:
            s, b = token_text(t.id)
            content.append({"token": s, "logprob": t.logprob, "bytes": b,
                            "top_logprobs": [{"token": token_text(i)[0], "logprob": v, "bytes": token_text(i)[1]}
                                             for i, v in t.top[:k]]})
        return {"content": content, "refusal": None}

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(req: ChatRequest) -> Any:
        check_model(req.model, "chat")
        msgs: list[dict[str, Any]] = []
        for i, m in enumerate(req.messages):
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
            content = clean(content)
            role = "system" if m.role == "developer" else m.role
            msg: dict[str, Any] = {"role": role, "content": content}
            for k, v in (m.model_extra or {}).items():
                if k in ("tool_calls", "tool_call_id", "name"):
                    msg[k] = v
                elif k not in ("refusal", "audio"):
                    raise APIError(400, f"Unsupported parameter: 'messages[{i}].{k}'.", param=f"messages.{i}.{k}",
                                   code="unsupported_parameter")
            msgs.append(msg)
            if len(content) > limits.max_request_bytes:
                raise APIError(400, f"Invalid 'messages[{i}].content': too long.", param=f"messages.{i}.content")
        if req.tool_choice not in (None, "auto", "none") and req.tools:
            raise APIError(400, "Invalid 'tool_choice': only 'auto' and 'none' are supported (llmlab serve does not "
                                "force or parse tool calls).", param="tool_choice", code="unsupported_value")
        if not req.logprobs and req.top_logprobs:
            raise APIError(400, "Invalid 'top_logprobs': it needs 'logprobs': true.", param="top_logprobs",
                           code="invalid_value")
        try:
            ids, extra_stop = prompt_ids(model, msgs, tools=req.tools if req.tool_choice != "none" else None)
        except LlmlabError as e:
            param = "tools" if req.tools and "tool" in str(e) else "messages"
            raise APIError(400, f"Invalid '{param}': {e}", param=param, code="invalid_value") from None
        mt = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        cfg = gen_config(req, mt, extra_stop)
        check_prompt(ids, "messages")
        n = req.n or 1
        k = req.top_logprobs or 0
        lp = k if req.logprobs else None
        jobs = [Job(ids, c, logprobs=lp) for c in seeds(cfg, n)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def body(obj: str, choices: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
            return {"id": rid, "object": obj, "created": created, "model": name, "system_fingerprint": "llmlab",
                    "choices": choices, **kw}

        if req.stream:
            def chunk(i: int, text: str | None, toks: list[TokenLogprob], finish: str | None
                      ) -> dict[str, Any] | None:
                delta = {"content": text} if text is not None else {}
                lps = chat_logprobs(toks, k) if lp is not None and finish is None else None
                return body("chat.completion.chunk", [{"index": i, "delta": delta, "logprobs": lps,
                                                       "finish_reason": finish}])

            first = [body("chat.completion.chunk", [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]) for i in range(n)]
            include = bool(req.stream_options and req.stream_options.include_usage)
            final = (lambda: body("chat.completion.chunk", [], usage=usage([ids], jobs))) if include else None
            check_busy()
            return StreamingResponse(stream_events(jobs, chunk, first, final), media_type="text/event-stream")
        await run(jobs)
        choices = [{"index": i, "message": {"role": "assistant", "content": j.text},
                    "logprobs": chat_logprobs(j.tokens, k) if lp is not None else None,
                    "finish_reason": j.finish_reason} for i, j in enumerate(jobs)]
        return body("chat.completion", choices, usage=usage([ids], jobs))

    # ------------------------------------------------------------------ /v1/embeddings

    def embed(batch: list[list[int]]) -> list[torch.Tensor]:
        with embed_lock, torch.inference_mode():
            if threads:
                torch.set_num_threads(threads)
            return [model.sentence_embedding(torch.tensor([x]))[0].float() for x in batch]

    @app.post("/v1/embeddings", dependencies=[auth])
    async def embeddings(req: EmbeddingRequest) -> Any:
        check_model(req.model, "embeddings")
        check_extra(req)
        x = req.input
        if isinstance(x, str):
            raw: list[str | list[int]] = [x]
        elif x and all(isinstance(v, int) for v in x):
            raw = [list(x)]
        else:
            raw = list(x)
        if not raw or len(raw) > limits.max_embed_inputs:
            raise APIError(400, f"Invalid 'input': give 1 to {limits.max_embed_inputs} inputs.", param="input",
                           code="invalid_value")
        batch = []
        for v in raw:
            if isinstance(v, str):
                if not v:
                    raise APIError(400, "Invalid 'input': an input is empty.", param="input", code="invalid_value")
                ids = tok.encode(clean(v), add_special_tokens=True)
            else:
                ids = check_ids(v, "input")
            if len(ids) > block:
                raise APIError(400, f"Invalid 'input': an input has {len(ids)} tokens; this model reads at most "
                                    f"{block}.", param="input", code="context_length_exceeded")
            batch.append(ids)
        vecs = await anyio.to_thread.run_sync(embed, batch)
        dim = vecs[0].numel()
        if req.dimensions is not None and req.dimensions != dim:
            raise APIError(400, f"Invalid 'dimensions': this model's embeddings have {dim} dimensions.",
                           param="dimensions", code="unsupported_value")
        data = []
        for i, v in enumerate(vecs):
            e: Any = v.tolist()
            if req.encoding_format == "base64":
                e = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": e})
        state["served"] += 1
        used = sum(len(b) for b in batch)
        return {"object": "list", "data": data, "model": name, "usage": {"prompt_tokens": used, "total_tokens": used}}

    # ------------------------------------------------------------------ the model's tokenizer (vLLM's protocol)
    # lm-evaluation-harness's local-completions model asks for these first (tokenizer_backend=auto) and then
    # tokenizes with the served model's own tokenizer: any llmlab model (a character vocabulary, a GGUF file)
    # can be evaluated without a Hugging Face tokenizer folder. Token ids are those /v1/completions scores.

    def special(i: int | None) -> str | None:
        return None if i is None else tok.id_to_token(i)

    @app.get("/tokenizer_info", dependencies=[auth])
    async def tokenizer_info() -> dict[str, Any]:
        return {"tokenizer_class": type(tok).__name__, "eos_token": special(tok.eos_id),
                "bos_token": special(tok.bos_id), "pad_token": special(tok.pad_id),
                "chat_template": getattr(tok, "chat_template", None), "model_max_length": block,
                "vocab_size": vocab}

    @app.post("/tokenize", dependencies=[auth])
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            check_model(req.model, "tokenizer")
        check_extra(req)
        try:
            ids = tok.encode(clean(req.prompt), add_special_tokens=bool(req.add_special_tokens))
        except LlmlabError as e:
            raise APIError(400, f"The prompt cannot be tokenized: {e}", param="prompt", code="invalid_value") from None
        return {"count": len(ids), "max_model_len": block, "tokens": ids}

    @app.post("/detokenize", dependencies=[auth])
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            check_model(req.model, "tokenizer")
        check_extra(req)
        if req.tokens:
            check_ids(req.tokens, "tokens")
        return {"prompt": tok.decode(req.tokens, skip_special_tokens=False)}  # as vLLM (and HF decode)

    wrapped = BodyLimit(app, limits.max_request_bytes)
    app.state.asgi = wrapped
    return app


def asgi_app(app: FastAPI) -> Any:
    """The app with its request-size limit in front (what uvicorn should run)."""
    return app.state.asgi


def load_for_serving(path: str) -> torch.nn.Module:
    """The model of a run folder (or Hugging Face GPT-2 folder) checked for serving."""

    model = load(path)
    if model.config.arch not in ("gpt", "bert") or model.tokenizer is None:
        raise LlmlabError(f"{path} is a {model.config.arch} model or has no tokenizer; serve a GPT run folder "
                          "(completions, chat) or an encoder such as minilm (embeddings)")
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
