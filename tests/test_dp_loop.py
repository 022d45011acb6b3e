"""DP-SGD through the one training loop: the standard run folder, epsilon on the evaluation rows, the
accountant saved in checkpoints so that a run stopped (SIGINT, SIGKILL) and resumed spends exactly the
epsilon of one never stopped, and the canary experiment continued after an interruption."""

from __future__ import annotations

import dataclasses
import json
import math
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

import llmlab
from llmlab.checkpoint import FORMAT_VERSION, sha256_file
from llmlab.cli import main
from llmlab.security.privacy.canary import CanaryConfig, resume_canary_experiment, run_canary_experiment
from llmlab.security.privacy.common import PrivacyError
from llmlab.security.privacy.dp import DPConfig, train_dp
from llmlab.train.config import resolve_config
from llmlab.train.loop import TrainingInterrupted, last_checkpoint, load_run_for_resume

TRAIN = dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=16, eval_interval=4, eval_iters=2,
             log_interval=1, num_samples=0, threads=1, lr=3e-3, warmup_iters=2)
DP = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0)


WORDS = ("the a one two red blue cat dog runs sits on under big small house tree river stone light dark "
         "green old new fast slow bird fish sun moon rain wind day night warm cold near far up down").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    docs = ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 8))) for _ in range(20)) + "\n"
            for _ in range(30)]
    path = tmp_path_factory.mktemp("dp") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _cfg(corpus: Path, **kw):  # noqa: ANN003, ANN202
    return resolve_config("tiny", None, {**TRAIN, "data": str(corpus), **kw})


@pytest.fixture(scope="module")
def straight(corpus: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """An uninterrupted DP run of 10 steps."""
    run = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        return train_dp(_cfg(corpus, max_iters=10), run, DP)


def _kill_at(step: int, sig: int = signal.SIGINT):  # noqa: ANN202
    def cb(event: str, info: dict) -> None:
        if event == "log" and info["step"] == step:
            os.kill(os.getpid(), sig)
    return cb


def test_dp_run_writes_the_standard_run_folder(straight) -> None:  # noqa: ANN001
    run = straight.run
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["llmlab"] == {"format_version": FORMAT_VERSION, "kind": "run"}
    assert {"preset", "model", "train", "data", "dp"} <= set(cfg)
    assert cfg["train"]["dtype"] == "float32" and cfg["model"]["dropout"] == 0.0
    dp = cfg["dp"]
    assert dp["epsilon"] == pytest.approx(straight.epsilon) and dp["steps"] == 10 and dp["noise_multiplier"] == 1.0
    assert dp["examples"] == straight.examples and dp["sample_rate"] == straight.sample_rate
    for f in ("model.safetensors", "manifest.json", "metrics.jsonl", "loss.png", "tokenizer", "samples.txt"):
        assert (run / f).exists(), f
    manifest = json.loads((run / "manifest.json").read_text())["sha256"]
    assert manifest == {n: sha256_file(run / n) for n in ("model.safetensors", "config.json")}
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 11))
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8, 10] and all(0 < r["epsilon"] for r in evals)
    assert evals[0]["epsilon"] < evals[1]["epsilon"] < evals[2]["epsilon"] == pytest.approx(straight.epsilon)
    state = json.loads((last_checkpoint(run) / "state.json").read_text())
    assert state["step"] == 10 and state["hooks"]["accountant"]["mechanism"] == "rdp"
    model = llmlab.load(run)
    ids = torch.tensor([model.tokenizer.encode("the cat")])
    assert model(ids).shape[:2] == ids.shape


