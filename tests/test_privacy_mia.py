"""Membership inference and training-data extraction on a tiny GPT overfit here: the attacks separate members
from non-members, find nothing between two sets of non-members, extraction finds verbatim training text, and
the `llmlab privacy mia|extract` commands write reports and refuse bad input with one line and status 2."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from llmlab.cli import main
from llmlab.security.privacy.common import PrivacyError, run_splits
from llmlab.security.privacy.extract import ExtractConfig, run_extract
from llmlab.security.privacy.mia import ATTACKS, MIAConfig, run_mia
from llmlab.security.targets import WhiteBox
from llmlab.train.config import resolve_config
from llmlab.train.loop import train

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu one two three four five six seven "
         "eight nine zero red green blue").split()


def random_docs(n: int, seed: int, words: int = 50) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "\n" for _ in range(n)]


def _write(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An overfit target (300 steps, ~150 epochs, over 4 KB of random word sequences; evaluated only at the
    end, so the saved weights are the last, most overfit ones) and a weak reference model."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("mia")
    data = _write(root / "corpus.jsonl", random_docs(60, seed=0, words=20))
    common = dict(data=str(data), val_fraction=0.5, n_head=4, n_embd=128, block_size=32, batch_size=32,
                  eval_interval=300, eval_iters=5, lr=3e-3, warmup_iters=20, num_samples=0, threads=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(root / "cache"))
        train(resolve_config("tiny", None, {**common, "n_layer": 2, "max_iters": 300}), root / "target")
        train(resolve_config("tiny", None, {**common, "n_layer": 1, "max_iters": 40}), root / "ref")
    return {"root": root, "target": root / "target", "ref": root / "ref", "data": data}


def test_loss_attack_separates_members_of_an_overfit_model(lab: dict) -> None:
    splits = run_splits(lab["target"])
    assert len(splits.train) == 30 and len(splits.val) == 30
    wb, ref = WhiteBox.load(lab["target"]), WhiteBox.load(lab["ref"])
    res = run_mia(wb, splits.train, splits.val, MIAConfig(max_docs=150, neighbours=3, bootstrap=200), reference=ref)
    assert set(res.attacks) == set(ATTACKS) and not res.skipped
    assert res.attacks["loss"]["auc"] > 0.9
    ci = res.attacks["loss"]["auc_ci"]
    assert ci["low"] <= res.attacks["loss"]["auc"] <= ci["high"]
    # ~120 non-member sequences cannot resolve a 1% FPR (that needs 1,000): the TPR is given at 10 / n instead
    assert res.attacks["loss"]["tpr_at_1pct"] is None
    n_neg = res.n_nonmembers
    assert res.attacks["loss"]["tpr_at_resolvable"]["fpr"] == pytest.approx(10 / n_neg)
    assert res.attacks["loss"]["tpr_at_resolvable"]["tpr"] > 0.05
    for name in ("min_k", "min_k++", "zlib", "reference"):
        assert res.attacks[name]["auc"] > 0.75, name
    assert res.n_members > 50 and res.n_nonmembers > 50
    assert res.sequences_per_s > 0


def test_attacks_are_at_chance_between_two_non_member_sets(lab: dict) -> None:
    wb = WhiteBox.load(lab["target"])
    a, b = random_docs(150, seed=11), random_docs(150, seed=12)
    res = run_mia(wb, a, b, MIAConfig(max_docs=150, neighbours=2, bootstrap=200,
                                      attacks=("loss", "min_k", "min_k++", "zlib")))
    for name, r in res.attacks.items():
        assert abs(r["auc"] - 0.5) < 0.1, (name, r["auc"])


def test_extraction_finds_verbatim_training_text(lab: dict) -> None:
    splits = run_splits(lab["target"])
    wb = WhiteBox.load(lab["target"])
    cfg = ExtractConfig(samples=48, length=24, prefixes="train", prefix_tokens=8, k=16, top=20, window=8)
    res = run_extract(wb, splits.train, cfg, reference=WhiteBox.load(lab["ref"]), prefix_docs=splits.train)
    assert set(res.precision) == {"perplexity", "zlib", "lowercase", "window", "reference"}
    assert all(0 <= p <= 1 for p in res.precision.values())
    assert res.memorised, "an overfit model continues training prefixes verbatim"
    train_text = "".join(splits.train)
    for m in res.memorised:
        assert m["verbatim_tokens"] >= 16 and m["verbatim_text"] in train_text
    # precision is the memorised share of each metric's top 20
    for metric, p in res.precision.items():
        top = sorted(res.samples, key=lambda r: r["rank"][metric])[:20]
        assert p == pytest.approx(sum(r["memorised"] for r in top) / 20)
    # text the model never saw is not reported as memorised
    fresh = run_extract(wb, random_docs(30, seed=99, words=20), cfg, prefix_docs=splits.train)
    assert fresh.memorised_fraction < res.memorised_fraction
    assert res.precision_ci["perplexity"]["lo"] <= res.precision["perplexity"] <= res.precision_ci["perplexity"]["hi"]


def test_extraction_flags_any_sample_holding_a_canary(lab: dict) -> None:
    splits = run_splits(lab["target"])
    wb = WhiteBox.load(lab["target"])
    cfg = ExtractConfig(samples=24, length=24, prefixes="train", prefix_tokens=8, k_chars=1000, top=10, window=8)
    res = run_extract(wb, splits.train, cfg, prefix_docs=splits.train)
    assert not res.memorised  # 1,000 verbatim characters: nothing counts ...
    assert res.k_tokens == round(1000 / res.chars_per_token) and res.chars_per_token == pytest.approx(1.0)
    secret = next(r["text"][4:10] for r in res.samples if len(r["text"]) > 12)
    planted = run_extract(wb, splits.train, cfg, prefix_docs=splits.train, canaries=[secret])
    assert planted.leaks and all(secret in r["text"] for r in planted.leaks)
    assert all(r["memorised"] for r in planted.leaks)  # ... but a sample holding a canary is a leak, however short
    assert "too few" in planted.note  # the rankings cannot be compared on so few memorised samples


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_mia_and_extract_commands_write_reports(lab: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mia"
    rc, text, _ = _cli(["privacy", "mia", str(lab["target"]), "--reference", str(lab["ref"]), "--max-docs", "40",
                        "--neighbours", "2", "--bootstrap", "50", "--out", str(out)], capsys)
    assert rc == 0 and "loss" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["experiment"] == "privacy mia" and len(rep["model_sha256"]) == 64
    assert rep["config"]["max_docs"] == 40
    attacks = rep["results"]["attacks"]
    assert set(attacks) == set(ATTACKS)
    assert all(0 <= a["auc"] <= 1 and "tpr_at_0.1pct" in a and "low" in a["auc_ci"] for a in attacks.values())
    assert "data:image/png;base64," in (out / "report.html").read_text()
    assert (out / "report.md").read_text().startswith("# llmlab privacy mia")
    out = tmp_path / "extract"
    rc, _, _ = _cli(["privacy", "extract", str(lab["target"]), "--samples", "16", "--length", "24", "-k", "16",
                     "--top", "10", "--out", str(out)], capsys)
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["results"]["precision"]) == {"perplexity", "zlib", "lowercase", "window"}
    assert len(rep["results"]["samples"]) == rep["results"]["n_unique"]


def _one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_mia_bad_input(lab: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    splits = run_splits(lab["target"])
    # a non-member file that overlaps the training set
    leaky = _write(tmp_path / "leaky.jsonl", splits.train[:10] + random_docs(10, seed=5))
    rc, _, err = _cli(["privacy", "mia", str(lab["target"]), "--nonmembers", str(leaky), "--out",
                       str(tmp_path / "a")], capsys)
    _one_line_error(rc, err, "50.0%", "--allow-overlap")
    assert not (tmp_path / "a" / "report.json").exists()
    rc, _, err = _cli(["privacy", "mia", str(lab["target"]), "--nonmembers", str(leaky), "--allow-overlap",
                       "--max-docs", "20", "--neighbours", "1", "--bootstrap", "10", "--out", str(tmp_path / "b")],
                      capsys)
    assert rc == 0 and "50.0%" in err
    assert json.loads((tmp_path / "b" / "report.json").read_text())["results"]["nonmember_overlap"] == 0.5
    # a run without its training split recorded
    bare = tmp_path / "bare"
    shutil.copytree(lab["target"], bare)
    cfg = json.loads((bare / "config.json").read_text())
    del cfg["data"]
    (bare / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PrivacyError, match="training split"):
        run_splits(bare)
    for verb in ("mia", "extract"):
        rc, _, err = _cli(["privacy", verb, str(bare), "--out", str(tmp_path / verb)], capsys)
        _one_line_error(rc, err, "training split")


def test_hf_folder_needs_its_splits_given(tiny_gpt2_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _cli(["privacy", "mia", str(tiny_gpt2_dir), "--out", str(tmp_path / "x")], capsys)
    _one_line_error(rc, err, "training split", "--members")
