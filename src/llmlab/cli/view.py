"""`llmlab view`: one self-contained HTML page to look inside a model (head, model and query/key views, logit
lens, activation patching), optionally served on 127.0.0.1."""

from __future__ import annotations

import argparse

from llmlab.cli.common import console, verb
from llmlab.inspect.induction import InductionConfig, induction_page, run_experiment
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


def _induction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/induction", help="folder for induction.html and induction.json")
    p.add_argument("--max-iters", type=int, default=InductionConfig.max_iters, help="training steps of each model")
    p.add_argument("--eval-every", type=int, default=InductionConfig.eval_every, help="steps between checkpoints")
    p.add_argument("--lr", type=float, default=InductionConfig.lr)
    p.add_argument("--seed", type=int, default=InductionConfig.seed)


def _induction(a: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    from llmlab.checkpoint import atomic_write_bytes, atomic_write_json
    from llmlab.errors import LlmlabError

    if a.max_iters < 1 or a.eval_every < 1 or a.lr <= 0:
        raise LlmlabError("--max-iters and --eval-every must be at least 1 and --lr above 0")
    out = Path(a.out)
    c = console()
    t0 = time.perf_counter()
    c.print(f"training a 2-layer attention-only model and a 1-layer control, {a.max_iters:,} steps each ...")
    res = run_experiment(InductionConfig(max_iters=a.max_iters, eval_every=a.eval_every, lr=a.lr, seed=a.seed))
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(out / "induction.json", res)
    atomic_write_bytes(out / "induction.html", induction_page(res).encode())
    two, one = res["two_layer"]["checkpoints"][-1], res["one_layer"]["checkpoints"][-1]
    c.print(f"prefix matching (chance {res['chance_prefix']:.3f}): 2-layer best layer-2 head "
            f"{max(two['prefix'][-1]):.3f}, 1-layer best head {max(one['prefix'][0]):.3f}; in-context score "
            f"2-layer {two['icl']:.3f}, 1-layer {one['icl']:.3f}; formed at step {res['two_layer']['formed_at']}; "
            f"{res['wall_s']:.0f} s", markup=False)
    c.print(f"wrote {out / 'induction.html'} and {json.dumps(str(out / 'induction.json'))}", markup=False)
    return 0


cmd_induction = verb("induction", "watch induction heads form: a 2-layer attention-only model against a 1-layer "
                     "control, scored per checkpoint", _induction_args)(_induction)