def test_epsilon_is_opacus_accounting_of_every_step(straight) -> None:  # noqa: ANN001
    """The same figure as before the loop took DP over: the RDP accountant over max_iters steps at Opacus'
    sample rate 1 / ceil(N / B), the noise multiplier as given."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = [(1.0, 1 / math.ceil(straight.examples / 16), 10)]
    assert straight.epsilon == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert straight.sample_rate == pytest.approx(16 / straight.examples)


def test_target_epsilon_resolves_the_noise_once(corpus: Path, tmp_path: Path) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    res = train_dp(_cfg(corpus, max_iters=4), tmp_path / "t", DPConfig(target_epsilon=3.0))
    want = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=res.sample_rate, steps=4,
                                accountant="rdp")
    assert res.noise_multiplier == pytest.approx(want)
    cfg = load_run_for_resume(tmp_path / "t")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_iters=6))
    more = train_dp(cfg, tmp_path / "t", resume=True)  # two more steps at the same noise
    assert more.noise_multiplier == res.noise_multiplier and more.epsilon > res.epsilon


def test_interrupted_dp_run_resumes_with_the_same_epsilon(straight, corpus: Path, tmp_path: Path) -> None:  # noqa: ANN001
    run = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted) as e:
        train_dp(_cfg(corpus, max_iters=10), run, DP, callback=_kill_at(6))
    assert e.value.step == 6 and e.value.command == f"llmlab train --resume {run}"
    part = json.loads((run / "config.json").read_text())["dp"]
    assert part["steps"] == 6 and 0 < part["epsilon"] < straight.epsilon
    res = train_dp(load_run_for_resume(run), run, resume=True)
    assert res.epsilon == straight.epsilon and res.step == 10  # the accountant's history came back
    a = load_file(str(straight.run / "checkpoints" / "step-0000010" / "model.safetensors"))
    b = load_file(str(run / "checkpoints" / "step-0000010" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # same Poisson batches, same noise
    hist = [json.loads((r / "checkpoints" / "step-0000010" / "state.json").read_text())["hooks"]
            for r in (straight.run, run)]
    assert hist[0] == hist[1]


def test_dp_run_killed_with_sigkill_resumes_through_llmlab_train(straight, corpus: Path, tmp_path: Path,  # noqa: ANN001
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "killed"
    overrides = dict(TRAIN, data=str(corpus), max_iters=100000, checkpoint_every=2)
    code = ("from llmlab.train.config import resolve_config\n"
            "from llmlab.security.privacy.dp import DPConfig, train_dp\n"
            f"cfg = resolve_config('tiny', None, {overrides!r})\n"
            f"train_dp(cfg, {str(run)!r}, DPConfig(noise_multiplier=1.0, max_grad_norm=1.0))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and p.poll() is None:
        ckpt = last_checkpoint(run)
        if ckpt is not None and int(ckpt.name.split("-")[1]) >= 4:
            break
        time.sleep(0.01)
    assert p.poll() is None, p.communicate()[1][-2000:]
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    # the kill came after step 4's checkpoint; set max_iters to 10 and continue with the one command
    rc = main(["train", "--resume", str(run), "--max-iters", "10", "--checkpoint-every", "0"])
    out = capsys.readouterr().out
    assert rc == 0 and "done after 10 steps" in out and "epsilon" in out
    dp = json.loads((run / "config.json").read_text())["dp"]
    assert dp["epsilon"] == straight.epsilon and dp["steps"] == 10


def test_dp_settings_are_checked_before_anything_is_written(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(PrivacyError, match="grad-accum"):
        train_dp(_cfg(corpus, max_iters=2, grad_accum=2), tmp_path / "a", DP)
    with pytest.raises(PrivacyError, match="noise-multiplier"):
        train_dp(_cfg(corpus, max_iters=2), tmp_path / "b", DPConfig(noise_multiplier=0.0))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_interrupted_canary_experiment_is_continued_by_the_command_it_names(corpus: Path, tmp_path: Path) -> None:
    cfg = CanaryConfig(format="my PIN is {d}{d}{d}", repeats=(1, 16), controls=1, data=str(corpus), max_chars=0,
                       train=dict(TRAIN, max_iters=8), defence="dp", dp={"noise_multiplier": 1.0})
    whole = run_canary_experiment(cfg, tmp_path / "whole")
    out = tmp_path / "stopped"
    with pytest.raises(TrainingInterrupted) as e:
        run_canary_experiment(cfg, out, callback=_kill_at(3))
    assert e.value.command == f"llmlab privacy canary --resume {out}" and e.value.command in str(e.value)
    with pytest.raises(PrivacyError, match=f"llmlab privacy canary --resume {out}"):  # the same --out again
        run_canary_experiment(cfg, out)
    res = resume_canary_experiment(out)
    assert res.training["epsilon"] == whole.training["epsilon"] and res.training["steps"] == 8
    assert [c["exposure"] for c in res.exposure.canaries] == [c["exposure"] for c in whole.exposure.canaries]
    with pytest.raises(PrivacyError, match="--run"):  # finished now: measure it again with --run
        run_canary_experiment(cfg, out)
