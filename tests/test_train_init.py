"""Fine-tuning with TrainConfig.init_from: a run starts from another run's weights and tokenizer, keeps its
shape, resumes from its own checkpoint, and refuses a model flag that contradicts its source."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from llmlab import load
from llmlab.cli import main
from llmlab.errors import ConfigError
from llmlab.security.poisoning.data import toy_corpus, write_text_jsonl
from llmlab.train import resolve_config, train
from llmlab.train.loop import last_checkpoint, load_run_for_resume

SMALL = {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 8, "eval_interval": 1000,
         "eval_iters": 4, "num_samples": 0, "dtype": "float32", "warmup_iters": 2, "split": "random",
         "threads": 1}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("init")
    data = write_text_jsonl(d / "docs.jsonl", toy_corpus(300, 0))
    res = train(resolve_config("tiny", overrides={**SMALL, "data": str(data), "max_iters": 60, "lr": 1e-2}),
                d / "source")
    return d, data, res


def test_run_from_another_starts_where_it_ended(source):
    d, data, res = source
    # a fine-tune with (almost) no learning rate: its first evaluation is the source's last
    cfg = resolve_config("tiny", overrides={**SMALL, "data": str(data), "max_iters": 1, "lr": 1e-12,
                                            "min_lr": 1e-12, "warmup_iters": 0, "init_from": str(d / "source")})
    tuned = train(cfg, d / "tuned")
    assert tuned.val_loss == pytest.approx(res.val_loss, abs=1e-5)
    a, b = load(d / "source"), load(d / "tuned")
    assert b.config.n_embd == 32 and b.tokenizer.vocab_size == a.tokenizer.vocab_size
    for (k, va), (_, vb) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items()), strict=True):
        assert torch.allclose(va, vb, atol=1e-6), k
    scratch = train(resolve_config("tiny", overrides={**SMALL, "data": str(data), "max_iters": 1, "lr": 1e-12,
                                                      "min_lr": 1e-12, "warmup_iters": 0}), d / "scratch")
    assert scratch.val_loss > res.val_loss + 0.5  # a fresh model is far worse: the weights were carried over
    assert json.loads((d / "tuned" / "config.json").read_text())["train"]["init_from"] == str(d / "source")


def test_fine_tune_resumes_from_its_own_checkpoint(source):
    d, data, _ = source
    kw = {**SMALL, "data": str(data), "lr": 1e-3, "min_lr": 1e-3, "warmup_iters": 0, "init_from": str(d / "source"),
          "checkpoint_every": 5}
    train(resolve_config("tiny", overrides={**kw, "max_iters": 10}), d / "whole")
    train(resolve_config("tiny", overrides={**kw, "max_iters": 5}), d / "half")
    src_copy = d / "source-moved"
    shutil.move(d / "source", src_copy)  # resuming needs the run's own checkpoint, not the source
    try:
        cfg = load_run_for_resume(d / "half")
        cfg.train.max_iters = 10
        res = train(cfg, d / "half", resume=True)
    finally:
        shutil.move(src_copy, d / "source")
    assert res.step == 10
    a, b = (load_file(str(last_checkpoint(d / r) / "model.safetensors")) for r in ("whole", "half"))
    for (k, va), (_, vb) in zip(sorted(a.items()), sorted(b.items()), strict=True):
        assert torch.allclose(va, vb, atol=1e-5), k  # stopped and resumed = trained in one go


def test_contradicting_model_flag_is_one_line(source, tmp_path, capsys):
    d, data, _ = source
    with pytest.raises(ConfigError, match="--n-embd 64 contradicts --init-from"):
        train(resolve_config("tiny", overrides={**SMALL, "n_embd": 64, "data": str(data), "max_iters": 1,
                                                "init_from": str(d / "source")}), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    out = tmp_path / "y"
    assert main(["train", "--data", str(data), "--init-from", str(d / "source"), "--block-size", "64",
                 "--max-iters", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--block-size 64 is longer than the context" in err and len(err.splitlines()) == 1
    assert not out.exists()
    assert main(["train", "--data", str(data), "--init-from", str(tmp_path / "nothing"), "--max-iters", "1",
                 "--out", str(out)]) == 2
    assert "--init-from" in capsys.readouterr().err and not out.exists()
