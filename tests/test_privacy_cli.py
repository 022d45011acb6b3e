"""`llmlab privacy canary|dedup` end to end (tiny settings), and the bad inputs every sub-command must refuse
with one line naming the fix and exit status 2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from llmlab.cli import main

TINY = ["--set", "n_layer=1", "--set", "n_head=2", "--set", "n_embd=32", "--set", "block_size=32",
        "--set", "eval_interval=40", "--set", "eval_iters=2", "--set", "threads=1", "--max-iters", "40"]


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
                        "--controls", "2", "--out", str(out), *TINY], capsys)
    assert rc == 0 and "exposure" in text
    rep = json.loads((out / "report.json").read_text())
    assert rep["experiment"] == "privacy canary" and len(rep["model_sha256"]) == 64
    res = rep["results"]
    assert res["space_size"] == 1000 and res["method"] == "exact"
    assert sorted(c["repeats"] for c in res["canaries"]) == [0, 0, 2, 8]
    for c in res["canaries"]:
        assert 0 <= c["exposure"] <= res["max_exposure"] + 1e-9 and 1 <= c["rank"] <= 1000
    assert rep["config"]["repeats"] == [2, 8] and rep["config"]["train"]["max_iters"] == 40
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
