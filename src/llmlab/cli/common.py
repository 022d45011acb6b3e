"""What every verb shares: the verb registry, the console, the one progress renderer, and the config
override flags (and the resume rules) of the verbs that train."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import math
import os
import textwrap
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llmlab.errors import LlmlabError

AddArgs = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]


@dataclass(frozen=True)
class Verb:
    """One `llmlab` verb: its name, one-line help, the function adding its arguments, and its run function."""

    name: str
    help: str
    add_args: AddArgs
    run: Run

    def __call__(self, a: argparse.Namespace) -> int:
        return self.run(a)


def verb(name: str, help: str, add_args: AddArgs) -> Callable[[Run], Verb]:
    """Make a run function a Verb; cli/__init__.py lists every verb explicitly."""

    def deco(fn: Run) -> Verb:
        return Verb(name, help, add_args, fn)

    return deco


def console(stderr: bool = False):  # noqa: ANN201
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _parse_head(spec: str, maps) -> tuple[int, int]:  # noqa: ANN001
    try:
        layer, h = (int(x) for x in spec.split("."))
    except ValueError:
        raise LlmlabError(f"--head {spec!r} is not LAYER.HEAD (for example 2.5)") from None
    if not (0 <= layer < maps.n_layers and 0 <= h < maps.n_heads):
        raise LlmlabError(f"--head {spec} is out of range: layers 0-{maps.n_layers - 1}, heads 0-{maps.n_heads - 1}")
    return layer, h


# ----------------------------------------------------------------------------- progress


@dataclass
class _Bar:
    """What the renderer knows about one stage (or the training run)."""

    total: int | None
    done: int = 0
    info: str = ""
    started: float = 0.0
    last_line: float = 0.0
    last_decile: int = 0
    task: Any = None  # the rich task id, when drawing bars


class ProgressRenderer:
    """Renders the events of llmlab.progress: training (start, log, eval, checkpoint, end), lab stages
    (stage_start, advance, stage_end) and messages.

    On a terminal it draws rich progress bars (one per stage; the training bar shows loss and tokens/s).
    Anywhere else (CI, `| tee`, nohup) it writes plain lines: a stage's start and end, and in between one
    line when another tenth of the work is done, but no more often than every `every` seconds (or every
    `heartbeat` seconds when the total is unknown or the work is slow). Evaluations and messages are always
    printed. Only rank 0 of a distributed run prints anything. Unknown events and fields are ignored."""

    TRAIN = "train"

    def __init__(self, out: Any = None, live: bool | None = None, every: float = 5.0, heartbeat: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.console = out if out is not None else console(stderr=True)
        self.live = self.console.is_terminal if live is None else live
        self.every, self.heartbeat, self.clock = every, heartbeat, clock
        self.quiet = int(os.environ.get("RANK", "0")) != 0
        self.bars: dict[str, _Bar] = {}
        self.progress: Any = None  # rich Progress, made at the first bar so early errors print cleanly

    def __enter__(self) -> ProgressRenderer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)
            self.progress = None

    # -- output

    def print(self, text: str) -> None:
        c = self.progress.console if self.progress is not None else self.console
        c.print(text, markup=False, highlight=False, soft_wrap=True)

    def _rich(self) -> Any:
        if self.progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console, transient=False)
            self.progress.__enter__()
        return self.progress

    def _open(self, name: str, total: int | None, done: int = 0) -> None:
        now = self.clock()
        bar = _Bar(total, done, started=now, last_line=now)
        bar.last_decile = self._decile(bar)
        if self.live:
            bar.task = self._rich().add_task(name, total=total, completed=done, info="")
        self.bars[name] = bar

    def _update(self, name: str, done: int, info: str = "") -> None:
        bar = self.bars.get(name)
        if bar is None:
            return
        bar.done, bar.info = done, info or bar.info
        if self.live:
            self.progress.update(bar.task, completed=done, info=bar.info)
            return
        now, decile = self.clock(), self._decile(bar)
        since = now - bar.last_line
        if decile >= 10 and name != self.TRAIN:
            return  # the stage's end line follows
        if (decile > bar.last_decile and since >= self.every) or since >= self.heartbeat:
            bar.last_line, bar.last_decile = now, decile
            self.print(f"{name}: {self._count(bar)}" + (f"  {bar.info}" if bar.info else ""))

    def _close(self, name: str, line: bool = True) -> None:
        bar = self.bars.pop(name, None)
        if bar is None:
            return
        if self.live:
            if bar.total is not None:
                self.progress.update(bar.task, completed=bar.total)
            self.progress.stop_task(bar.task)
        elif line:
            self.print(f"{name}: done, {bar.done:,}" + (f"/{bar.total:,}" if bar.total is not None else "")
                       + f" in {self.clock() - bar.started:.0f} s")

    @staticmethod
    def _decile(bar: _Bar) -> int:
        return math.floor(10 * bar.done / bar.total) if bar.total else 0

    @staticmethod
    def _count(bar: _Bar) -> str:
        if not bar.total:
            return f"{bar.done:,}"
        return f"{bar.done:,}/{bar.total:,} ({100 * bar.done / bar.total:.0f}%)"

    # -- events

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if self.quiet:
            return
        handler = getattr(self, f"on_{event}", None)
        if handler is not None:
            handler(info)

    def on_start(self, info: dict[str, Any]) -> None:
        data = info.get("data") or {}
        size = f", {data['train_tokens']:,} training tokens" if "train_tokens" in data else ""
        params = f": {info['params']:,} parameters" if "params" in info else ""
        self.print(f"run {info.get('run', '')} ({info.get('task', 'train')}){params}{size}")
        self._open(self.TRAIN, info.get("max_iters"), info.get("step", 0))

    def on_log(self, info: dict[str, Any]) -> None:
        text = f"loss {info['loss']:.4f}" if "loss" in info else ""
        if "tokens_per_s" in info:
            text += f"  {info['tokens_per_s']:,.0f} tok/s"
        self._update(self.TRAIN, info.get("step", 0), text)

    def on_eval(self, info: dict[str, Any]) -> None:
        known = ("kind", "step", "train_loss", "val_loss", "elapsed", "best_val_loss")
        extra = "  ".join(f"{k} {v:.4f}" for k, v in info.items() if k not in known and isinstance(v, float))
        self.print(f"step {info.get('step')}: train {info.get('train_loss', float('nan')):.4f}  "
                   f"val {info.get('val_loss', float('nan')):.4f}" + (f"  {extra}" if extra else ""))

    def on_checkpoint_eval(self, info: dict[str, Any]) -> None:
        figures = "  ".join(f"{k} {v:.4f}" for k, v in info.items()
                            if k not in ("kind", "step", "elapsed") and isinstance(v, float))
        self.print(f"checkpoint {info.get('step')}: {figures}")

    def on_end(self, info: dict[str, Any]) -> None:
        bar = self.bars.get(self.TRAIN)
        if bar is not None and "step" in info:
            bar.done = info["step"]
        self._close(self.TRAIN, line=False)  # the verb prints its own summary of the run

    def on_stage_start(self, info: dict[str, Any]) -> None:
        name, total = info["stage"], info.get("total")
        if not self.live:
            self.print(f"{name}: {total:,} to do" if total is not None else f"{name} ...")
        self._open(name, total)

    def on_advance(self, info: dict[str, Any]) -> None:
        bar = self.bars.get(info["stage"])
        if bar is not None:
            self._update(info["stage"], bar.done + info.get("n", 1))

    def on_stage_end(self, info: dict[str, Any]) -> None:
        self._close(info["stage"])

    def on_message(self, info: dict[str, Any]) -> None:
        self.print(("warning: " if info.get("level") == "warning" else "") + info["text"])

    def on_warning(self, info: dict[str, Any]) -> None:  # the older name of a message
        self.print(info["text"])


TrainProgress = ProgressRenderer  # the name the training verbs use


# ----------------------------------------------------------------------------- config overrides

# The --flags of `llmlab train` (and of other verbs that train) grouped by what they apply to. Fields of
# TrainConfig / ModelConfig that no group names land in "other settings", so every field gets a flag.
CONFIG_GROUPS: dict[str, tuple[str, ...]] = {
    "task and data": ("task", "data", "text_field", "encoding_errors", "val_fraction", "split", "split_seed",
                      "tokenizer", "vocab_size"),
    "model (every architecture)": (
        "arch", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "n_inner", "dropout", "bias", "norm",
        "norm_eps", "activation", "position", "rope_theta", "prenorm", "final_norm", "tie_embeddings",
        "pad_token_id"),
    "encoder and encoder-decoder model options (bert, seq2seq)": (
        "n_dec_layer", "scale_embeddings", "type_vocab_size", "n_classes", "mlm_head", "pooler"),
    "optimisation": ("batch_size", "grad_accum", "lr", "weight_decay", "beta1", "beta2", "grad_clip", "seed"),
    "schedule and stopping": ("max_iters", "max_time", "warmup_iters", "lr_decay_iters", "min_lr"),
    "evaluation, checkpoints and samples": (
        "eval_interval", "eval_iters", "log_interval", "checkpoint_every", "keep_checkpoints",
        "eval_every_checkpoint", "num_samples", "sample_tokens"),
    "precision and speed": ("dtype", "compile", "threads"),
    "encoder and encoder-decoder objectives (tasks mlm, classify, seq2seq)": (
        "mask_prob", "span_len", "label_smoothing", "base", "label_field", "max_len"),
}
OTHER_GROUP = "other settings"

# help for fields whose source line has no comment, or whose comment does not read as help
CONFIG_HELP: dict[str, str] = {
    "data": "a text file, folder, glob or JSONL file (default: the built-in Python language reference)",
    "text_field": "the JSONL field holding the text (default text)",
    "val_fraction": "share of the documents held out for validation",
    "max_iters": "optimizer steps to train for",
    "lr": "peak learning rate (AdamW)",
    "min_lr": "learning rate at the end of the cosine decay",
    "warmup_iters": "steps of linear learning-rate warmup",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "clip the gradient norm to this; 0 = off",
    "lr_decay_iters": "step where the cosine decay reaches min_lr; 0 = max_iters",
    "checkpoint_every": "steps between resumable checkpoints; 0 = only at the end",
    "tie_embeddings": "share the token embedding matrix with the output layer",
    "beta1": "AdamW beta1",
    "beta2": "AdamW beta2",
    "eval_interval": "steps between evaluations (and best-model saves)",
    "eval_iters": "batches per evaluation",
    "log_interval": "steps between loss lines",
    "seed": "random seed of initialisation and batches",
    "compile": "torch.compile the model",
    "keep_checkpoints": "checkpoints kept in the run folder",
    "num_samples": "samples generated at the end of training",
    "sample_tokens": "tokens per sample",
    "n_head": "attention heads (query heads)",
    "n_embd": "model width",
    "dropout": "dropout probability",
    "bias": "biases in linear layers and norms",
    "norm": "layernorm | rmsnorm",
    "norm_eps": "epsilon of the norms",
    "activation": "gelu | gelu_tanh | relu | swiglu",
    "position": "learned | rope | sinusoidal (bert: learned; seq2seq: learned or sinusoidal)",
    "pad_token_id": "id of the padding token",
}


def field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field line in a dataclass's source (empty where the source is not
    available)."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    out: dict[str, str] = {}
    for node in ast.parse(src).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            line = lines[node.end_lineno - 1][node.end_col_offset:]
            if line.lstrip().startswith("#"):
                out[node.target.id] = line.lstrip()[1:].strip()
    return out


def _field_type(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if t.startswith(name):
            return typ
    return str


def config_fields() -> list[dataclasses.Field]:
    """The fields `llmlab train` overrides: every TrainConfig field, then every ModelConfig field but the
    ones that come from elsewhere (vocab_size from the tokenizer)."""
    from llmlab.config import ModelConfig
    from llmlab.train.config import MODEL_CLI_SKIP, TrainConfig

    return [*dataclasses.fields(TrainConfig),
            *(f for f in dataclasses.fields(ModelConfig) if f.name not in MODEL_CLI_SKIP)]


def config_help() -> dict[str, str]:
    """Help text of every config field: CONFIG_HELP, else the comment on the field's line."""
    from llmlab.config import ModelConfig
    from llmlab.train.config import TrainConfig

    comments = {**field_comments(ModelConfig), **field_comments(TrainConfig)}
    return {**{k: v.replace("None = ", "unset = ") for k, v in comments.items()}, **CONFIG_HELP}


