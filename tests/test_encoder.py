"""Encoder-only family: BERT masking statistics, a tiny masked-LM run that learns, resume, WordPiece/BPE
tokenizers, classification metrics against scikit-learn, fine-tuning an llmlab encoder run and the real
MiniLM into classifiers (eval.json, confusion.png, `llmlab classify`), and bad input through the CLI."""

from __future__ import annotations

import csv
import json
import random
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import llmlab
from llmlab.checkpoint import save_run_model
from llmlab.cli import main
from llmlab.config import ModelConfig
from llmlab.metrics import accuracy, confusion_matrix, macro_f1, per_class_scores
from llmlab.models import build_model
from llmlab.tokenizers import CharTokenizer
from llmlab.train.classify import classify, make_finetune_config, split_examples
from llmlab.train.config import resolve_config
from llmlab.train.loop import train
from llmlab.train.mlm import mask_tokens

LINES = ["the cat sat on the mat.\n", "a dog ran in the park.\n", "the bird sang a song.\n"]
TINY_BERT = dict(arch="bert", n_layer=2, n_head=4, n_embd=64, block_size=16, threads=1, eval_iters=4,
                 num_samples=1)
ALPHABET = string.ascii_lowercase
CLASSES = {"early": ALPHABET[:8], "middle": ALPHABET[8:16], "late": ALPHABET[16:24]}


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lines of one repeated letter ("kkkkkkkkk"): a masked letter is given by its context, not by chance."""
    rng = random.Random(0)
    p = tmp_path_factory.mktemp("mlm") / "runs.txt"
    p.write_text("".join(rng.choice(ALPHABET) * rng.randint(8, 20) + "\n" for _ in range(600)))
    return p


@pytest.fixture(scope="module")
def mlm_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny char-level BERT pretrained by masked-LM (200 steps)."""
    cfg = resolve_config(overrides={**TINY_BERT, "data": str(corpus), "max_iters": 200, "batch_size": 16, "lr": 5e-3,
                                    "min_lr": 5e-4, "warmup_iters": 10, "eval_interval": 100, "log_interval": 5,
                                    "mask_prob": 0.3, "seed": 3})
    run = tmp_path_factory.mktemp("runs") / "mlm"
    train(cfg, run)
    return run


