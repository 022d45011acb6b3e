"""`llmlab view`: one self-contained HTML page to look inside a model (head, model and query/key views, logit
lens, activation patching), optionally served on 127.0.0.1."""

from __future__ import annotations

import argparse

from llmlab.cli.common import console, verb
from llmlab.inspect.view import MAX_TOKENS, serve_page, write_view
from llmlab.interop import load


def _add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="minilm, smollm2, an llmlab run folder, a Hugging Face folder or a GGUF file")
    p.add_argument("--text", required=True, help="the text to look at")
    p.add_argument("--out", default="runs/view", help="folder for view.html (default runs/view)")
    p.add_argument("--patch", help="a corrupted version of --text (same number of tokens) for activation patching")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS,
                   help=f"the longest text the view accepts (default {MAX_TOKENS})")
    p.add_argument("--serve", action="store_true", help="serve the page on 127.0.0.1 and print its URL")
    p.add_argument("--port", type=int, default=0, help="port for --serve (default: any free one)")


def _run(a: argparse.Namespace) -> int:
    model = load(a.model)
    res = write_view(model, a.text, a.out, patch=a.patch, max_tokens=a.max_tokens, name=str(a.model))
    c = console()
    c.print(f"wrote {res.path} ({res.size_bytes / 1e6:.2f} MB)", markup=False)
    if a.serve:
        server = serve_page(res.path, a.port)
        host, port = server.server_address[:2]
        c.print(f"serving http://{host}:{port}/{res.path.name}  (Ctrl-C to stop)", markup=False)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
    return 0


cmd_view = verb("view", "write an interactive, self-contained HTML page that shows inside a model", _add_args)(_run)
