"""Training: a tiny run end to end, the run folder it writes, the lr schedule, AdamW groups, config
resolution, max_time, bit-exact resume after SIGKILL, and DistributedDataParallel under torchrun."""

from __future__ import annotations

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
from llmlab.checkpoint import sha256_file
from llmlab.data import BatchSampler, prepare
from llmlab.errors import ConfigError
from llmlab.models import build_model
from llmlab.tokenizers import load_tokenizer
from llmlab.train.config import PRESETS, TrainConfig, resolve_config, valid_keys
from llmlab.train.loop import lr_at, make_optimizer, train

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
LINES = ["the cat sat on the mat.\n", "a dog ran in the park.\n", "the bird sang a song.\n"]


def repetitive_corpus(path: Path, n_lines: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(rng.choice(LINES) for _ in range(n_lines)))
    return path


TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=32, batch_size=8, threads=1, eval_iters=5, dtype="float32",
            num_samples=2, sample_tokens=30)


def tiny_config(data: Path, **kw):  # noqa: ANN201
    return resolve_config(overrides={**TINY, "data": str(data), **kw})


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """LLMLAB_CACHE pointing at a fresh folder for the whole module."""
    d = tmp_path_factory.mktemp("llmlab_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(d))
        yield d


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return repetitive_corpus(tmp_path_factory.mktemp("corpus") / "rep.txt")


@pytest.fixture(scope="module")
def trained(cache_env: Path, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A tiny run: 80 steps, checkpoints every 10 keeping 2, events recorded."""
    cfg = tiny_config(corpus_file, max_iters=80, lr=3e-3, min_lr=3e-4, warmup_iters=5, eval_interval=20,
                      log_interval=5, checkpoint_every=10, keep_checkpoints=2, seed=5)
    run = tmp_path_factory.mktemp("runs") / "tiny"
    events: list[tuple[str, dict]] = []
    result = train(cfg, run, callback=lambda e, i: events.append((e, i)))
    return cfg, run, result, events


# ----------------------------------------------------------------------------- a tiny run


def test_tiny_run_learns(trained) -> None:  # noqa: ANN001
    cfg, run, result, _ = trained
    corpus = prepare(cfg.train.data)
    V = corpus.tokenizer.vocab_size

    @torch.no_grad()
    def val_loss(model: torch.nn.Module) -> float:
        model.eval()
        sampler = BatchSampler(corpus.val, cfg.model.block_size, 8, seed=0)
        losses = []
        for _ in range(10):
            x, y = sampler.next()
            logits = model(x)
            losses.append(float(torch.nn.functional.cross_entropy(logits.view(-1, V), y.reshape(-1))))
        return sum(losses) / len(losses)

    torch.manual_seed(cfg.train.seed)
    start = val_loss(build_model(cfg.model.replace(vocab_size=V)))
    assert abs(start - math.log(V)) < 0.5  # an untrained model is close to uniform
    assert result.step == 80 and result.stopped_by == "max_iters"
    assert result.val_loss < 0.5 * start
    assert result.best_val_loss <= result.val_loss
    assert val_loss(llmlab.load(run)) < 0.5 * start  # the saved weights are the trained ones


def test_run_folder_contents(trained) -> None:  # noqa: ANN001
    cfg, run, result, events = trained
    for name in ("model.safetensors", "config.json", "metrics.jsonl", "loss.png", "samples.txt", "manifest.json"):
        assert (run / name).is_file(), name
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tok = load_tokenizer(run / "tokenizer")
    assert tok.kind == "char" and set("the cat sat on the mat.\n") <= set(tok.decode(range(tok.vocab_size)))

    conf = json.loads((run / "config.json").read_text())
    assert conf["llmlab"]["format_version"] == 1
    assert conf["model"]["n_layer"] == 2 and conf["model"]["vocab_size"] == tok.vocab_size
    assert conf["train"]["max_iters"] == 80

    manifest = json.loads((run / "manifest.json").read_text())["sha256"]
    assert manifest["model.safetensors"] == sha256_file(run / "model.safetensors")

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(5, 81, 5))
    for r in train_rows:
        assert {"step", "loss", "lr", "tokens_per_s", "elapsed"} <= set(r)
        assert r["loss"] > 0 and r["lr"] > 0 and r["tokens_per_s"] > 0 and r["elapsed"] >= 0
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg.train))
    assert [r["elapsed"] for r in train_rows] == sorted(r["elapsed"] for r in train_rows)
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    eval_rows = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in eval_rows] == [20, 40, 60, 80]
    assert eval_rows[-1]["val_loss"] == pytest.approx(result.val_loss)

    samples = (run / "samples.txt").read_text()
    assert samples.count("--- sample ") == 2 and len(result.samples) == 2
    for s in result.samples:
        assert s in samples

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-0000070", "step-0000080"]  # keep_checkpoints=2
    for c in ckpts:
        assert {p.name for p in (run / "checkpoints" / c).iterdir()} == \
            {"model.safetensors", "optimizer.safetensors", "state.json"}
    assert json.loads((run / "checkpoints/step-0000080/state.json").read_text())["step"] == 80

    kinds = [e for e, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert kinds.count("eval") == 4 and kinds.count("checkpoint") == 8 and kinds.count("log") == 16


def test_load_run_in_eval_mode(trained) -> None:  # noqa: ANN001
    _, run, _, _ = trained
    model = llmlab.load(run)
    assert not model.training and not any(m.training for m in model.modules())
    assert model.tokenizer is not None and model.tokenizer.kind == "char"
    assert model.config.n_layer == 2 and model.config.block_size == 32
    saved = load_file(str(run / "model.safetensors"))
    state = model.state_dict()
    for k, v in saved.items():
        assert torch.equal(state[k], v), k
    assert llmlab.load(str(run)).config == model.config


# ----------------------------------------------------------------------------- schedule and optimizer


def test_lr_schedule_warmup_then_cosine_to_min_lr() -> None:
    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=110)
    warm = [lr_at(s, t) for s in range(10)]
    steps = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d > 0 for d in steps)
    assert max(steps) - min(steps) < 1e-12  # linear
    assert warm[0] > 0 and warm[-1] < t.lr
    assert lr_at(10, t) == pytest.approx(t.lr)  # the peak right after warmup
    decay = [lr_at(s, t) for s in range(10, 111)]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert lr_at(60, t) == pytest.approx((t.lr + t.min_lr) / 2)  # half way through the cosine
    assert lr_at(110, t) == pytest.approx(t.min_lr)
    assert lr_at(109, t) == pytest.approx(t.min_lr, rel=1e-2)
    assert lr_at(500, t) == pytest.approx(t.min_lr)
    t2 = TrainConfig(lr=1e-3, min_lr=0.0, warmup_iters=0, max_iters=1000, lr_decay_iters=100)
    assert lr_at(0, t2) == pytest.approx(1e-3) and lr_at(100, t2) == 0.0 and lr_at(999, t2) == 0.0


def test_adamw_decays_matrices_only() -> None:
    cfg = resolve_config(overrides=dict(n_layer=2, n_embd=32, n_head=4, block_size=16))
    model = build_model(cfg.model)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.05, lr=2e-3, beta1=0.8, beta2=0.9))
    assert isinstance(opt, torch.optim.AdamW)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.8, 0.9) and decay["lr"] == 2e-3
    assert decay["params"] and no_decay["params"]
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # tied embeddings appear once
    assert set(ids) == {id(p) for p in model.parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    assert any(names[id(p)].endswith("bias") for p in no_decay["params"])
    assert "wte.weight" in {names[id(p)] for p in decay["params"]}


# ----------------------------------------------------------------------------- configuration


def test_preset_then_toml_then_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('tokenizer = "char"\n[model]\nblock_size = 48\nn_embd = 96\n'
                    "[train]\nlr = 1e-3\nbatch_size = 12\n")
    cfg = resolve_config("shakespeare", str(toml), {"lr": 5e-4, "n_embd": 64})
    sp = PRESETS["shakespeare"]
    assert cfg.preset == "shakespeare"
    assert cfg.model.n_layer == sp["model"]["n_layer"]  # from the preset
    assert cfg.train.warmup_iters == sp["train"]["warmup_iters"]  # from the preset
    assert cfg.model.block_size == 48 and cfg.train.batch_size == 12  # the file beats the preset
    assert cfg.train.lr == 5e-4 and cfg.model.n_embd == 64  # overrides beat the file
    assert cfg.train.max_iters == sp["train"]["max_iters"]
    default = resolve_config()
    assert default.preset == "tiny" and default.model.n_embd == PRESETS["tiny"]["model"]["n_embd"]


def test_unknown_preset_lists_valid_ones() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_config("nope")
    for name in PRESETS:
        assert name in str(e.value)


def test_unknown_key_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_config(overrides={"n_layers": 3})
    msg = str(e.value)
    assert "n_layers" in msg and "n_layer" in msg and "max_iters" in msg
    assert all(k in msg for k in valid_keys())
    toml = tmp_path / "bad.toml"
    toml.write_text("[train]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate.*valid keys"):
        resolve_config(toml_path=str(toml))
    toml.write_text("[optim]\nlr = 0.1\n")
    with pytest.raises(ConfigError, match="optim"):
        resolve_config(toml_path=str(toml))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(toml_path=str(tmp_path / "missing.toml"))
    toml.write_text("lr = = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        resolve_config(toml_path=str(toml))


def test_max_time_stops_early(cache_env: Path, corpus_file: Path, tmp_path: Path) -> None:
    cfg = tiny_config(corpus_file, n_layer=1, n_embd=32, max_iters=100_000, max_time=0.5, eval_interval=100_000,
                      num_samples=0, log_interval=1000)
    t0 = time.perf_counter()
    result = train(cfg, tmp_path / "timed")
    assert result.stopped_by == "max_time"
    assert 0 < result.step < 100_000
    assert result.elapsed >= 0.5
    assert time.perf_counter() - t0 < 30
    assert (tmp_path / "timed" / "checkpoints" / f"step-{result.step:07d}").is_dir()


def test_resume_does_not_duplicate_metrics(cache_env: Path, corpus_file: Path, tmp_path: Path) -> None:
    """A crash after logging steps past the last checkpoint must not leave those steps twice in
    metrics.jsonl once the run is resumed (simulated by deleting the later checkpoints)."""
    import shutil

    cfg = tiny_config(corpus_file, n_layer=1, n_embd=32, max_iters=20, checkpoint_every=5, keep_checkpoints=10,
                      log_interval=1, eval_interval=1000, num_samples=0)
    run = tmp_path / "r"
    train(cfg, run)
    for step in (15, 20):
        shutil.rmtree(run / "checkpoints" / f"step-{step:07d}")
    result = train(cfg, run, resume=True)
    assert result.step == 20
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 21))


# ----------------------------------------------------------------------------- subprocess runs


def _env(cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LLMLAB_CACHE=str(cache), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONUNBUFFERED="1")
    return env


def _llmlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "llmlab", *args]


def _assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


RESUME_ARGS = ["--n-layer", "2", "--n-head", "4", "--n-embd", "64", "--block-size", "32", "--batch-size", "16",
               "--checkpoint-every", "5", "--max-iters", "40", "--threads", "1", "--seed", "3", "--dropout", "0.1",
               "--log-interval", "1", "--num-samples", "1", "--sample-tokens", "10"]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path):  # noqa: ANN201
    """Run A killed with SIGKILL after its step-10 checkpoint and resumed; run B uninterrupted."""
    work = tmp_path_factory.mktemp("resume")
    env = _env(work / "cache")
    # warm the token cache so that A and B start from the same cached data
    prep = subprocess.run([sys.executable, "-c", f"from llmlab.data import prepare; prepare({str(corpus_file)!r})"],
                          env=env, cwd=work, capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr
    args = ["train", "--data", str(corpus_file), *RESUME_ARGS]
    b = subprocess.Popen(_llmlab(*args, "--out", "B"), env=env, cwd=work, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    a = subprocess.Popen(_llmlab(*args, "--out", "A"), env=env, cwd=work, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    ckdir = work / "A" / "checkpoints"
    killed_after: list[int] = []
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and a.poll() is None:
        steps = [int(p.name.split("-")[1]) for p in ckdir.glob("step-*")] if ckdir.is_dir() else []
        if steps and max(steps) >= 10:
            os.kill(a.pid, signal.SIGKILL)
            killed_after = steps
            break
        time.sleep(0.005)
    a.wait(timeout=60)
    assert killed_after, "run A finished or timed out before its step-10 checkpoint could be seen"
    assert a.returncode == -signal.SIGKILL
    done = sorted(int(p.name.split("-")[1]) for p in ckdir.glob("step-*"))
    assert 40 not in done, f"run A got to the end before the kill ({done}); make it slower"
    resumed = subprocess.run(_llmlab("train", "--resume", "A"), env=env, cwd=work, capture_output=True, text=True,
                             timeout=300)
    _, b_err = b.communicate(timeout=300)
    assert b.returncode == 0, b_err[-2000:]
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return work / "A", work / "B", done


def test_resume_after_sigkill_is_bit_identical(killed_and_resumed) -> None:  # noqa: ANN001
    a, b, done_at_kill = killed_and_resumed
    assert max(done_at_kill) < 40
    ca, cb = a / "checkpoints" / "step-0000040", b / "checkpoints" / "step-0000040"
    _assert_same_tensors(load_file(str(ca / "model.safetensors")), load_file(str(cb / "model.safetensors")))
    opt_a, opt_b = load_file(str(ca / "optimizer.safetensors")), load_file(str(cb / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg_sq") for k in opt_a)
    _assert_same_tensors(opt_a, opt_b)  # Adam moments, step counts and the RNG states
    sa, sb = json.loads((ca / "state.json").read_text()), json.loads((cb / "state.json").read_text())
    for key in ("step", "tokens_seen", "param_groups"):
        assert sa[key] == sb[key], key
    assert sa["step"] == 40
    assert (a / "samples.txt").read_text() == (b / "samples.txt").read_text()


def test_resume_after_sigkill_continues_metrics(killed_and_resumed) -> None:  # noqa: ANN001
    a, b, _ = killed_and_resumed
    rows_a = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(line) for line in (b / "metrics.jsonl").read_text().splitlines()]
    steps_a = {r["step"] for r in rows_a if r["kind"] == "train"}
    assert steps_a == set(range(1, 41))
    loss_b = {r["step"]: r["loss"] for r in rows_b if r["kind"] == "train"}
    for r in rows_a:  # every row, before or after the kill, is the uninterrupted run's
        if r["kind"] == "train":
            assert r["loss"] == loss_b[r["step"]]


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path):  # noqa: ANN201
    if not TORCHRUN.is_file():
        pytest.skip("torchrun is not installed next to this python")
    work = tmp_path_factory.mktemp("ddp")
    env = _env(work / "cache")
    prep = subprocess.run([sys.executable, "-c", f"from llmlab.data import prepare; prepare({str(corpus_file)!r})"],
                          env=env, cwd=work, capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr
    args = ["train", "--data", str(corpus_file), "--n-layer", "1", "--n-head", "4", "--n-embd", "32",
            "--block-size", "32", "--batch-size", "8", "--max-iters", "5", "--threads", "1", "--seed", "3",
            "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "2", "--checkpoint-every", "2",
            "--keep-checkpoints", "5", "--num-samples", "1", "--sample-tokens", "5", "--dtype", "float32"]
    single = subprocess.Popen(_llmlab(*args, "--out", "single"), env=env, cwd=work, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    ddp = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "llmlab", *args, "--out", "ddp"],
                         env=env, cwd=work, capture_output=True, text=True, timeout=300)
    _, s_err = single.communicate(timeout=300)
    assert single.returncode == 0, s_err[-2000:]
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    return work / "single", work / "ddp", ddp


def test_ddp_matches_single_process(ddp_runs) -> None:  # noqa: ANN001
    single, ddp, _ = ddp_runs
    ws = load_file(str(single / "checkpoints/step-0000005/model.safetensors"))
    wd = load_file(str(ddp / "checkpoints/step-0000005/model.safetensors"))
    _assert_same_tensors(ws, wd, atol=1e-5)
    init = build_model(llmlab.load(single).config).state_dict()
    assert any(not torch.allclose(ws[k], init[k]) for k in ws)  # it did train
    assert json.loads((ddp / "checkpoints/step-0000005/state.json").read_text())["world_size"] == 2


def test_ddp_only_rank0_writes(ddp_runs) -> None:  # noqa: ANN001
    single, ddp, proc = ddp_runs

    def files(run: Path) -> set[str]:
        return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}

    assert files(ddp) == files(single)  # no second copy, no leftover temporary file
    rows = [json.loads(line) for line in (ddp / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["kind"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert [s for k, s in keys if k == "train"] == [1, 2, 3, 4, 5]
    assert proc.stdout.count("run folder:") == 1  # only rank 0 reports


def test_ddp_logs_the_global_batch_loss(ddp_runs) -> None:  # noqa: ANN001
    single, ddp, _ = ddp_runs

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["kind"] == "train"]

    assert losses(ddp) == pytest.approx(losses(single), abs=2e-4)


@pytest.mark.parametrize("opts", [{"dtype": "bfloat16"},
                                  pytest.param({"compile": True}, marks=pytest.mark.slow)],
                         ids=["bf16-autocast", "torch-compile"])
def test_bf16_and_compile_runs_learn(opts: dict, cache_env: Path, corpus_file: Path, tmp_path: Path) -> None:
    cfg = tiny_config(corpus_file, max_iters=40, eval_interval=40, num_samples=0, **opts)
    res = train(cfg, tmp_path / "run")
    assert res.step == 40
    assert math.isfinite(res.val_loss) and res.val_loss < 2.0  # a fresh model starts near ln(vocab) ~ 3.2
    model = llmlab.load(tmp_path / "run")
    assert next(model.parameters()).dtype == torch.float32  # autocast never changes the stored weights


def test_grad_accumulation_equals_one_big_batch(cache_env: Path, corpus_file: Path, tmp_path: Path) -> None:
    """batch 8 as 2 micro-batches of 4 gives the weights of one batch of 8 (the same rows, the mean loss)."""
    runs = {}
    for accum in (1, 2):
        cfg = tiny_config(corpus_file, max_iters=3, eval_interval=3, num_samples=0, batch_size=8, grad_accum=accum)
        train(cfg, tmp_path / f"a{accum}")
        runs[accum] = load_file(str(tmp_path / f"a{accum}" / "checkpoints" / "step-0000003" / "model.safetensors"))
    _assert_same_tensors(runs[1], runs[2], atol=1e-5)
