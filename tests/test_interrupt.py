"""Interrupted training is never lost: SIGINT and SIGTERM (real signals) make every objective write a
resumable checkpoint and stop with TrainingInterrupted; `llmlab train` prints one line naming the command
that continues and exits 130 / 143; every message about a stopped run names one command that works."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmlab.cli import main
from llmlab.datasets import reverse_words, write_dataset
from llmlab.train import loop
from llmlab.train.chat import AssistantObjective
from llmlab.train.classify import make_finetune_config
from llmlab.train.config import resolve_config
from llmlab.train.loop import TrainingInterrupted, last_checkpoint, train

WORDS = "the a cat dog sat ran on in park mat bird song red blue one two".split()
SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8",
         "--eval-iters", "2", "--threads", "1", "--num-samples", "1", "--sample-tokens", "5"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("interrupt") / "corpus.txt"
    p.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) + ".\n" for _ in range(800)))
    return p


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1"}


def _train_rows(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip() and line.endswith("}")]


def _signal_after_progress(out: Path, corpus: Path, sig: int) -> tuple[subprocess.CompletedProcess, int]:
    """Start a long `llmlab train` run, wait until metrics.jsonl shows steps, send sig; return (result, step)."""
    cmd = [sys.executable, "-m", "llmlab", "train", "--data", str(corpus), *SMALL, "--max-iters", "100000",
           "--eval-interval", "1000", "--log-interval", "5", "--out", str(out)]
    p = subprocess.Popen(cmd, env=_env(), cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        if len([r for r in _train_rows(out) if r["kind"] == "train"]) >= 2:
            break
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()[1][-2000:]
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    ckpt = last_checkpoint(out)
    assert ckpt is not None, stderr[-2000:]
    step = json.loads((ckpt / "state.json").read_text())["step"]
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr), step


def _one_line_naming(stderr: str, command: str) -> str:
    lines = [line for line in stderr.splitlines() if command in line]
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[0]


def test_sigint_checkpoints_prints_resume_command_and_resumes(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    res, step = _signal_after_progress(out, corpus, signal.SIGINT)
    assert res.returncode == 130
    line = _one_line_naming(res.stderr, f"llmlab train --resume {out}")
    assert line.startswith("llmlab train: stopped by SIGINT") and f"step {step}" in line
    assert step >= 10 and max(r["step"] for r in _train_rows(out)) <= step
    assert (out / "model.safetensors").is_file()  # usable as it is (generate, measure)
    logged = [r["step"] for r in _train_rows(out) if r["kind"] == "train"]
    # the one command named continues from that step
    more = subprocess.run([sys.executable, "-m", "llmlab", "train", "--resume", str(out), "--max-iters",
                           str(step + 7)], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert more.returncode == 0, more.stderr[-2000:]
    assert f"done after {step + 7} steps" in more.stdout
    rows = [r["step"] for r in _train_rows(out) if r["kind"] == "train"]
    assert rows[:len(logged)] == logged and rows == sorted(set(rows)) and rows[-1] == step + 7
    assert json.loads((last_checkpoint(out) / "state.json").read_text())["step"] == step + 7


def test_sigterm_checkpoints_and_exits_143(tmp_path: Path, corpus: Path) -> None:
    out = tmp_path / "run"
    res, step = _signal_after_progress(out, corpus, signal.SIGTERM)
    assert res.returncode == 143
    line = _one_line_naming(res.stderr, f"llmlab train --resume {out}")
    assert "SIGTERM" in line and f"step {step}" in line
    state = json.loads((last_checkpoint(out) / "state.json").read_text())
    assert state["step"] == step and not state["final"]


# ----------------------------------------------------------------------------- every objective, in process


def _kill_at(step: int, sig: int):  # noqa: ANN202
    def cb(event: str, info: dict) -> None:
        if event == "log" and info["step"] == step:
            os.kill(os.getpid(), sig)  # a real signal, handled like one from outside
    return cb


@pytest.fixture(scope="module")
def encoder_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("enc") / "bert"
    train(resolve_config(overrides=dict(arch="bert", n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=8,
                                        max_iters=4, eval_iters=1, num_samples=0, threads=1, data=str(corpus))), run)
    return run


def _objective_config(task: str, tmp: Path, corpus: Path, encoder: Path | None, max_iters: int):  # noqa: ANN202
    common = dict(max_iters=max_iters, log_interval=1, eval_interval=1000, eval_iters=1, num_samples=0, threads=1,
                  batch_size=8)
    small = dict(n_layer=1, n_head=2, n_embd=32)
    if task == "lm":
        return resolve_config(overrides={**common, **small, "block_size": 32, "data": str(corpus)})
    if task == "mlm":
        return resolve_config(overrides={**common, **small, "arch": "bert", "block_size": 16, "data": str(corpus)})
    if task == "seq2seq":
        data = tmp / "rev.jsonl"
        if not data.is_file():
            write_dataset(reverse_words(200, seed=0, min_len=2, max_len=3, vocab=5), data)
        return resolve_config(overrides={**common, **small, "arch": "seq2seq", "n_dec_layer": 1, "block_size": 24,
                                         "data": str(data)})
    if task == "assistant":
        return resolve_config("tiny", None, {**common, **small, "task": "assistant"})
    data = tmp / "labels.csv"
    rng = random.Random(1)
    data.write_text("text,label\n" + "".join(f"{rng.choice('abc') * 5},{k}\n" for k in ("x", "y") * 30))
    return make_finetune_config(str(encoder), str(data), {**common})


@pytest.mark.parametrize("task,sig", [("lm", signal.SIGTERM), ("mlm", signal.SIGINT), ("seq2seq", signal.SIGTERM),
                                      ("assistant", signal.SIGINT), ("classify", signal.SIGINT)])
def test_every_objective_checkpoints_on_a_signal_and_resumes(task: str, sig: int, tmp_path: Path, corpus: Path,
                                                             encoder_run: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(AssistantObjective, "n_train", 200)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    run = tmp_path / task
    cfg = _objective_config(task, tmp_path, corpus, encoder_run, max_iters=1000)
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, run, callback=_kill_at(3, sig))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers restored
    err = e.value
    assert err.signum == sig and err.exit_code == 128 + sig and err.step == 3 and err.saved
    verb = "llmlab finetune classify" if task == "classify" else "llmlab train"
    assert err.command == f"{verb} --resume {run}" and err.command in str(err)
    assert last_checkpoint(run).name == "step-0000003"
    # resuming continues from step 3 to the new end, with the run's own config
    cfg = loop.load_run_for_resume(run)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=5))
    res = train(cfg, run, resume=True)
    assert res.step == 5
    steps = [r["step"] for r in _train_rows(run) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_after_a_signal_is_bit_identical(tmp_path: Path, corpus: Path) -> None:
    cfg = _objective_config("lm", tmp_path, corpus, None, max_iters=8)
    train(cfg, tmp_path / "straight")
    with pytest.raises(TrainingInterrupted):
        train(cfg, tmp_path / "stopped", callback=_kill_at(3, signal.SIGINT))
    train(cfg, tmp_path / "stopped", resume=True)
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000008" / "model.safetensors"))
    b = load_file(str(tmp_path / "stopped" / "checkpoints" / "step-0000008" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_safety_checkpoint_without_checkpoint_every(tmp_path: Path, corpus: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A run with checkpoint_every = 0 still checkpoints every SAFETY_CHECKPOINT_S seconds (a SIGKILL cannot
    be caught), and the step-0 checkpoint it starts with makes even a run killed at once resumable."""
    monkeypatch.setattr(loop, "SAFETY_CHECKPOINT_S", 0.0)
    events: list[int] = []
    cfg = _objective_config("lm", tmp_path, corpus, None, max_iters=4)
    train(cfg, tmp_path / "r", callback=lambda e, i: events.append(i["step"]) if e == "checkpoint" else None)
    assert events == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == ["step-0000003", "step-0000004"]


