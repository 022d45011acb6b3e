"""The one progress protocol (llmlab.progress) and its one renderer (llmlab.cli.common.ProgressRenderer):
what training, the privacy lab and the scan emit, and what the renderer prints on a terminal and off one."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from llmlab.cli.common import ProgressRenderer
from llmlab.progress import STAGE_EVENTS, TRAIN_EVENTS, Stage, message


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        self.events.append((event, dict(info)))

    def names(self) -> list[str]:
        return [e for e, _ in self.events]


def _plain(**kw: Any) -> tuple[ProgressRenderer, io.StringIO, Clock]:
    buf, clock = io.StringIO(), Clock()
    r = ProgressRenderer(Console(file=buf, width=200), clock=clock, **kw)
    assert not r.live  # not a terminal: plain lines
    return r, buf, clock


def _lines(buf: io.StringIO) -> list[str]:
    return [ln for ln in buf.getvalue().splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- the protocol


def test_stage_reports_start_advance_and_end_even_on_error() -> None:
    rec = Recorder()
    with Stage(rec, "score", 3) as st:
        st.advance()
        st.advance(2)
    assert rec.events == [("stage_start", {"stage": "score", "total": 3}), ("advance", {"stage": "score", "n": 1}),
                          ("advance", {"stage": "score", "n": 2}), ("stage_end", {"stage": "score"})]
    rec = Recorder()
    with pytest.raises(ValueError), Stage(rec, "fails", None):
        raise ValueError
    assert rec.names() == ["stage_start", "stage_end"]
    with Stage(None, "nobody listens", 1) as st:  # no callback: nothing happens
        st.advance()
    message(rec, "hello", "warning")
    assert rec.events[-1] == ("message", {"text": "hello", "level": "warning"})


def test_training_emits_the_documented_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmlab.train.config import resolve_config
    from llmlab.train.loop import train

    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "c.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 80)
    cfg = resolve_config("tiny", None, dict(data=str(data), n_layer=1, n_head=2, n_embd=16, block_size=16,
                                            batch_size=4, max_iters=4, log_interval=2, eval_interval=2,
                                            eval_iters=1, checkpoint_every=2, num_samples=0, threads=1))
    rec = Recorder()
    train(cfg, tmp_path / "run", callback=rec)
    names = rec.names()
    assert set(names) <= set(TRAIN_EVENTS) and names[0] == "start" and names[-1] == "end"
    assert {"log", "eval", "checkpoint"} <= set(names)
    fields = {"start": {"run", "step", "max_iters", "task", "params"},
              "log": {"step", "max_iters", "loss", "lr", "tokens_per_s", "elapsed"},
              "eval": {"step", "train_loss", "val_loss", "best_val_loss", "elapsed"},
              "checkpoint": {"step"}, "end": {"run", "step", "val_loss", "best_val_loss", "elapsed", "tokens_per_s",
                                              "stopped_by"}}
    for event, info in rec.events:
        assert fields[event] <= set(info), (event, sorted(info))


def test_privacy_lab_emits_stage_events() -> None:
    from llmlab.security.privacy.dedup import dedup_docs

    rec = Recorder()
    dedup_docs(["a line that repeats\nfirst", "a line that repeats\nsecond", "other"], callback=rec)
    assert set(rec.names()) <= set(STAGE_EVENTS) and rec.names()[0] == "stage_start"
    assert rec.events[0][1] == {"stage": "dedup", "total": 6} and rec.names()[-1] == "stage_end"
    assert sum(i["n"] for e, i in rec.events if e == "advance") == 6


class EchoTarget:
    name = "echo"

    def chat_many(self, requests: list[tuple[str | None, str]], max_tokens: int, temperature: float,
                  seed: int) -> list[str]:
        return [user[:20] for _, user in requests]


def test_scan_emits_the_same_stage_events() -> None:
    from llmlab.security.scan.probes import load_probes
    from llmlab.security.scan.scanner import ScanConfig, run_scan

    probes = load_probes([])[:5]
    rec = Recorder()
    run_scan(EchoTarget(), probes, ScanConfig(defences=("delimit", "filter"), bootstrap=10), progress=rec)
    assert rec.events[0] == ("stage_start", {"stage": "attempts", "total": 15})
    assert [i["n"] for e, i in rec.events if e == "advance"] == [5, 5, 5]
    assert rec.events[-1] == ("stage_end", {"stage": "attempts"})
    run_scan(EchoTarget(), probes, ScanConfig(defences=(), bootstrap=10))  # no progress callback: fine


# ----------------------------------------------------------------------------- the renderer, not a terminal


def test_plain_lines_at_most_every_few_seconds_and_each_tenth() -> None:
    r, buf, clock = _plain(every=5.0, heartbeat=60.0)
    with r:
        r("stage_start", {"stage": "score", "total": 80})
        for _ in range(80):  # fast: 80 units in 10 s
            clock.t += 0.125
            r("advance", {"stage": "score", "n": 1})
        r("stage_end", {"stage": "score"})
    # a line at the first tenth crossed 5 s after the last line; 100% is left to the end line
    assert _lines(buf) == ["score: 80 to do", "score: 40/80 (50%)", "score: done, 80/80 in 10 s"]


def test_plain_lines_each_tenth_when_slow_and_heartbeat_without_total() -> None:
    r, buf, clock = _plain(every=5.0, heartbeat=60.0)
    r("stage_start", {"stage": "slow", "total": 20})
    for _ in range(20):  # slow: 10 s per unit
        clock.t += 10
        r("advance", {"stage": "slow", "n": 1})
    r("stage_end", {"stage": "slow"})
    lines = _lines(buf)
    assert [ln for ln in lines if "%" in ln] == [f"slow: {k}/20 ({k * 5}%)" for k in range(2, 20, 2)]
    buf.truncate(0), buf.seek(0)
    r("stage_start", {"stage": "open", "total": None})
    for _ in range(30):
        clock.t += 5
        r("advance", {"stage": "open", "n": 2})
    r("stage_end", {"stage": "open"})
    lines = _lines(buf)
    assert lines[0] == "open ..." and lines[-1] == "open: done, 60 in 150 s"
    assert lines[1:-1] == ["open: 24", "open: 48"]  # a heartbeat line every 60 s


def test_plain_training_lines() -> None:
    r, buf, clock = _plain(every=5.0)
    r("start", {"run": "runs/x", "step": 0, "max_iters": 100, "task": "lm", "params": 12345,
                "data": {"train_tokens": 5000}})
    for step in range(10, 101, 10):
        clock.t += 10
        r("log", {"step": step, "max_iters": 100, "loss": 2.0 - step / 100, "lr": 1e-3, "tokens_per_s": 1234.5,
                  "elapsed": clock.t})
        if step % 50 == 0:
            r("eval", {"kind": "eval", "step": step, "train_loss": 1.5, "val_loss": 1.6, "best_val_loss": 1.6,
                       "elapsed": clock.t, "epsilon": 3.25, "note": "not a number"})
    r("checkpoint", {"step": 100})
    r("end", {"run": "runs/x", "step": 100, "val_loss": 1.6, "best_val_loss": 1.6, "elapsed": 100.0,
              "tokens_per_s": 1234.5, "stopped_by": "max_iters"})
    lines = _lines(buf)
    assert lines[0] == "run runs/x (lm): 12,345 parameters, 5,000 training tokens"
    assert "train: 10/100 (10%)  loss 1.9000  1,234 tok/s" in lines
    assert "step 50: train 1.5000  val 1.6000  epsilon 3.2500" in lines
    assert len([ln for ln in lines if ln.startswith("train:")]) == 10  # one per tenth, 100% included
    assert lines[-1].startswith("step 100:")  # no line of its own for the end: the verb sums the run up


def test_messages_unknown_events_and_other_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    r, buf, _ = _plain()
    r("message", {"text": "[bold]not markup[/]", "level": "info"})
    r("message", {"text": "careful", "level": "warning"})
    r("warning", {"text": "baseline: membership inference"})  # the older name of a message
    r("future_event", {"anything": 1})
    r("advance", {"stage": "never started", "n": 1})
    r("stage_end", {"stage": "never started"})
    assert _lines(buf) == ["[bold]not markup[/]", "warning: careful", "baseline: membership inference"]
    monkeypatch.setenv("RANK", "1")
    r, buf, _ = _plain()
    r("start", {"run": "x", "step": 0, "max_iters": 10, "task": "lm", "params": 1})
    r("message", {"text": "hi", "level": "info"})
    assert buf.getvalue() == ""


def test_lines_are_not_wrapped_for_logs() -> None:
    buf = io.StringIO()
    r = ProgressRenderer(Console(file=buf, width=40))
    r("message", {"text": "x" * 100, "level": "info"})
    assert _lines(buf) == ["x" * 100]


# ----------------------------------------------------------------------------- the renderer, on a terminal


def test_terminal_gets_rich_bars() -> None:
    buf = io.StringIO()
    term = Console(file=buf, force_terminal=True, width=120)
    with ProgressRenderer(term) as r:
        assert r.live and r.progress is None  # the bars start with the first stage
        r("stage_start", {"stage": "score documents", "total": 4})
        r("advance", {"stage": "score documents", "n": 4})
        r("stage_end", {"stage": "score documents"})
        r("start", {"run": "runs/x", "step": 0, "max_iters": 8, "task": "lm", "params": 10})
        r("log", {"step": 8, "max_iters": 8, "loss": 1.25, "lr": 1e-3, "tokens_per_s": 99.0, "elapsed": 1.0})
        r("end", {"run": "runs/x", "step": 8})
        tasks = {t.description: t for t in r.progress.tasks}
    assert tasks["score documents"].completed == 4 and tasks["train"].completed == 8
    out = buf.getvalue()
    assert "score documents" in out and "loss 1.2500" in out and "\x1b[" in out
    assert "to do" not in out  # the plain start line is only for logs


def test_cli_renders_scan_progress_plainly_off_a_terminal(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`llmlab scan` used to print one bare line per defence; now it is the shared renderer's lines."""
    import torch

    from llmlab.chat import render_chat
    from llmlab.checkpoint import save_run_model
    from llmlab.cli import main
    from llmlab.config import ModelConfig
    from llmlab.models import build_model
    from llmlab.train.chat import chat_tokenizer, make_dataset

    tok = chat_tokenizer([render_chat(r["messages"], False) for r in make_dataset(40, 0)])
    torch.manual_seed(0)
    save_run_model(tmp_path / "run", build_model(ModelConfig(arch="gpt", vocab_size=tok.vocab_size, block_size=512,
                                                             n_layer=1, n_head=2, n_embd=16,
                                                             pad_token_id=tok.pad_id)), tok)
    rc = main(["scan", str(tmp_path / "run"), "--probes", "direct_injection", "--defences", "filter",
               "--max-tokens", "2", "--bootstrap", "10", "--out", str(tmp_path / "scan")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "attempts: " in err and "attempts: done" in err
    assert json.loads((tmp_path / "scan" / "report.json").read_text())["experiment"] == "scan"