def labelled_texts(n: int, seed: int) -> list[tuple[str, str]]:
    """Strings of 6-10 letters, all but one from the letters of their class (early a-h, middle i-p, late q-x)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(sorted(CLASSES))
        letters = [rng.choice(CLASSES[label]) for _ in range(rng.randint(5, 9))] + [rng.choice(ALPHABET)]
        rng.shuffle(letters)
        out.append(("".join(letters), label))
    return out


def write_csv(path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("text", "label")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


# ----------------------------------------------------------------------------- masking


def test_masking_statistics_match_80_10_10() -> None:
    """On 400k positions: 15% chosen, of which 80% [MASK], 10% random, 10% kept — within 5 standard errors."""
    mask_id, pad_id = 38, 39
    candidates = torch.arange(38)
    ids = torch.randint(0, 38, (400, 1000), generator=torch.Generator().manual_seed(1))
    ids[:, -50:] = pad_id  # padding is never chosen
    maskable = ids != pad_id
    inputs, labels = mask_tokens(ids, mask_id, candidates, torch.Generator().manual_seed(2), 0.15, maskable)
    chosen = labels != -100
    n_maskable, n = int(maskable.sum()), int(chosen.sum())

    def within(frac: float, p: float, count: int) -> None:
        se = (p * (1 - p) / count) ** 0.5
        assert abs(frac - p) < 5 * se, (frac, p, se)

    within(n / n_maskable, 0.15, n_maskable)
    assert not chosen[~maskable].any()
    assert torch.equal(labels[chosen], ids[chosen])  # the model must predict the original token
    assert torch.equal(inputs[~chosen], ids[~chosen])  # nothing else changes
    masked = inputs[chosen] == mask_id
    replaced = (inputs[chosen] != mask_id) & (inputs[chosen] != ids[chosen])
    kept = inputs[chosen] == ids[chosen]
    within(float(masked.float().mean()), 0.8, n)
    # a random replacement equals the original 1 time in 38
    within(float(replaced.float().mean()), 0.1 * (1 - 1 / 38), n)
    within(float(kept.float().mean()), 0.1 + 0.1 / 38, n)
    assert int(inputs[chosen][replaced].max()) < 38  # random tokens are never special
    again = mask_tokens(ids, mask_id, candidates, torch.Generator().manual_seed(2), 0.15, maskable)
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)  # same seed, same masks


# ----------------------------------------------------------------------------- masked-LM pretraining


def test_mlm_run_learns(mlm_run: Path) -> None:
    rows = metrics(mlm_run)
    first = next(r["loss"] for r in rows if r["kind"] == "train")
    last = [r for r in rows if r["kind"] == "eval"][-1]
    ev = json.loads((mlm_run / "eval.json").read_text())
    assert first > 3.0  # about ln(vocab) at the start
    assert ev["val_loss"] < 0.35 * first, (first, ev)
    assert ev["masked_accuracy"] > 0.7, ev  # chance: 1/26
    assert last["val_masked_accuracy"] == pytest.approx(ev["masked_accuracy"], abs=0.1)
    assert ev["masked_tokens"] > 100


def test_mlm_run_folder_and_load(mlm_run: Path) -> None:
    cfg = json.loads((mlm_run / "config.json").read_text())
    assert cfg["model"]["arch"] == "bert" and cfg["model"]["mlm_head"]
    assert cfg["data"]["task"] == "mlm" and cfg["train"]["mask_prob"] == 0.3
    for f in ("model.safetensors", "loss.png", "samples.txt", "manifest.json", "eval.json"):
        assert (mlm_run / f).is_file(), f
    model = llmlab.load(mlm_run)
    tok = model.tokenizer
    assert tok.mask_id is not None and tok.pad_id is not None
    ids = torch.tensor([tok.encode("qqqqqqq")])
    ids[0, 3] = tok.mask_id
    with torch.no_grad():
        pred = model.mlm_logits(model(ids))[0, 3].argmax()
    assert tok.decode([int(pred)]) == "q"


@pytest.mark.slow
def test_mlm_learns_words_in_sentences(tmp_path: Path) -> None:
    """Three repeated sentences, char-level: after 900 steps the model fills "the cat [MASK]at" with "s"."""
    rng = random.Random(0)
    corpus = tmp_path / "rep.txt"
    corpus.write_text("".join(rng.choice(LINES) for _ in range(400)))
    cfg = resolve_config(overrides={**TINY_BERT, "block_size": 32, "data": str(corpus), "max_iters": 900,
                                    "batch_size": 32, "lr": 3e-3, "eval_interval": 300, "seed": 3})
    train(cfg, tmp_path / "run")
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert ev["masked_accuracy"] > 0.9 and ev["val_loss"] < 0.5, ev
    model = llmlab.load(tmp_path / "run")
    tok = model.tokenizer
    ids = torch.tensor([tok.encode("the cat sat on the mat.")])
    ids[0, 8] = tok.mask_id  # the "s" of "sat"
    with torch.no_grad():
        assert tok.decode([int(model.mlm_logits(model(ids))[0, 8].argmax())]) == "s"


def test_mlm_resume_is_exact(corpus: Path, tmp_path: Path) -> None:
    kw = {**TINY_BERT, "data": str(corpus), "batch_size": 8, "eval_interval": 5, "num_samples": 0, "seed": 9}
    train(resolve_config(overrides={**kw, "max_iters": 10}), tmp_path / "straight")
    train(resolve_config(overrides={**kw, "max_iters": 5}), tmp_path / "resumed")
    cfg = resolve_config(overrides={**kw, "max_iters": 10})
    train(cfg, tmp_path / "resumed", resume=True)
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "step-0000010" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-0000010" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_mlm_with_subword_tokenizers(kind: str, tmp_path: Path) -> None:
    text = tmp_path / "ref.txt"
    from llmlab.data import default_corpus

    text.write_text("".join(default_corpus()[:20]))
    cfg = resolve_config(overrides={**TINY_BERT, "data": str(text), "tokenizer": kind, "vocab_size": 400,
                                    "max_iters": 3, "batch_size": 4, "eval_interval": 3, "eval_iters": 1})
    train(cfg, tmp_path / kind)
    model = llmlab.load(tmp_path / kind)
    assert model.tokenizer.kind == kind and model.config.vocab_size == model.tokenizer.vocab_size
    assert model.tokenizer.mask_id is not None
    assert set(json.loads((tmp_path / kind / "eval.json").read_text())) >= {"val_loss", "masked_accuracy"}


# ----------------------------------------------------------------------------- metrics


def test_classification_metrics_agree_with_sklearn() -> None:
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support
    from sklearn.metrics import confusion_matrix as sk_confusion

    rng = np.random.default_rng(0)
    for trial in range(20):
        K = int(rng.integers(2, 7))
        n = int(rng.integers(5, 60))
        y = rng.integers(0, K, n)
        p = np.where(rng.random(n) < 0.6, y, rng.integers(0, K, n))
        if trial % 3 == 0:  # a class that never occurs, and one that is never predicted
            y, p = np.where(y == K - 1, 0, y), np.where(p == 1, 0, p)
        assert accuracy(y, p) == pytest.approx(accuracy_score(y, p))
        assert macro_f1(y, p, K) == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
        assert np.array_equal(confusion_matrix(y, p, K), sk_confusion(y, p, labels=list(range(K))))
        s = per_class_scores(y, p, K)
        pr, rc, f1, sup = precision_recall_fscore_support(y, p, labels=list(range(K)), zero_division=0)
        assert np.allclose(s["precision"], pr) and np.allclose(s["recall"], rc) and np.allclose(s["f1"], f1)
        assert np.array_equal(s["support"], sup)


def test_split_is_stratified_and_deterministic() -> None:
    labels = ["a"] * 50 + ["b"] * 10 + ["c"] * 1
    tr, va = split_examples(labels, 0.2)
    assert (tr, va) == split_examples(labels, 0.2)
    assert sorted(tr + va) == list(range(61))
    held = [labels[i] for i in va]
    assert held.count("a") == 10 and held.count("b") == 2 and held.count("c") == 0


# ----------------------------------------------------------------------------- fine-tuning


@pytest.fixture(scope="module")
def classifier_run(mlm_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clf")
    data = write_csv(folder / "words.csv", labelled_texts(240, seed=1))
    out = folder / "run"
    rc = main(["finetune", "classify", "--base", str(mlm_run), "--data", str(data), "--out", str(out),
               "--max-iters", "60", "--lr", "3e-3", "--eval-interval", "30", "--batch-size", "16", "--threads", "1",
               "--seed", "2"])
    assert rc == 0
    return out


def test_finetuned_encoder_run_learns(classifier_run: Path) -> None:
    ev = json.loads((classifier_run / "eval.json").read_text())
    rows = metrics(classifier_run)
    first = next(r["loss"] for r in rows if r["kind"] == "train")
    assert ev["val_loss"] < 0.3 * first, (first, ev)
    assert ev["accuracy"] >= 0.9 and ev["macro_f1"] >= 0.9, ev  # chance: 1/3
    assert ev["labels"] == ["early", "late", "middle"] and ev["n_val"] + ev["n_train"] == 240 and ev["n_val"] >= 48
    assert np.array(ev["confusion"]).sum() == ev["n_val"]
    assert (classifier_run / "confusion.png").stat().st_size > 5000
    assert (classifier_run / "loss.png").is_file()
    cfg = json.loads((classifier_run / "config.json").read_text())
    assert cfg["train"]["task"] == "classify" and cfg["model"]["n_classes"] == 3


def test_classify_api_and_verb(classifier_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = classify(classifier_run, ["klmnopkl", "stuvwxst"])
    assert [o["label"] for o in out] == ["middle", "late"]
    for o in out:
        assert sum(o["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert main(["classify", str(classifier_run), "abcdefgh", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res[0]["label"] == "early" and set(res[0]["probabilities"]) == {"early", "late", "middle"}
    assert main(["classify", str(classifier_run), "hgfedcba"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].startswith("early") and "middle" in text and "late" in text


def test_finetune_resume_continues(classifier_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "again"
    shutil.copytree(classifier_run, run)
    assert main(["finetune", "classify", "--resume", str(run), "--max-iters", "64"]) == 0
    assert [r for r in metrics(run) if r["kind"] == "train"][-1]["step"] == 64
    assert json.loads((run / "eval.json").read_text())["accuracy"] >= 0.9


def test_finetune_minilm_starts_from_its_weights(tmp_path: Path) -> None:
    """Two tiny steps from MiniLM: the encoder still holds MiniLM's weights (moved by at most lr-sized steps)."""
    data = write_csv(tmp_path / "d.csv", labelled_texts(24, seed=3))
    cfg = make_finetune_config("minilm", str(data), {"max_iters": 2, "lr": 1e-5, "max_len": 16, "batch_size": 4,
                                                     "eval_iters": 1, "threads": 1, "warmup_iters": 0})
    train(cfg, tmp_path / "ft")
    tuned, base = llmlab.load(tmp_path / "ft"), llmlab.load("minilm")
    assert tuned.config.n_classes == 3 and tuned.tokenizer.kind == "wordpiece"
    w_t, w_b = tuned.state_dict(), base.state_dict()
    for name in ("word_embeddings.weight", "layers.5.mlp.fc.weight", "layers.0.attn.qkv.bias"):
        assert (w_t[name] - w_b[name]).abs().max() < 1e-4, name
    ev = json.loads((tmp_path / "ft" / "eval.json").read_text())
    assert 0.0 <= ev["accuracy"] <= 1.0 and "macro_f1" in ev


