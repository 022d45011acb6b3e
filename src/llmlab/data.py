"""Corpora and batches: read text from files, folders, globs, JSONL or the built-in default corpus, split
it into train/val, tokenize once into cached numpy memmaps, and draw reproducible batches."""

from __future__ import annotations

import glob as globlib
import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmlab.checkpoint import atomic_write_bytes, atomic_write_json
from llmlab.errors import DataError
from llmlab.tokenizers import BPETokenizer, CharTokenizer, Tokenizer, WordPieceTokenizer, load_tokenizer

TEXT_SUFFIXES = (".txt", ".md")
DOC_SPLIT_MIN_DOCS = 10  # with fewer documents the split is by characters
DEFAULT_SOURCE = "default:pydoc_data.topics"  # how a run records that it used the built-in corpus


def default_corpus() -> list[str]:
    """The Python language reference shipped with every CPython (`pydoc_data.topics`): one document per
    topic, in sorted topic order (about 465 KB of English prose and code)."""
    from pydoc_data.topics import topics

    return [topics[k].strip() + "\n" for k in sorted(topics)]


def _decode(raw: bytes, name: str, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{name} is not UTF-8 text (bad byte at offset {e.start}); convert it, or pass "
                        "--encoding-errors replace") from None


def _read_text(path: Path, errors: str) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    if b"\x00" in raw[:8192] and errors == "strict":
        at = raw.index(b"\x00")
        raise DataError(f"{path} looks binary (NUL byte at offset {at}); give a text file")
    return _decode(raw, str(path), errors)


def read_jsonl(path: str | Path, required: Sequence[str] = (), example: str = "", errors: str = "strict"
               ) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file. A line that is not a JSON object, or
    lacks one of the `required` fields, raises a DataError naming the file, the line and `example` (the
    shape one line should have)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file" + (f"; give a JSONL file with one {example} per line" if example else ""))
    shape = f"; write one {example} per line" if example else ""
    rows = []
    for n, line in enumerate(_read_text(p, errors).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n} is not valid JSON ({e.msg}); fix that line") from None
        if not isinstance(obj, dict):
            what = f"has no field {required[0]!r}: it" if required else ""
            raise DataError(f"{p}:{n} {what} is not a JSON object{shape}".replace("  ", " "))
        missing = [f for f in required if f not in obj]
        if missing:
            raise DataError(f"{p}:{n} has no field {missing[0]!r}{shape}")
        rows.append((n, obj))
    return rows


def _read_jsonl(path: Path, field: str, errors: str) -> list[str]:
    docs = []
    for n, obj in read_jsonl(path, (field,), f'{{"{field}": ...}} (name the text field with --text-field)', errors):
        if not isinstance(obj[field], str):
            raise DataError(f"{path}:{n}: field {field!r} is not a string")
        docs.append(obj[field])
    return docs


def load_corpus(data: str | None = None, text_field: str = "text", encoding_errors: str = "strict",
                flag: str = "--data") -> list[str]:
    """Documents of a corpus: None = the built-in default; a text file (one document); a folder or glob
    of .txt/.md files (one document each, sorted by path); a .jsonl file (`text_field` of each line).
    `flag` is the option the path came from, named in error messages."""
    if encoding_errors not in ("strict", "replace", "ignore"):
        raise DataError(f"--encoding-errors {encoding_errors!r} is not one of strict, replace, ignore")
    if data is None or data == "default":
        return default_corpus()
    p = Path(data)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"folder {p} has no .txt or .md files; point {flag} at text files")
    elif p.is_file():
        files = [p]
    elif any(ch in data for ch in "*?["):
        files = sorted(Path(f) for f in globlib.glob(data, recursive=True) if Path(f).is_file())
        if not files:
            raise DataError(f"the glob {data!r} matches no files")
    else:
        raise DataError(f"{flag} {data}: no such file or folder")
    docs: list[str] = []
    for f in files:
        if f.suffix.lower() == ".jsonl":
            docs.extend(_read_jsonl(f, text_field, encoding_errors))
        else:
            docs.append(_read_text(f, encoding_errors))
    if not any(d.strip() for d in docs):
        raise DataError(f"the corpus {data} is empty; give a file with some text")
    return docs


