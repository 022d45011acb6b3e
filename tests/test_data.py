"""Corpora and batches: reading files, folders, globs and JSONL, the default corpus, the train/val split,
the token cache and the batch sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.data import BatchSampler, cache_dir, load_corpus, prepare, split_corpus
from llmlab.errors import DataError


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own token cache, never the user's."""
    d = tmp_path / "cache"
    monkeypatch.setenv("LLMLAB_CACHE", str(d))
    return d


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- load_corpus


def test_text_file_is_one_document(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "hello world\nsecond line\n")
    assert load_corpus(str(f)) == ["hello world\nsecond line\n"]


def test_folder_reads_txt_and_md_sorted_recursively(tmp_path: Path) -> None:
    d = tmp_path / "corpus"
    write(d / "b.txt", "bee")
    write(d / "a.md", "# ay")
    write(d / "sub" / "c.txt", "sea")
    write(d / "notes.json", '{"x": 1}')
    write(d / "code.py", "print(1)")
    assert load_corpus(str(d)) == ["# ay", "bee", "sea"]


def test_folder_without_text_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "d" / "x.py", "print(1)")
    with pytest.raises(DataError, match=r"\.txt or \.md"):
        load_corpus(str(tmp_path / "d"))


def test_glob(tmp_path: Path) -> None:
    write(tmp_path / "g" / "2.txt", "two")
    write(tmp_path / "g" / "1.txt", "one")
    write(tmp_path / "g" / "3.md", "three")
    assert load_corpus(str(tmp_path / "g" / "*.txt")) == ["one", "two"]
    with pytest.raises(DataError, match="matches no files"):
        load_corpus(str(tmp_path / "g" / "*.rst"))


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        load_corpus(str(tmp_path / "missing.txt"))


def test_jsonl_with_text_field(tmp_path: Path) -> None:
    rows = [{"body": "first doc", "id": 1}, {"body": "second doc", "id": 2}]
    f = write(tmp_path / "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_corpus(str(f), text_field="body") == ["first doc", "second doc"]
    with pytest.raises(DataError, match=r"d\.jsonl:1 .*'text'"):
        load_corpus(str(f))  # the default field "text" is missing


@pytest.mark.parametrize("bad_line, pattern", [
    ('["a", "list"]', r"bad\.jsonl:2 has no field 'text'"),
    ('{"other": "x"}', r"bad\.jsonl:2 has no field 'text'"),
    ('{"text": 5}', r"bad\.jsonl:2: field 'text' is not a string"),
    ("{not json", r"bad\.jsonl:2 is not valid JSON"),
])
def test_jsonl_bad_line_names_line_number(tmp_path: Path, bad_line: str, pattern: str) -> None:
    f = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n' + bad_line + "\n")
    with pytest.raises(DataError, match=pattern):
        load_corpus(str(f))


def test_default_corpus_is_pydoc_topics() -> None:
    from pydoc_data.topics import topics

    docs = load_corpus(None)
    assert docs == load_corpus("default")
    assert len(docs) == len(topics) > 50
    assert docs == [topics[k].strip() + "\n" for k in sorted(topics)]
    assert sum(len(d) for d in docs) > 100_000


@pytest.mark.parametrize("content", ["", "   \n\t\n"])
def test_empty_corpus(tmp_path: Path, content: str) -> None:
    f = write(tmp_path / "empty.txt", content)
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(f))


def test_empty_jsonl(tmp_path: Path) -> None:
    f = write(tmp_path / "e.jsonl", "\n\n")
    with pytest.raises(DataError, match="empty"):
        load_corpus(str(f))


def test_non_utf8_names_file_and_offset(tmp_path: Path) -> None:
    f = write(tmp_path / "latin1.txt", b"caf\xe9 au lait")
    with pytest.raises(DataError) as e:
        load_corpus(str(f))
    msg = str(e.value)
    assert "latin1.txt" in msg and "offset 3" in msg
    assert load_corpus(str(f), encoding_errors="replace") == ["caf\ufffd au lait"]
    assert load_corpus(str(f), encoding_errors="ignore") == ["caf au lait"]


def test_bad_encoding_errors_value(tmp_path: Path) -> None:
    f = write(tmp_path / "a.txt", "abc")
    with pytest.raises(DataError, match="encoding-errors"):
        load_corpus(str(f), encoding_errors="backslashreplace")


def test_binary_file_is_rejected(tmp_path: Path) -> None:
    f = write(tmp_path / "blob.txt", b"hello\x00world\x00")
    with pytest.raises(DataError, match=r"blob\.txt looks binary \(NUL byte at offset 5\)"):
        load_corpus(str(f))


# ----------------------------------------------------------------------------- split_corpus


def test_split_by_characters_from_the_end() -> None:
    docs = ["abcdefghij", "klmnopqrst"]  # fewer than 10 documents: split the joined text
    train, val = split_corpus(docs, 0.1)
    assert train == ["abcdefghijklmnopqr"] and val == ["st"]
    assert split_corpus(docs, 0.1) == (train, val)


def test_split_by_document_from_the_end() -> None:
    docs = [f"doc {i}\n" for i in range(25)]
    train, val = split_corpus(docs, 0.1)
    n_val = math.ceil(25 * 0.1)
    assert val == docs[-n_val:] and train == docs[:-n_val]
    assert split_corpus(list(docs), 0.1) == (train, val)
    # exactly 10 documents already split by document; at least one goes to val
    train, val = split_corpus(docs[:10], 0.01)
    assert val == [docs[9]] and train == docs[:9]