@pytest.mark.slow
def test_minilm_finetune_learns_pydoc_topics(tmp_path: Path) -> None:
    from llmlab.datasets import pydoc_topics, write_dataset

    data = write_dataset(pydoc_topics(4), tmp_path / "topics.csv")
    cfg = make_finetune_config("minilm", str(data), {"max_iters": 40, "max_len": 64, "threads": 2})
    train(cfg, tmp_path / "ft")
    ev = json.loads((tmp_path / "ft" / "eval.json").read_text())
    assert ev["accuracy"] > 0.7 and ev["macro_f1"] > 0.6, ev  # 4 classes: chance about 0.3


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpt") / "run"
    tok = CharTokenizer.train("abc de", unk="replace")
    save_run_model(folder, build_model(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_embd=32, block_size=16)),
                   tok)
    return folder


def _bad_cases(tmp: Path, gpt: Path) -> dict[str, tuple[list[str], str]]:
    good = write_csv(tmp / "good.csv", labelled_texts(12, seed=0))
    nocol = write_csv(tmp / "nocol.csv", labelled_texts(12, seed=0), header=("sentence", "label"))
    one = write_csv(tmp / "one.csv", [(t, "early") for t, _ in labelled_texts(12, seed=0)])
    notobj = tmp / "notobj.jsonl"
    notobj.write_text('{"text": "abc", "label": "early"}\n["xyz", "late"]\n')
    return {
        "missing column": (["finetune", "classify", "--base", "minilm", "--data", str(nocol)], "no column 'text'"),
        "one class": (["finetune", "classify", "--base", "minilm", "--data", str(one)], "at least two classes"),
        "decoder-only base": (["finetune", "classify", "--base", str(gpt), "--data", str(good)], "decoder-only"),
        "missing base": (["finetune", "classify", "--base", str(tmp / "nope"), "--data", str(good)], "does not exist"),
        "jsonl not object": (["finetune", "classify", "--base", "minilm", "--data", str(notobj)], "not a JSON object"),
        "no data": (["finetune", "classify", "--base", "minilm"], "--data"),
        "classify a non-classifier": (["classify", str(gpt), "hello"], "not a fine-tuned classifier"),
    }