def add_config_overrides(parser: argparse.ArgumentParser, fields: Sequence[dataclasses.Field] | None = None,
                         groups: Mapping[str, Sequence[str]] | None = None, skip: Iterable[str] = (),
                         prefix: str = "ov_") -> list[str]:
    """Add a --flag for each config field (default: config_fields()), in argument groups by what they apply
    to (default CONFIG_GROUPS), with help from the config source. Values land in `prefix + name` and stay
    None unless given (read them with config_overrides). Booleans get --x / --no-x. Returns the names."""
    fields = [f for f in (config_fields() if fields is None else fields) if f.name not in set(skip)]
    groups = CONFIG_GROUPS if groups is None else groups
    helps = config_help()
    by_name = {f.name: f for f in fields}
    placed = {n for names in groups.values() for n in names}
    layout = [(title, [n for n in names if n in by_name]) for title, names in groups.items()]
    layout.append((OTHER_GROUP, [f.name for f in fields if f.name not in placed]))
    for title, names in layout:
        if not names:
            continue
        g = parser.add_argument_group(title)
        for name in names:
            f = by_name[name]
            typ = _field_type(f)
            flag = "--" + name.replace("_", "-")
            text = helps.get(name, "").replace("%", "%%") or None
            if typ is bool:
                g.add_argument(flag, dest=prefix + name, action=argparse.BooleanOptionalAction, default=None,
                               help=text)
            else:
                g.add_argument(flag, dest=prefix + name, type=typ, default=None, metavar=typ.__name__.upper(),
                               help=text)
    return [n for _, names in layout for n in names]


