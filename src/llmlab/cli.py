"""The `llmlab` command: one verb per task, each a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import LlmlabError

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]
VERBS: dict[str, tuple[AddArgs, Run, str]] = {}


def verb(name: str, help: str, add_args: AddArgs) -> Callable[[Run], Run]:
    """Register a verb: its one-line help, the function adding its arguments, and its run function."""

    def deco(fn: Run) -> Run:
        VERBS[name] = (add_args, fn, help)
        return fn

    return deco


def console(stderr: bool = False):  # noqa: ANN201
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


# ----------------------------------------------------------------------------- attention


def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sentence", help="the text to look at")
    p.add_argument("--model", default="minilm", help="minilm (default), an llmlab run folder or a Hugging Face folder")
    p.add_argument("--query", help="the word whose attention to show (e.g. woke)")
    p.add_argument("--key", help="rank the heads by how much the query attends to this word (e.g. cat)")
    p.add_argument("--head", help="LAYER.HEAD to draw large (default: the best head for --key)")
    p.add_argument("--no-special", action="store_true", help="leave out [CLS], [SEP] and other special tokens")
    p.add_argument("--top", type=int, default=5, help="how many keys / heads to list (default 5)")
    p.add_argument("--target", help="seq2seq models: the target text whose cross-attention to show")
    p.add_argument("--out", default="runs/attention", help="folder for the PNG files (default runs/attention)")
    p.add_argument("--json", action="store_true", help='print {"tokens": [...], "weights": [layer][head][q][k]}')


@verb("attention", "show which tokens a word attends to, in every layer and head", _attention_args)
def cmd_attention(a: argparse.Namespace) -> int:
    from . import lens, viz
    from .interop import load

    model = load(a.model)
    target = a.target
    if model.config.arch == "seq2seq" and target is None:  # show the cross-attention of the model's own output
        from .seq2seq_train import greedy_target

        target = greedy_target(model, a.sentence)
        console(stderr=True).print(f"target (the model's greedy output): {target!r}", markup=False)
    maps = lens.compute_attention(model, a.sentence, target=target)
    if a.json:
        print(json.dumps(maps.to_json()))
        return 0
    out = Path(a.out)
    c = console()
    c.print(f"[bold]{maps.n_layers} layers x {maps.n_heads} heads[/] over {len(maps.tokens)} tokens: "
            + " ".join(maps.tokens))
    head = _parse_head(a.head, maps) if a.head else None
    if a.query:
        q = a.query
        rows = lens.top_keys(maps, q, k=a.top, skip_special=a.no_special)
        c.print(f"\n[bold]'{q}' attends most to[/] (mean over every layer and head"
                + (", special tokens left out" if a.no_special else "") + "):")
        for _, t, w in rows:
            c.print(f"  {t:>14s}  {w:.3f}  {'#' * int(round(w * 40))}")
        c.print(f"\n[bold]per head[/] (top {min(3, a.top)} keys):")
        for layer in range(maps.n_layers):
            for h in range(maps.n_heads):
                best = lens.top_keys(maps, q, k=min(3, a.top), skip_special=a.no_special, layer=layer, head=h)
                c.print(f"  L{layer}.H{h:<2d} " + "  ".join(f"{t}:{w:.2f}" for _, t, w in best))
        if a.key:
            ranked = lens.rank_heads(maps, q, a.key, skip_special=a.no_special)
            c.print(f"\n[bold]heads where '{q}' attends most to '{a.key}'[/]:")
            for layer, h, w in ranked[: a.top]:
                c.print(f"  layer {layer} head {h}: {w:.3f}")
            if head is None:
                head = ranked[0][:2]
    grid = viz.attention_grid(maps.weights, maps.tokens, out / "attention_grid.png", highlight=head)
    c.print(f"\nwrote {grid}")
    if head is not None:
        layer, h = head
        qpos = lens.word_positions(maps, a.query)[-1] if a.query else None
        big = viz.attention_map(maps.weights[layer, h], maps.tokens, out / f"attention_L{layer}_H{h}.png",
                                title=f"layer {layer}, head {h}", mark_query=qpos)
        c.print(f"wrote {big}")
    if maps.cross is not None:
        cross = viz.attention_grid(maps.cross, maps.target_tokens, out / "cross_attention_grid.png",
                                   title="cross-attention: target (down) looking at source (across)")
        c.print(f"wrote {cross}")
        mean = viz.attention_map(maps.cross.mean((0, 1)), maps.target_tokens, out / "cross_attention_mean.png",
                                 title="cross-attention, mean over decoder layers and heads",
                                 key_tokens=maps.tokens)
        c.print(f"wrote {mean}")
        from .seq2seq_train import cross_attention_rows

        c.print("\n[bold]cross-attention[/] (mean over decoder layers and heads): each output token, and the "
                "source tokens attended to while choosing it")
        for out_tok, keys in cross_attention_rows(maps, min(3, a.top)):
            c.print(f"  {out_tok!r:>14s} <- " + "  ".join(f"{t!r}:{w:.2f}" for t, w in keys), markup=False)
    return 0


def _parse_head(spec: str, maps) -> tuple[int, int]:  # noqa: ANN001
    try:
        layer, h = (int(x) for x in spec.split("."))
    except ValueError:
        raise LlmlabError(f"--head {spec!r} is not LAYER.HEAD (for example 2.5)") from None
    if not (0 <= layer < maps.n_layers and 0 <= h < maps.n_heads):
        raise LlmlabError(f"--head {spec} is out of range: layers 0-{maps.n_layers - 1}, heads 0-{maps.n_heads - 1}")
    return layer, h


# ----------------------------------------------------------------------------- embed


def _embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sentence")
    p.add_argument("--model", default="minilm", help="minilm (default) or an encoder folder")
    p.add_argument("--json", action="store_true", help='print {"embedding": [...]}')


@verb("embed", "print the normalised sentence embedding of an encoder model", _embed_args)
def cmd_embed(a: argparse.Namespace) -> int:
    import torch

    from .interop import load

    if not a.sentence.strip():
        raise LlmlabError("the sentence is empty; give some text to embed")
    model = load(a.model)
    if model.config.arch != "bert":
        raise LlmlabError(f"{a.model} is a {model.config.arch} model; embeddings need an encoder (e.g. minilm)")
    ids = model.tokenizer.encode(a.sentence, add_special_tokens=True)[: model.config.block_size]
    with torch.no_grad():
        e = model.sentence_embedding(torch.tensor([ids]))[0]
    if a.json:
        print(json.dumps({"embedding": e.tolist()}))
    else:
        print(f"dim {e.numel()}, L2 norm {float(e.norm()):.4f}")
        print(" ".join(f"{v:+.4f}" for v in e.tolist()))
    return 0


# ----------------------------------------------------------------------------- info


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="minilm, an llmlab run folder or a Hugging Face folder")
    p.add_argument("--all", action="store_true", help="list every layer's parameters")


@verb("info", "print a model's architecture, parameter counts and layer shapes", _info_args)
def cmd_info(a: argparse.Namespace) -> int:
    from rich.table import Table

    from .interop import load

    model = load(a.model)
    cfg = model.config
    c = console()
    n_params = sum(p.numel() for p in model.parameters())
    emb = sum(p.numel() for n, p in model.named_parameters() if "emb" in n or n.startswith(("wte", "wpe")))
    c.print(f"[bold]{a.model}[/]: {cfg.arch}  layers={cfg.n_layer}"
            + (f"+{cfg.n_dec_layer} decoder" if cfg.arch == "seq2seq" else "")
            + f"  heads={cfg.n_head}  width={cfg.n_embd}  ffn={cfg.inner}  vocab={cfg.vocab_size}  "
              f"context={cfg.block_size}")
    c.print(f"positions={cfg.position}  norm={cfg.norm} ({'pre' if cfg.prenorm else 'post'}-LN)  "
            f"activation={cfg.activation}  tied={cfg.tie_embeddings}  bias={cfg.bias}")
    c.print(f"parameters: {n_params:,} total, {n_params - emb:,} excluding embeddings")
    if model.tokenizer is not None:
        c.print(f"tokenizer: {model.tokenizer.kind}, {model.tokenizer.vocab_size} tokens")
    t = Table("parameter", "shape", "count")
    for n, p in model.named_parameters():
        if not a.all and any(f".{i}." in f".{n}" for i in range(1, 1000)):
            continue
        t.add_row(n, "x".join(map(str, p.shape)), f"{p.numel():,}")
    c.print(t)
    if not a.all:
        c.print("(layers 1 and up repeat layer 0; --all lists every parameter)")
    return 0


# ----------------------------------------------------------------------------- export


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="an llmlab GPT run folder")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")


@verb("export", "write an llmlab GPT run as a Hugging Face GPT-2 folder", _export_args)
def cmd_export(a: argparse.Namespace) -> int:
    from .interop import export_gpt2, load

    out = Path(a.out)
    if out.exists() and any(out.iterdir()) and not a.force:
        raise LlmlabError(f"{out} exists and is not empty; choose a new folder or pass --force")
    model = load(a.run)
    export_gpt2(model, out)
    print(f"wrote {out} (transformers.GPT2LMHeadModel.from_pretrained({str(out)!r}) loads it)")
    return 0


# ----------------------------------------------------------------------------- train


def _field_type(f) -> type:  # noqa: ANN001
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if t.startswith(name):
            return typ
    return str


def _train_args(p: argparse.ArgumentParser) -> None:
    import dataclasses

    from .config import ModelConfig
    from .train import MODEL_CLI_SKIP, PRESETS, TrainConfig

    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)} (default tiny)")
    p.add_argument("--config", help="a TOML file with [model] and [train] tables")
    p.add_argument("--out", help="the run folder (default runs/<preset>-<timestamp>)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last checkpoint")
    g = p.add_argument_group("overrides (any field of the model or training config)")
    fields = [f for f in dataclasses.fields(TrainConfig)] + \
        [f for f in dataclasses.fields(ModelConfig) if f.name not in MODEL_CLI_SKIP]
    for f in fields:
        typ = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        if typ is bool:
            g.add_argument(flag, dest=f"ov_{f.name}", action=argparse.BooleanOptionalAction, default=None)
        else:
            g.add_argument(flag, dest=f"ov_{f.name}", type=typ, default=None, metavar=typ.__name__.upper())


@verb("train", "train a model (default: a small character-level GPT on the Python language reference)",
      _train_args)
def cmd_train(a: argparse.Namespace) -> int:
    import time

    from .train import load_run_for_resume, resolve_config, train

    overrides = {k[3:]: v for k, v in vars(a).items() if k.startswith("ov_") and v is not None}
    if a.resume:
        if a.preset or a.config:
            raise LlmlabError("--resume continues a run with its own config; drop --preset/--config")
        cfg = load_run_for_resume(a.resume)
        allowed = {"max_iters", "max_time", "checkpoint_every", "threads", "eval_interval", "log_interval"}
        bad = sorted(set(overrides) - allowed)
        if bad:
            raise LlmlabError(f"cannot change {', '.join(bad)} when resuming; only {', '.join(sorted(allowed))}")
        import dataclasses

        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))
        run = Path(a.resume)
    else:
        cfg = resolve_config(a.preset, a.config, overrides)
        run = Path(a.out) if a.out else Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if run.exists() and any(run.iterdir()):
            raise LlmlabError(f"{run} already exists and is not empty; resume it with --resume {run} or "
                              "choose another --out")
    progress = TrainProgress()
    with progress:
        result = train(cfg, run, resume=bool(a.resume), callback=progress)
    if int(os.environ.get("RANK", "0")) == 0:
        c = console()
        c.print(f"[bold]done[/] after {result.step} steps ({result.stopped_by}), {result.elapsed:.0f} s, "
                f"{result.tokens_per_s:,.0f} tokens/s; val loss {result.val_loss:.4f} "
                f"(best {result.best_val_loss:.4f})")
        for i, s in enumerate(result.samples):
            c.print(f"[bold]--- sample {i + 1} ---[/]")
            c.print(s, markup=False)
        arch = cfg.model.arch
        nxt = {"bert": f"llmlab attention \"...\" --model {run}"}.get(arch, f"llmlab generate {run} --prompt \"...\"")
        c.print(f"run folder: {run}  (next: {nxt})")
    return 0


class TrainProgress:
    """Renders trainer events as a rich progress bar (step, loss, tokens/s, ETA) on rank 0."""

    def __init__(self) -> None:
        self.progress = None
        self.task = None
        self.quiet = int(os.environ.get("RANK", "0")) != 0

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, event: str, info: dict) -> None:
        if self.quiet:
            return
        if event == "start":  # the bar starts only once training does, so early errors print cleanly
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
                                     console=console(stderr=True), transient=False)
            self.progress.__enter__()
            data = info.get("data", {})
            size = f", {data['train_tokens']:,} training tokens" if "train_tokens" in data else ""
            self.progress.console.print(f"run {info['run']} ({info['task']}): {info['params']:,} parameters{size}")
            self.task = self.progress.add_task("train", total=info["max_iters"], completed=info["step"], info="")
            return
        p = self.progress
        if p is None:
            return
        if event == "log":
            p.update(self.task, completed=info["step"],
                     info=f"loss {info['loss']:.4f}  {info['tokens_per_s']:,.0f} tok/s")
        elif event == "eval":
            extra = "  ".join(f"{k} {v:.4f}" for k, v in info.items() if k not in (
                "kind", "step", "train_loss", "val_loss", "elapsed", "best_val_loss") and isinstance(v, float))
            p.console.print(f"step {info['step']}: train {info['train_loss']:.4f}  val {info['val_loss']:.4f}"
                            + (f"  {extra}" if extra else ""))


# ----------------------------------------------------------------------------- generate


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="an llmlab run folder or a Hugging Face GPT-2 folder")
    p.add_argument("--prompt", action="append", help="a prompt; repeat for several (batched)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop before this string; repeatable")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    p.add_argument("--json", action="store_true", help="print the completions as JSON")
    p.add_argument("--beams", type=int, default=1, help="seq2seq runs: beam search with this many beams")
    p.add_argument("--length-penalty", type=float, default=0.6,
                   help="seq2seq beam search: GNMT length-penalty exponent (0 = none; default 0.6)")


@verb("generate", "generate text from a trained model", _generate_args)
def cmd_generate(a: argparse.Namespace) -> int:
    from .generate import GenerationConfig, generate_text
    from .interop import load

    model = load(a.run)
    if model.config.arch == "seq2seq":  # each --prompt is a source to transform
        from .seq2seq_train import cli_generate

        return cli_generate(model, a)
    if a.beams != 1:
        raise LlmlabError("--beams is for encoder-decoder (seq2seq) runs; sample or use --greedy with this model")
    prompts = a.prompt or ["\n"]
    cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=0.0 if a.greedy else a.temperature,
                           top_k=a.top_k, top_p=a.top_p, repetition_penalty=a.repetition_penalty,
                           stop=tuple(a.stop), seed=a.seed, use_cache=not a.no_cache)
    err = console(stderr=True)

    def warn(msg: str) -> None:
        err.print(f"[yellow]warning:[/] {msg}")

    stream = len(prompts) == 1 and not a.json
    if stream:
        sys.stdout.write(prompts[0])
        sys.stdout.flush()

    def on_text(i: int, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    outs = generate_text(model, prompts, cfg, on_text=on_text if stream else None, warn=warn)
    if stream:
        sys.stdout.write("\n")
    elif a.json:
        print(json.dumps([{"prompt": p, "completion": o} for p, o in zip(prompts, outs)]))
    else:
        for p, o in zip(prompts, outs):
            print(f"--- {p!r}\n{p}{o}")
    return 0


# ----------------------------------------------------------------------------- perplexity


def _perplexity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="an llmlab run folder or a Hugging Face GPT-2 folder")
    p.add_argument("--data", required=True, help="a text file, folder, glob or JSONL file")
    p.add_argument("--text-field", default="text")
    p.add_argument("--encoding-errors", default="strict", choices=["strict", "replace", "ignore"])
    p.add_argument("--json", action="store_true")


@verb("perplexity", "report loss and perplexity of a model on any text", _perplexity_args)
def cmd_perplexity(a: argparse.Namespace) -> int:
    from .data import load_corpus
    from .evaluate import perplexity
    from .interop import load

    model = load(a.run)
    docs = load_corpus(a.data, a.text_field, a.encoding_errors)
    r = perplexity(model, docs)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['tokens']:,} tokens: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.3f}")
    return 0


# ----------------------------------------------------------------------------- entry point


# verbs of the other feature areas register themselves from their own modules
EXTENSION_MODULES = ("llmlab.families_cli", "llmlab.security.privacy_cli", "llmlab.security.scan_cli",
                     "llmlab.serve_cli", "llmlab.security.report_cli")


def _load_extensions() -> None:
    import importlib

    for name in EXTENSION_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if not e.name or not (name == e.name or name.startswith(e.name + ".")):
                raise


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="llmlab", description="Build, train, look inside, attack and defend "
                                "transformer language models.")
    p.add_argument("--version", action="version", version=f"llmlab {__version__}")
    _load_extensions()
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    for name, (add_args, _run, help) in VERBS.items():
        sp = sub.add_parser(name, help=help, description=help)
        add_args(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; user errors print one line on stderr and return 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    a = parser.parse_args(argv)
    if not a.verb:
        parser.print_help()
        return 2
    try:
        return VERBS[a.verb][1](a)
    except LlmlabError as e:
        print(f"llmlab {a.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmlab {a.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
