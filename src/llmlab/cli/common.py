"""What every verb shares: the verb registry, the console, the progress renderer."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

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