SPLITS = ("end", "random", "chunks")
SPLIT_CHUNK_CHARS = 256  # the piece size of the "chunks" split


def split_corpus(docs: list[str], val_fraction: float = 0.1, mode: str = "end", seed: int = 0
                 ) -> tuple[list[str], list[str]]:
    """Deterministic train/val split.

    end     taken from the end (as nanoGPT does): the last documents when there are at least 10, else the
            last characters of the joined text. Val is then the corpus's tail: a shifted sample of it.
    random  documents drawn i.i.d. (a seeded permutation) when there are at least 10, else as "chunks".
    chunks  the joined text cut into pieces of SPLIT_CHUNK_CHARS characters, a seeded random
            ceil(fraction * n) of them held out: i.i.d. pieces, and the fraction holds in characters.
    Membership inference needs "random" or "chunks": members and non-members from the same distribution."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if mode not in SPLITS:
        raise DataError(f"--split {mode!r} is not one of {', '.join(SPLITS)}")
    docs = [d for d in docs if d]
    if mode == "random" and len(docs) >= DOC_SPLIT_MIN_DOCS:
        n_val = max(1, math.ceil(len(docs) * val_fraction))
        perm = np.random.default_rng(seed).permutation(len(docs))
        val_idx = set(perm[:n_val].tolist())
        return ([d for i, d in enumerate(docs) if i not in val_idx], [d for i, d in enumerate(docs) if i in val_idx])
    if mode in ("random", "chunks"):
        text = "".join(docs)
        pieces = [text[i:i + SPLIT_CHUNK_CHARS] for i in range(0, len(text), SPLIT_CHUNK_CHARS)]
        if len(pieces) < 2:
            raise DataError("the corpus is too short to split into train and val; give more text")
        n_val = min(len(pieces) - 1, max(1, math.ceil(len(pieces) * val_fraction)))
        val_idx = set(np.random.default_rng(seed).permutation(len(pieces))[:n_val].tolist())
        return ([c for i, c in enumerate(pieces) if i not in val_idx],
                [c for i, c in enumerate(pieces) if i in val_idx])
    if len(docs) >= DOC_SPLIT_MIN_DOCS:
        n_val = max(1, math.ceil(len(docs) * val_fraction))
        return docs[:-n_val], docs[-n_val:]
    text = "".join(docs)
    cut = int(len(text) * (1 - val_fraction))
    if cut == 0 or cut == len(text):
        raise DataError("the corpus is too short to split into train and val; give more text")
    return [text[:cut]], [text[cut:]]


def train_tokenizer(kind: str, train_docs: list[str], vocab_size: int = 1024,
                    specials: Sequence[str] = ()) -> Tokenizer:
    """A tokenizer of `kind` (char | bpe | wordpiece) trained on the train split only; `specials` are extra
    special tokens (e.g. "<|mask|>", sentinels) whose spelling names their role."""
    if kind == "char":
        return CharTokenizer.train("".join(train_docs), unk="replace", specials=specials)
    if kind == "bpe":
        return BPETokenizer.train(train_docs, vocab_size=vocab_size,
                                  specials=["<|endoftext|>", *[s for s in specials if s != "<|endoftext|>"]])
    if kind == "wordpiece":
        return _train_wordpiece(train_docs, vocab_size, specials)
    raise DataError(f"--tokenizer {kind!r} is not one of char, bpe, wordpiece")


def _train_wordpiece(train_docs: list[str], vocab_size: int, specials: Sequence[str]) -> Tokenizer:
    """A cased BERT-style WordPiece tokenizer ([CLS] text [SEP] with add_special_tokens) trained on docs."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers


    base = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    hf = HFTokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
    hf.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=False,
                                               lowercase=False)
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                        special_tokens=base + [s for s in specials if s not in base],
                                        continuing_subword_prefix="##")
    hf.train_from_iterator(train_docs, trainer=trainer)
    WordPieceTokenizer._set_template(hf, Path("wordpiece"))
    return WordPieceTokenizer(hf)