# ----------------------------------------------------------------------------- messages name one command that works


def _stopped_run(tmp: Path, corpus: Path) -> Path:
    run = tmp / "stopped"
    with pytest.raises(TrainingInterrupted):
        train(_objective_config("lm", tmp, corpus, None, max_iters=100), run, callback=_kill_at(2, signal.SIGINT))
    return run


def test_messages_about_a_stopped_run_do_not_go_in_a_circle(tmp_path: Path, corpus: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = _stopped_run(tmp_path, corpus)
    # a new run into its folder names the resume command ...
    assert main(["train", "--data", str(corpus), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"`llmlab train --resume {run}`" in err
    # ... which works
    assert main(["train", "--resume", str(run), "--max-iters", "4"]) == 0
    capsys.readouterr()
    # without checkpoints (a SIGKILL before the first one, or deleted): no "resume it", but how to start over
    import shutil

    shutil.rmtree(run / "checkpoints")
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "no checkpoint" in err and f"rm -r {run}" in err
    assert main(["train", "--data", str(corpus), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--resume" not in err and f"rm -r {run}" in err and "another --out" in err


def test_interrupted_cli_run_prints_one_line_and_exit_code(tmp_path: Path, corpus: Path,
                                                           capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: the verb turns TrainingInterrupted into one line on stderr and 128 + the signal."""
    from llmlab.cli import train as train_cli

    real = train_cli.train

    def stopping(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        cb = kw["callback"]

        def both(event: str, info: dict) -> None:
            cb(event, info)
            _kill_at(2, signal.SIGTERM)(event, info)
        return real(*a, **{**kw, "callback": both})

    monkeypatch.setattr(train_cli, "train", stopping)
    out = tmp_path / "cli"
    rc = main(["train", "--data", str(corpus), *SMALL, "--max-iters", "50", "--log-interval", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 143
    line = _one_line_naming(err, f"llmlab train --resume {out}")
    assert line.startswith("llmlab train: stopped by SIGTERM at step 2")


def test_a_signal_before_training_starts_or_while_it_finishes(tmp_path: Path, corpus: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from llmlab.train.lm import LMObjective

    cfg = _objective_config("lm", tmp_path, corpus, None, max_iters=3)
    # while the data is read, before anything is written: nothing to save, nothing written
    setup = LMObjective.setup

    def stopped_setup(self, run, resume):  # noqa: ANN001, ANN202
        os.kill(os.getpid(), signal.SIGINT)
        return setup(self, run, resume)

    monkeypatch.setattr(LMObjective, "setup", stopped_setup)
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, tmp_path / "early")
    assert not e.value.saved and e.value.command is None and not (tmp_path / "early").exists()
    monkeypatch.setattr(LMObjective, "setup", setup)
    # while the final checkpoint is written: it is kept, the end-of-run files are not written, resume finishes
    run = tmp_path / "late"

    def at_final(event: str, info: dict) -> None:
        if event == "checkpoint" and info["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as e:
        train(cfg, run, callback=at_final)
    assert e.value.saved and e.value.step == 3 and e.value.exit_code == 143
    assert json.loads((last_checkpoint(run) / "state.json").read_text())["final"] and not loop.run_finished(run)
    assert train(cfg, run, resume=True).step == 3 and loop.run_finished(run)