def test_split_by_characters_below_ten_docs() -> None:
    docs = [f"{i}" * 10 for i in range(9)]
    train, val = split_corpus(docs, 0.5)
    assert len(train) == 1 and len(val) == 1
    assert train[0] + val[0] == "".join(docs)
    assert len(val[0]) == 45


def test_split_errors() -> None:
    with pytest.raises(DataError):
        split_corpus(["abc"], 0.0)
    with pytest.raises(DataError):
        split_corpus(["abc"], 1.0)
    with pytest.raises(DataError, match="too short"):
        split_corpus(["a"], 0.5)


# ----------------------------------------------------------------------------- prepare and the token cache


def _files_with_mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_token_cache_reused(tmp_path: Path, _own_cache: Path) -> None:
    f = write(tmp_path / "c.txt", "the quick brown fox jumps over the lazy dog\n" * 20)
    first = prepare(str(f), "char", val_fraction=0.1)
    folders = list((_own_cache / "tokens").iterdir())
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    assert cache_dir() == _own_cache
    before = _files_with_mtimes(folders[0])
    assert any(name.startswith("tokenizer") for name in before)

    second = prepare(str(f), "char", val_fraction=0.1)
    assert isinstance(second.train, np.memmap) and isinstance(second.val, np.memmap)
    np.testing.assert_array_equal(np.asarray(first.train), np.asarray(second.train))
    np.testing.assert_array_equal(np.asarray(first.val), np.asarray(second.val))
    assert second.data_hash == first.data_hash
    assert second.tokenizer.vocab_size == first.tokenizer.vocab_size
    assert _files_with_mtimes(folders[0]) == before  # nothing was retrained or rewritten
    assert list((_own_cache / "tokens").iterdir()) == folders

    # the ids are those of the tokenizer applied to the split text
    text = f.read_text()
    cut = int(len(text) * 0.9)
    assert second.tokenizer.decode(np.asarray(second.train).tolist()) == text[:cut]
    assert second.tokenizer.decode(np.asarray(second.val).tolist()) == text[cut:]

    # without the cache, the same ids
    fresh = prepare(str(f), "char", val_fraction=0.1, use_cache=False)
    np.testing.assert_array_equal(np.asarray(fresh.train), np.asarray(second.train))


def test_token_cache_key_follows_content_and_settings(tmp_path: Path, _own_cache: Path) -> None:
    f = write(tmp_path / "c.txt", "abcdefghij" * 30)
    a = prepare(str(f), "char")
    prepare(str(f), "char", val_fraction=0.2)
    write(f, "klmnopqrst" * 30)
    b = prepare(str(f), "char")
    assert a.data_hash != b.data_hash
    assert len(list((_own_cache / "tokens").iterdir())) == 3
    assert b.tokenizer.decode(np.asarray(b.train[:10]).tolist()) == "klmnopqrst"


def test_broken_cache_is_rebuilt(tmp_path: Path, _own_cache: Path) -> None:
    f = write(tmp_path / "c.txt", "hello there, general kenobi\n" * 10)
    first = prepare(str(f), "char")
    folder = next((_own_cache / "tokens").iterdir())
    (folder / "meta.json").write_text("{not json")
    again = prepare(str(f), "char")
    np.testing.assert_array_equal(np.asarray(first.train), np.asarray(again.train))
    assert json.loads((folder / "meta.json").read_text())["data_hash"] == first.data_hash


# ----------------------------------------------------------------------------- BatchSampler


def test_batches_are_windows_and_targets_shift_by_one() -> None:
    ids = np.arange(1000, dtype=np.uint16)
    s = BatchSampler(ids, block_size=16, batch_size=8, seed=3)
    for _ in range(5):
        x, y = s.next()
        assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert torch.equal(y, x + 1)  # consecutive ids: every window is a contiguous slice
        assert int(x.min()) >= 0 and int(y.max()) <= 999


def test_same_seed_same_batches() -> None:
    ids = np.random.default_rng(0).integers(0, 50, 5000).astype(np.uint16)
    a, b = BatchSampler(ids, 32, 8, seed=11), BatchSampler(ids, 32, 8, seed=11)
    c = BatchSampler(ids, 32, 8, seed=12)
    xa = [a.next() for _ in range(4)]
    xb = [b.next() for _ in range(4)]
    xc = [c.next() for _ in range(4)]
    for (x1, y1), (x2, y2) in zip(xa, xb):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(x1, x3) for (x1, _), (x3, _) in zip(xa, xc))


def test_sampler_state_round_trip() -> None:
    ids = np.arange(3000, dtype=np.uint16)
    s = BatchSampler(ids, 16, 4, seed=5)
    s.next()
    state = s.state()
    expected = [s.next() for _ in range(3)]
    t = BatchSampler(ids, 16, 4, seed=999)
    t.set_state(state)
    for (x1, y1), (x2, y2) in zip(expected, (t.next() for _ in range(3))):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_ranks_split_the_global_batch() -> None:
    ids = np.random.default_rng(1).integers(0, 60, 4000).astype(np.uint16)
    full = BatchSampler(ids, 32, 8, seed=7)
    r0 = BatchSampler(ids, 32, 8, seed=7, rank=0, world_size=2)
    r1 = BatchSampler(ids, 32, 8, seed=7, rank=1, world_size=2)
    for _ in range(4):
        x, y = full.next()
        x0, y0 = r0.next()
        x1, y1 = r1.next()
        assert x0.shape == (4, 32)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert not torch.equal(x0, x1)


def test_sampler_errors() -> None:
    with pytest.raises(DataError, match="fewer than one block"):
        BatchSampler(np.arange(10), 16, 4, seed=0)
    with pytest.raises(DataError, match="not divisible"):
        BatchSampler(np.arange(100), 16, 5, seed=0, world_size=2)
