"""`llmlab serve RUN`: an OpenAI-compatible HTTP server for a model (see llmlab.serve)."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
import sys

from llmlab.cli.common import verb
from llmlab.errors import LlmlabError
from llmlab.serve.app import ServeLimits, asgi_app, create_app, load_for_serving


def check_port(host: str, port: int) -> None:
    """Refuse, with one line naming the fix, an address uvicorn could not listen on (it would log seven lines
    and exit 3): bind a socket the way uvicorn does (SO_REUSEADDR, so a port in TIME_WAIT counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", errno.EADDRINUSE)):
                raise LlmlabError(f"port {port} on {host} is already in use; stop the program listening there or "
                                  "choose another --port") from None
            raise LlmlabError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host") from None


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="an llmlab run folder (a chat model from `llmlab train --task assistant`, or any GPT), "
                               "a Hugging Face or GGUF model (e.g. smollm2), or an encoder such as minilm "
                               "(/v1/embeddings)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--name", help="the model id clients send as `model` (default: the folder name)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $LLMLAB_API_KEY if set)")
    p.add_argument("--max-tokens", type=int, default=512, help="the largest max_tokens a request may ask (512)")
    p.add_argument("--default-max-tokens", type=int, default=128, help="max_tokens of chat requests that give none")
    p.add_argument("--max-prompt-tokens", type=int, default=0, help="longest prompt in tokens (0 = context - 1)")
    p.add_argument("--max-request-bytes", type=int, default=1_000_000, help="largest request body (1 MB)")
    p.add_argument("--max-stop", type=int, default=16, help="most stop strings per request (16)")
    p.add_argument("--max-n", type=int, default=16, help="largest n (choices per request) (16)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded together, continuous batching (16; 1 = one at a time)")
    p.add_argument("--prefix-cache-mb", type=float, default=0,
                   help="keep the keys and values of recent prompts in this many megabytes, so a prompt that starts "
                        "like an earlier one (a chat resending its conversation) prefills only the rest; the "
                        "logits then match a full prefill up to float rounding (default 0 = off)")
    p.add_argument("--threads", type=int, default=0, help="torch threads for generation (0 = torch's default)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


@verb("serve", "serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
               "/v1/embeddings)", _args)
def cmd_serve(a: argparse.Namespace) -> int:
    from pathlib import Path

    import uvicorn


    if not 0 <= a.port <= 65535:
        raise LlmlabError(f"--port {a.port} is not a port number (0-65535)")
    for flag, v in (("--max-tokens", a.max_tokens), ("--default-max-tokens", a.default_max_tokens),
                    ("--max-request-bytes", a.max_request_bytes), ("--max-stop", a.max_stop), ("--max-n", a.max_n),
                    ("--max-batch", a.max_batch)):
        if v < 1:
            raise LlmlabError(f"{flag} must be at least 1")
    if a.prefix_cache_mb < 0:
        raise LlmlabError(f"--prefix-cache-mb {a.prefix_cache_mb}: give 0 (off) or a number of megabytes")
    if a.default_max_tokens > a.max_tokens:
        raise LlmlabError("--default-max-tokens is larger than --max-tokens; lower it")
    check_port(a.host, a.port)  # before loading the model: a taken port is found at once
    key = a.api_key or os.environ.get("LLMLAB_API_KEY") or None
    model = load_for_serving(a.run)
    name = a.name or Path(a.run).resolve().name
    limits = ServeLimits(max_request_bytes=a.max_request_bytes, max_prompt_tokens=a.max_prompt_tokens,
                         max_tokens=a.max_tokens, default_max_tokens=a.default_max_tokens,
                         max_stop=a.max_stop, max_n=a.max_n, max_batch=a.max_batch,
                         prefix_cache_mb=a.prefix_cache_mb)
    app = create_app(model, name=name, api_key=key, limits=limits, threads=a.threads)
    try:
        loopback = ipaddress.ip_address(a.host).is_loopback
    except ValueError:
        loopback = a.host == "localhost"
    if not loopback and not key:
        print(f"llmlab serve: warning: listening on {a.host} without --api-key: anyone who can reach this "
              "machine can use the model", file=sys.stderr)
    print(f"serving {name} at http://{a.host}:{a.port}/v1 (OpenAI-compatible; model id {name!r}"
          f"{', API key required' if key else ''})", file=sys.stderr)
    uvicorn.run(asgi_app(app), host=a.host, port=a.port, log_level=a.log_level)
    return 0