def config_overrides(a: argparse.Namespace, prefix: str = "ov_") -> dict[str, Any]:
    """The config fields given on the command line (the flags of add_config_overrides), by field name."""
    return {k[len(prefix):]: v for k, v in vars(a).items() if k.startswith(prefix) and v is not None}


# what a resumed run may change: how long it trains, how often it evaluates, logs and checkpoints, and the
# threads it uses. Anything else would change the model or the data under a checkpoint.
RESUME_ALLOWED = ("max_iters", "max_time", "eval_interval", "log_interval", "checkpoint_every", "threads")


def _flags(names: Iterable[str]) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def resume_overrides(cfg: Any, overrides: Mapping[str, Any], allowed: Sequence[str] = RESUME_ALLOWED) -> Any:
    """The run config `cfg` (a RunConfig loaded for resuming) with `overrides` (field name -> value; None
    = not given) applied to its training config; any other field is refused with one message naming the
    flags that can change."""
    given = {k: v for k, v in overrides.items() if v is not None}
    bad = sorted(k for k in given if k not in allowed)
    if bad:
        raise LlmlabError(f"cannot change {_flags(bad)} when resuming: the checkpoint continues the run's own "
                          f"settings; only {_flags(allowed)} can change")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **given))


def number_list(spec: str, flag: str, kind: type = int, example: str = "0,1,2") -> tuple[Any, ...]:
    """'1,4,16' -> (1, 4, 16) for a flag taking a comma-separated list of numbers; bad or empty -> one clear error."""
    what = "integers" if kind is int else "numbers"
    try:
        vals = tuple(kind(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise LlmlabError(f"{flag} {spec!r} is not a comma-separated list of {what}, e.g. {example}") from None
    if not vals:
        raise LlmlabError(f"{flag} is empty; give {what} such as {example}")
    return vals


def name_list(spec: str | None, flag: str = "", allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """'a, b' -> ('a', 'b'); with `allowed`, an unknown or empty list is one clear error naming the choices."""
    vals = tuple(x.strip() for x in (spec or "").split(",") if x.strip())
    if allowed is not None and (not vals or any(v not in allowed for v in vals)):
        raise LlmlabError(f"{flag} {spec!r}: use a comma-separated list of {', '.join(allowed)}")
    return vals


def set_pairs(items: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE pairs (values parsed as JSON when they can be, else strings)."""
    out: dict[str, Any] = {}
    for it in items:
        if "=" not in it:
            raise LlmlabError(f"--set {it!r} is not KEY=VALUE (e.g. --set n_layer=2)")
        k, v = it.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out
