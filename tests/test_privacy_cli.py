"""`llmlab privacy canary|dedup` end to end (tiny settings), and the bad inputs every sub-command must refuse
with one line naming the fix and exit status 2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmlab.cli import main

# the model/training fields as flags and through --set
TINY = ["--n-layer", "1", "--n-head", "2", "--set", "n_embd=32", "--block-size", "32",
        "--set", "eval_interval=40", "--eval-iters", "2", "--threads", "1", "--max-iters", "40"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))


def _corpus(path: Path, docs: int = 20, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "sun moon star sky sea land tree leaf rock sand wind rain snow fire".split()
    rows = ["\n".join(" ".join(rng.choice(words) for _ in range(6)) for _ in range(15)) for _ in range(docs)]
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(rc: int, err: str, *words: str) -> None:
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_canary_command_writes_a_report_and_remeasures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _corpus(tmp_path / "c.jsonl")
    out = tmp_path / "exp"
    rc, text, _ = _cli(["privacy", "canary", "--data", str(data), "--format", "pin {d}{d}{d}", "--repeats", "2,8",
                        "--per-count", "1", "--controls", "2", "--out", str(out), *TINY], capsys)
    assert rc == 0 and "exposure" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["experiment"] == "privacy canary" and len(rep["model_sha256"]) == 64
    res = rep["results"]
    assert res["space_size"] == 1000 and res["method"] == "exact"
    assert sorted(c["repeats"] for c in res["canaries"]) == [0, 0, 2, 8]
    for c in res["canaries"]:
        assert 0 <= c["exposure"] <= res["max_exposure"] + 1e-9 and 1 <= c["rank"] <= 1000
    assert rep["config"]["repeats"] == [2, 8] and rep["config"]["train"]["max_iters"] == 40
    assert rep["config"]["train"]["n_layer"] == 1 and rep["config"]["train"]["n_embd"] == 32
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2 and "exposure" in (out / "report.md").read_text()
    assert (out / "run" / "model.safetensors").is_file() and (out / "canaries.json").is_file()
    # measure the same run again, by estimate, with the canaries found next to it
    again = tmp_path / "again"
    rc, _, _ = _cli(["privacy", "canary", "--run", str(out / "run"), "--estimate", "--samples", "500",
                     "--out", str(again)], capsys)
    assert rc == 0
    est = json.loads((again / "report.json").read_text())["results"]
    assert est["method"] == "estimate" and est["samples"] == 500
    assert [c["secret"] for c in est["canaries"]] == [c["secret"] for c in res["canaries"]]
    # `llmlab report` lists both
    rc, listing, _ = _cli(["report", str(tmp_path), "--json"], capsys)
    assert rc == 0 and {i["experiment"] for i in json.loads(listing)} == {"privacy canary"}
    # the canary folder already holds a run: refused, nothing overwritten
    before = (out / "run" / "model.safetensors").read_bytes()
    rc, _, err = _cli(["privacy", "canary", "--data", str(data), "--out", str(out), *TINY], capsys)
    _one_line_error(rc, err, "already exists", "--run")
    assert (out / "run" / "model.safetensors").read_bytes() == before


def test_dedup_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _corpus(tmp_path / "c.jsonl", docs=12)
    rows = [json.loads(x)["text"] for x in data.read_text().splitlines()]
    rows += [rows[0], "my PIN is 123456\n" + rows[1], "my PIN is 123456\nfresh text here"]
    data.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    out = tmp_path / "dd"
    rc, _, _ = _cli(["privacy", "dedup", "--data", str(data), "--out", str(out)], capsys)
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())["results"]
    # exact: the copy of document 0 goes; every repeated line after its first occurrence goes
    assert rep["docs_in"] == 15 and rep["exact_docs_removed"] == 1 and rep["repeated_lines_removed"] == 16
    kept = [json.loads(x)["text"] for x in (out / "corpus.jsonl").read_text().splitlines()]
    assert sum(k.count("my PIN is 123456") for k in kept) == 1 and "fresh text here" in kept
    assert len(kept) == rep["docs_out"] == 14
    # near: MinHash finds the copy and the copy with one line added
    rc, _, _ = _cli(["privacy", "dedup", "--data", str(data), "--mode", "near", "--out", str(tmp_path / "n")], capsys)
    rep = json.loads((tmp_path / "n" / "report.json").read_text())["results"]
    assert rc == 0 and rep["near_docs_removed"] == 2 and rep["docs_out"] == 13


@pytest.mark.parametrize("argv,words", [
    (["--format", "my PIN is 1234"], ["no secret slot", "{d}"]),
    (["--format", "code {d}{d}{d}{d}{d}{d}{d}"], ["10,000,000 candidates", "--estimate"]),
    (["--format", "code {q}"], ["unknown slot"]),
    (["--repeats", "1,x"], ["--repeats"]),
])
def test_canary_bad_input(argv: list[str], words: list[str], tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    data = _corpus(tmp_path / "c.jsonl")
    rc, _, err = _cli(["privacy", "canary", "--data", str(data), "--out", str(tmp_path / "x"), *TINY, *argv], capsys)
    _one_line_error(rc, err, *words)
    assert not (tmp_path / "x" / "run").exists()  # refused before any training


def test_other_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _cli(["privacy", "canary", "--run", str(tmp_path), "--out", str(tmp_path / "x")], capsys)
    _one_line_error(rc, err, "canaries.json", "--canaries")
    rc, _, err = _cli(["privacy", "compare", str(tmp_path / "nope"), str(tmp_path), "--out", str(tmp_path / "y")],
                      capsys)
    _one_line_error(rc, err, "not a folder")
    rc, _, err = _cli(["privacy", "dedup", "--data", str(tmp_path / "missing.txt")], capsys)
    _one_line_error(rc, err, "no such file")


def test_defence_is_the_spelling_and_defense_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    from llmlab.cli import build_parser

    p = build_parser()
    assert p.parse_args(["privacy", "canary", "--defence", "dp"]).defence == "dp"
    assert p.parse_args(["privacy", "canary", "--defense", "dedup"]).defence == "dedup"  # the old spelling
    assert p.parse_args(["privacy", "canary"]).defence == "none"
    with pytest.raises(SystemExit):
        main(["privacy", "canary", "--help"])
    text = capsys.readouterr().out
    assert "--defence {none,dedup,dp}" in text and "--defense" not in text and "with --defence dp" in text


# ----------------------------------------------------------------------------- reports from Python


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny canary experiment run from Python (no argparse anywhere)."""
    import torch

    from llmlab.security.privacy.canary import CanaryConfig, run_canary_experiment

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lib")
    data = _corpus(root / "c.jsonl")
    cfg = CanaryConfig(format="pin {d}{d}{d}", repeats=(4,), per_count=1, controls=1, data=str(data), max_chars=0,
                       train=dict(n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=16, max_iters=30,
                                  eval_interval=30, eval_iters=2, num_samples=0, threads=1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(root / "cache"))
        exp = run_canary_experiment(cfg, root / "exp")
    return {"root": root, "exp": exp, "data": data}


def _report(folder: Path) -> dict:
    assert (folder / "report.html").is_file() and (folder / "report.md").is_file()
    return json.loads((folder / "report.json").read_text())


def test_privacy_reports_are_built_by_the_library(experiment: dict) -> None:
    from llmlab.security.privacy.canary import load_canaries, measure_exposure
    from llmlab.security.privacy.common import run_splits
    from llmlab.security.privacy.compare import compare_runs
    from llmlab.security.privacy.extract import ExtractConfig, run_extract
    from llmlab.security.privacy.mia import MIAConfig, run_mia
    from llmlab.security.privacy.report import (
        canary_summary,
        write_canary_report,
        write_compare_report,
        write_extract_report,
        write_mia_report,
    )
    from llmlab.security.targets import WhiteBox

    root, exp = experiment["root"], experiment["exp"]
    rep = _report(write_canary_report(exp, root / "canary"))
    assert rep["experiment"] == "privacy canary" and rep["summary"] == canary_summary(exp.exposure)
    assert rep["model"] == exp.run and len(rep["model_sha256"]) == 64 and rep["config"]["repeats"] == [4]
    assert sorted(c["repeats"] for c in rep["results"]["canaries"]) == [0, 4] and rep["results"]["training"]
    # the exposure of canaries in a run measured again, reported the same way
    fmt, canaries = load_canaries(root / "exp" / "canaries.json")
    wb = WhiteBox.load(exp.run)
    again = measure_exposure(wb, fmt, canaries)
    rep = _report(write_canary_report(again, root / "again", run=exp.run, config={"run": exp.run}))
    assert rep["results"]["run"] == exp.run and rep["results"]["training"] == {}
    splits = run_splits(exp.run)
    mcfg = MIAConfig(max_docs=10, neighbours=1, bootstrap=10)
    rep = _report(write_mia_report(run_mia(wb, splits.train, splits.val, mcfg), root / "mia", run=exp.run))
    assert rep["experiment"] == "privacy mia" and rep["config"]["max_docs"] == 10
    assert rep["summary"].startswith("best attack") and "loss" in rep["results"]["attacks"]
    assert "TPR at lowest FPR" in (root / "mia" / "report.md").read_text()
    ecfg = ExtractConfig(samples=8, length=16, top=4, window=8)
    res = run_extract(wb, splits.train, ecfg, canaries=[c.secret for c in canaries])
    rep = _report(write_extract_report(res, root / "extract", run=exp.run))
    assert rep["experiment"] == "privacy extract" and rep["config"]["samples"] == 8
    assert set(rep["results"]["precision"]) == set(rep["results"]["precision_ci"])
    res = compare_runs(root / "exp", root / "exp", mia_config=mcfg)
    rep = _report(write_compare_report(res, root / "compare"))
    assert rep["experiment"] == "privacy compare" and rep["results"]["val_loss"]["cost"] == 0
    assert rep["config"] == {"baseline": exp.run, "defended": exp.run}


def test_dedup_report_from_python_without_the_cli(tmp_path: Path) -> None:
    """A Python caller gets the deduplicated corpus and its report without importing llmlab.cli."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from llmlab.security.privacy.dedup import dedup_docs\n"
        "from llmlab.security.privacy.report import write_dedup_report\n"
        "docs = ['a line that repeats here\\nfirst', 'a line that repeats here\\nsecond', 'another document']\n"
        "kept, info = dedup_docs(docs, mode='exact')\n"
        f"write_dedup_report(kept, info, {str(tmp_path / 'dd')!r}, config={{'mode': 'exact'}})\n"
        "assert 'llmlab.cli' not in sys.modules, 'the CLI was imported'\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rep = _report(tmp_path / "dd")
    assert rep["experiment"] == "privacy dedup" and rep["results"]["docs_out"] == 3
    assert rep["summary"] == "3 -> 3 documents, " + f"{rep['results']['chars_removed_fraction']:.1%}" + \
        " of the characters removed"
    kept = [json.loads(x)["text"] for x in (tmp_path / "dd" / "corpus.jsonl").read_text().splitlines()]
    assert kept == ["a line that repeats here\nfirst", "second", "another document"]
