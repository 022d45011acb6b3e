"""The one progress protocol. Long-running library calls (training, the privacy experiments, the scan) never
print: they report what they are doing by calling `progress(event, info)` with one of the events below, and
the command line renders them (llmlab.cli.common.ProgressRenderer: rich bars on a terminal, a few plain
lines otherwise). Any callable with that signature works from Python; `quiet` ignores everything.

Training (emitted by llmlab.train.loop.train and llmlab.security.privacy.dp.train_dp; rank 0 only):

    start       {run, step, max_iters, task, params, data?, config?}   step > 0 when resuming; data holds
                                                                       train_tokens, train_docs, ...
    log         {step, max_iters, loss, lr, tokens_per_s, elapsed}     every log_interval steps
    eval        {step, train_loss, val_loss, best_val_loss, elapsed,   every eval_interval steps and at
                 <metric>: float ...}                                  the end (e.g. accuracy, epsilon)
    checkpoint  {step}                                                 a resumable checkpoint was written
    end         {run, step, val_loss, best_val_loss, elapsed,          the TrainResult's fields
                 tokens_per_s, stopped_by, ...}

Labs (privacy experiments, the scan), through `Stage`:

    stage_start {stage, total}      a named piece of work begins; total = units of work, or None if unknown
    advance     {stage, n}          n more units of that stage are done
    stage_end   {stage}             the stage is over (also when it fails)

Either:

    message     {text, level}       one line for the user; level "info" or "warning"

A renderer ignores events and fields it does not know, so new fields can be added freely."""

from __future__ import annotations

from typing import Any, Protocol

TRAIN_EVENTS = ("start", "log", "eval", "checkpoint", "end")
STAGE_EVENTS = ("stage_start", "advance", "stage_end")
EVENTS = (*TRAIN_EVENTS, *STAGE_EVENTS, "message")


class Progress(Protocol):
    """Anything called as progress(event, info) with an event of EVENTS and its fields in info."""

    def __call__(self, event: str, info: dict[str, Any], /) -> None: ...


def quiet(event: str, info: dict[str, Any]) -> None:
    """A progress callback that ignores everything."""


class Stage:
    """A named stage of a lab, reported through a progress callback:

        with Stage(progress, "score documents", len(docs)) as st:
            for d in docs:
                ...
                st.advance()
    """

    def __init__(self, progress: Progress | None, name: str, total: int | None):
        self.cb, self.name, self.total = progress or quiet, name, total

    def __enter__(self) -> Stage:
        self.cb("stage_start", {"stage": self.name, "total": self.total})
        return self

    def advance(self, n: int = 1) -> None:
        self.cb("advance", {"stage": self.name, "n": n})

    def __exit__(self, *exc: object) -> None:
        self.cb("stage_end", {"stage": self.name})


def message(progress: Progress | None, text: str, level: str = "info") -> None:
    """Send one line for the user through a progress callback (level "info" or "warning")."""
    (progress or quiet)("message", {"text": text, "level": level})
