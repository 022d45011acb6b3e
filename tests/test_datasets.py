"""Built-in data sets: the pydoc topic task is deterministic, leak-free (no heading inside its own example,
no paragraph under two labels) and balanced enough to learn; word-list tasks have checkable answers; the
`llmlab dataset` verb writes CSV/JSONL atomically and refuses to clobber."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from llmlab.cli import main
from llmlab.datasets import (
    make_dataset,
    pydoc_paragraphs,
    pydoc_titles,
    pydoc_topics,
    reverse_words,
    sort_words,
)


def test_pydoc_topics_is_deterministic_and_restricted_to_n_largest() -> None:
    a, b = pydoc_topics(6, seed=3), pydoc_topics(6, seed=3)
    assert a == b
    assert pydoc_topics(6, seed=4) != a  # the seed shuffles
    assert sorted(map(str, pydoc_topics(6, seed=4))) == sorted(map(str, a))  # ... the same rows
    counts = Counter(r["label"] for r in a)
    assert len(counts) == 6
    every = Counter(p.title for p in pydoc_paragraphs())
    largest = [lab for lab, _ in sorted(every.items(), key=lambda kv: (-kv[1], kv[0]))[:6]]
    assert set(counts) == set(largest)
    assert min(counts.values()) >= 40  # enough of each class to learn from


def test_pydoc_paragraphs_do_not_leak_their_label() -> None:
    paras = pydoc_paragraphs()
    texts = [p.text for p in paras]
    assert len(texts) == len(set(texts)), "a paragraph appears twice (possibly under two labels)"
    for p in paras:
        for h in {p.title, p.heading}:  # the headings and their underlines are gone
            assert not re.search(re.escape(h) + r" [*=-]{3,}", p.text), p.text[:80]
        assert not re.fullmatch(r"[\s+=|*-]+", p.text)  # no paragraph is only a rule
        assert len(p.text) >= 60
    # pages that contain other pages: "if" paragraphs are labelled with the "if" page, not "Compound statements"
    owner = {p.text: p.title for p in paras}
    if_para = next(t for t in texts if t.startswith("It selects exactly one of the suites"))
    assert owner[if_para] == 'The "if" statement'


def test_subsection_level_uses_nearest_heading() -> None:
    rows = pydoc_topics(5, level="subsection")
    assert "Debugger Commands" in {r["label"] for r in rows}


def test_pydoc_titles_pairs() -> None:
    rows = pydoc_titles(10, max_chars=200)
    assert len({r["target"] for r in rows}) == 10
    assert all(len(r["source"]) <= 200 and r["source"] for r in rows)
    topics = {r["text"][:150]: r["label"] for r in pydoc_topics(10)}
    for r in rows[:50]:
        if r["source"][:150] in topics and len(r["source"]) >= 150:
            assert topics[r["source"][:150]] == r["target"]


def test_word_tasks_have_the_right_answers() -> None:
    rev, srt = reverse_words(300, seed=1), sort_words(300, seed=1)
    assert [r["source"] for r in rev] == [r["source"] for r in srt]  # same lists for the same seed
    for r, s in zip(rev, srt):
        words = r["source"].split()
        assert 3 <= len(words) <= 8
        assert r["target"].split() == words[::-1]
        assert s["target"].split() == sorted(words)
    assert reverse_words(50, seed=2) != reverse_words(50, seed=1)
    assert len({w for r in reverse_words(500, vocab=5) for w in r["source"].split()}) == 5


def test_unknown_name_and_bad_options_raise_data_errors() -> None:
    from llmlab.errors import DataError

    with pytest.raises(DataError, match="unknown data set"):
        make_dataset("nope")
    with pytest.raises(DataError, match="at least 2"):
        pydoc_topics(1)
    with pytest.raises(DataError, match="vocab"):
        reverse_words(10, vocab=1000)


def test_dataset_verb_writes_csv_and_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "topics.csv"
    assert main(["dataset", "pydoc-topics", "--out", str(out), "--sections", "4"]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == pydoc_topics(4)  # the CSV round-trips (commas, quotes, unicode)
    out2 = tmp_path / "rev.jsonl"
    assert main(["dataset", "reverse-words", "--out", str(out2), "-n", "7", "--seed", "5"]) == 0
    assert [json.loads(line) for line in out2.read_text().splitlines()] == reverse_words(7, seed=5)


def test_dataset_verb_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "keep.jsonl"
    out.write_text("precious\n")
    assert main(["dataset", "sort-words", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--force" in err
    assert out.read_text() == "precious\n"
    assert main(["dataset", "sort-words", "--out", str(tmp_path / "x.txt")]) == 2
    assert ".csv or .jsonl" in capsys.readouterr().err