@pytest.mark.parametrize("case", ["missing column", "one class", "decoder-only base", "missing base",
                                  "jsonl not object", "no data", "classify a non-classifier"])
def test_bad_input_exits_2_with_one_line(case: str, tmp_path: Path, gpt_run: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected = _bad_cases(tmp_path, gpt_run)[case]
    out = tmp_path / "out"
    rc = main([*argv, "--out", str(out)] if argv[0] == "finetune" else argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert expected in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())  # nothing half-written


def test_bad_input_in_a_real_process(tmp_path: Path, gpt_run: Path) -> None:
    argv, expected = _bad_cases(tmp_path, gpt_run)["decoder-only base"]
    r = subprocess.run([sys.executable, "-m", "llmlab", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- DDP


def ddp_matches_single(work: Path, args: list[str]) -> None:
    """Train the same run in one process and under torchrun with 2 processes; the weights must agree."""
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.is_file():
        pytest.skip("torchrun is not installed next to this python")
    single = subprocess.run([sys.executable, "-m", "llmlab", *args, "--out", str(work / "single")],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "llmlab", *args, "--out",
                          str(work / "ddp")], capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(str(work / "single" / "model.safetensors"))
    b = load_file(str(work / "ddp" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert (work / "ddp" / "eval.json").is_file()


@pytest.mark.slow
def test_mlm_ddp_matches_single_process(corpus: Path, tmp_path: Path) -> None:
    ddp_matches_single(tmp_path, ["train", "--arch", "bert", "--data", str(corpus), "--n-layer", "1", "--n-embd",
                                  "32", "--block-size", "16", "--batch-size", "8", "--max-iters", "4", "--threads",
                                  "1", "--eval-interval", "4", "--eval-iters", "1", "--num-samples", "0"])


@pytest.mark.slow
def test_classify_ddp_matches_single_process(mlm_run: Path, tmp_path: Path) -> None:
    data = write_csv(tmp_path / "d.csv", labelled_texts(40, seed=4))
    ddp_matches_single(tmp_path, ["train", "--task", "classify", "--arch", "bert", "--base", str(mlm_run), "--data",
                                  str(data), "--batch-size", "8", "--max-iters", "4", "--threads", "1",
                                  "--eval-interval", "4", "--eval-iters", "1", "--num-samples", "0"])