def encode_docs(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """All documents as one id array, documents separated by the end-of-text token when there is one."""
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    eos = tok.eos_id
    parts: list[np.ndarray] = []
    for ids in tok.encode_batch(docs):
        parts.append(np.asarray(ids, dtype=dtype))
        if eos is not None:
            parts.append(np.asarray([eos], dtype=dtype))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def cache_dir() -> Path:
    return Path(os.environ.get("LLMLAB_CACHE", Path.home() / ".cache" / "llmlab"))


@dataclass
class TokenizedCorpus:
    """Token ids of the train and val splits (memmaps) and the tokenizer that made them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    data_hash: str
    n_train_docs: int
    n_val_docs: int


def prepare(data: str | None, tokenizer: str = "char", vocab_size: int = 1024, val_fraction: float = 0.1,
            text_field: str = "text", encoding_errors: str = "strict", use_cache: bool = True, split: str = "end",
            split_seed: int = 0) -> TokenizedCorpus:
    """Read, split, train the tokenizer on train, tokenize both splits; reuse the cached memmaps when the
    same data and settings were prepared before."""
    docs = load_corpus(data, text_field, encoding_errors)
    train_docs, val_docs = split_corpus(docs, val_fraction, split, split_seed)
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode("utf-8", "surrogatepass")).digest())
    data_hash = h.hexdigest()
    key = hashlib.sha256(json.dumps([data_hash, tokenizer, vocab_size, val_fraction, 1]
                                           + ([split, split_seed] if split != "end" else [])).encode()).hexdigest()[:24]
    folder = cache_dir() / "tokens" / key
    if use_cache and (folder / "meta.json").is_file():
        try:
            meta = json.loads((folder / "meta.json").read_text())
            tok = load_tokenizer(folder / "tokenizer")
            dt = np.dtype(meta["dtype"])
            tr = np.memmap(folder / "train.bin", dtype=dt, mode="r")
            va = np.memmap(folder / "val.bin", dtype=dt, mode="r")
            return TokenizedCorpus(tr, va, tok, data_hash, len(train_docs), len(val_docs))
        except Exception:  # noqa: BLE001 - a broken cache is rebuilt, never trusted
            pass
    tok = train_tokenizer(tokenizer, train_docs, vocab_size)
    tr, va = encode_docs(tok, train_docs), encode_docs(tok, val_docs)
    if use_cache:
        try:
            tok.save(folder / "tokenizer")
            atomic_write_bytes(folder / "train.bin", tr.tobytes())
            atomic_write_bytes(folder / "val.bin", va.tobytes())
            atomic_write_json(folder / "meta.json", {"dtype": str(tr.dtype), "data_hash": data_hash})
            tr = np.memmap(folder / "train.bin", dtype=tr.dtype, mode="r")
            va = np.memmap(folder / "val.bin", dtype=va.dtype, mode="r")
        except OSError:
            pass  # an unwritable cache only costs time
    return TokenizedCorpus(tr, va, tok, data_hash, len(train_docs), len(val_docs))


class BatchSampler:
    """Random windows of block_size+1 tokens from an id array, drawn from a seeded generator so a run
    (and a resumed run) sees the same batches. With world_size > 1 every rank draws the same global
    batch and keeps its own slice."""

    def __init__(self, ids: np.ndarray, block_size: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if len(ids) <= block_size + 1:
            raise DataError(f"the split has {len(ids)} tokens, fewer than one block of {block_size + 1}; "
                            "give more text or a smaller --block-size")
        if batch_size % world_size:
            raise DataError(f"batch size {batch_size} is not divisible by {world_size} processes")
        self.ids, self.block, self.batch = ids, block_size, batch_size
        self.rank, self.world = rank, world_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of shape (batch/world, block): y is x shifted by one token."""
        starts = torch.randint(len(self.ids) - self.block - 1, (self.batch,), generator=self.gen)
        per = self.batch // self.world
        starts = starts[self.rank * per:(self.rank + 1) * per].tolist()
        buf = np.stack([np.asarray(self.ids[s:s + self.block + 1], dtype=np.int64) for s in starts])
        t = torch.from_numpy(buf)
        return t[:, :-1], t[:, 1:]

    def state(self) -> torch.Tensor:
        return self.gen.get_state()

    def set_state(self, s: torch.Tensor) -> None:
        self.gen.set_state(s)


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), mask (B, T)) right-padded to the longest sequence."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask
