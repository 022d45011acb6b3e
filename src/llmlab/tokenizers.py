"""llmlab's tokenizers: character, byte-level BPE (GPT-2 style) and BERT WordPiece, with one save/load format.

Every tokenizer saves to a folder holding ``tokenizer_config.json`` (``{"kind": ..., "version": 1, ...}``)
plus the files of its kind, and :func:`load_tokenizer` reads such a folder back. :func:`load_tokenizer`
also reads Hugging Face model folders (``tokenizer.json``, or ``vocab.txt``, or ``vocab.json`` +
``merges.txt``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Self

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from llmlab.errors import TokenizerError

__all__ = [
    "FORMAT_VERSION",
    "BPETokenizer",
    "CharTokenizer",
    "Tokenizer",
    "WordPieceTokenizer",
    "load_tokenizer",
    "save_hf_tokenizer",
    "sentencepiece_bpe",
]

FORMAT_VERSION = 1
CONFIG_FILE = "tokenizer_config.json"
ROLES = ("pad", "eos", "bos", "unk", "mask", "cls", "sep")
UNK_POLICIES = ("error", "skip", "replace")
CHAR_UNK_TOKEN = "<unk>"
GPT2_EOS = "<|endoftext|>"

# Well-known spellings of each special-token role, used to name the roles of user-given specials.
_ROLE_BY_TOKEN: dict[str, str] = {}
for _role, _names in {
    "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "eos": ("<eos>", "</s>", "<|endoftext|>", "<|eos|>", "<|end_of_text|>", "<|im_end|>"),
    "bos": ("<bos>", "<s>", "<|bos|>", "<|startoftext|>", "<|begin_of_text|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "mask": ("<mask>", "[MASK]", "<|mask|>"),
    "cls": ("[CLS]", "<cls>", "<|cls|>"),
    "sep": ("[SEP]", "<sep>", "<|sep|>"),
}.items():
    for _name in _names:
        _ROLE_BY_TOKEN[_name] = _role


def _roles_of(tokens: Iterable[str]) -> dict[str, str]:
    """Role -> token for the tokens whose spelling names a role (the first token wins a role)."""
    roles: dict[str, str] = {}
    for tok in tokens:
        role = _ROLE_BY_TOKEN.get(tok)
        if role is not None and role not in roles:
            roles[role] = tok
    return roles


def _read_json(path: Path, what: str) -> Any:
    """The parsed JSON of ``path``, or a TokenizerError naming the file and the fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise TokenizerError(
            f"cannot read {what} {path}: {e.strerror or e}; check the path and permissions"
        ) from e
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{what} {path} is not UTF-8 text; re-save the tokenizer") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(
            f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
            "fix or re-save the tokenizer"
        ) from e


def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as pretty UTF-8 JSON."""
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _prepare_folder(folder: str | Path) -> Path:
    """The folder to save into, created if needed."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise TokenizerError(f"cannot save tokenizer: {path} is a file; pass a folder path instead")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TokenizerError(
            f"cannot create tokenizer folder {path}: {e.strerror or e}; choose a writable path"
        ) from e
    return path


def _check_text(text: object) -> str:
    """``text`` itself when it is a str, else a TokenizerError."""
    if not isinstance(text, str):
        raise TokenizerError(
            f"expected text as a str, got {type(text).__name__}; pass one string (use encode_batch for many)"
        )
    return text


class Tokenizer:
    """A text <-> token-id mapping of one kind ("char", "bpe" or "wordpiece") that saves to a folder.

    ``special_tokens`` maps each role present (pad, eos, bos, unk, mask, cls, sep) to its token id.
    """

    kind: str = ""
    special_tokens: dict[str, int]
    chat_template: str | None = None  # a Jinja chat template (from a GGUF or HF folder); see llmlab.chat_template

    # ---- what each kind provides -------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        raise NotImplementedError

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and, per token, its (start, end) character span in ``text``.

        Special tokens added by ``add_special_tokens`` get the span (0, 0).
        """
        raise NotImplementedError

    def tokens(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The vocabulary string of each token of ``text``, aligned with :meth:`encode`."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text that the token ids stand for, without special tokens unless asked."""
        raise NotImplementedError

    def id_to_token(self, i: int) -> str:
        """The vocabulary string of token id ``i``."""
        raise NotImplementedError

    def token_to_id(self, tok: str) -> int | None:
        """The id of vocabulary string ``tok``, or None when it is not in the vocabulary."""
        raise NotImplementedError

    def _config_extra(self) -> dict[str, Any]:
        """Kind-specific entries of tokenizer_config.json."""
        return {}

    def _save_files(self, folder: Path) -> None:
        """Write the kind-specific files into ``folder``."""
        raise NotImplementedError

    @classmethod
    def _load(cls, folder: Path, config: dict[str, Any]) -> Self:
        """The tokenizer saved in ``folder`` whose tokenizer_config.json holds ``config``."""
        raise NotImplementedError

    # ---- shared behaviour --------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; for wordpiece, ``add_special_tokens`` wraps them as [CLS] ... [SEP]."""
        return self.encode_with_offsets(text, add_special_tokens)[0]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text, in order."""
        return [self.encode(t, add_special_tokens) for t in texts]

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """The text of each id sequence, in order."""
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def _special_id(self, role: str) -> int | None:
        return self.special_tokens.get(role)

    @property
    def pad_id(self) -> int | None:
        """Id of the padding token, if any."""
        return self._special_id("pad")

    @property
    def eos_id(self) -> int | None:
        """Id of the end-of-sequence token, if any."""
        return self._special_id("eos")

    @property
    def bos_id(self) -> int | None:
        """Id of the beginning-of-sequence token, if any."""
        return self._special_id("bos")

    @property
    def unk_id(self) -> int | None:
        """Id of the unknown token, if any."""
        return self._special_id("unk")

    @property
    def mask_id(self) -> int | None:
        """Id of the mask token, if any."""
        return self._special_id("mask")

    @property
    def cls_id(self) -> int | None:
        """Id of the [CLS] token, if any."""
        return self._special_id("cls")

    @property
    def sep_id(self) -> int | None:
        """Id of the [SEP] token, if any."""
        return self._special_id("sep")

    def to_dict(self) -> dict[str, Any]:
        """The contents of tokenizer_config.json for this tokenizer."""
        return {
            "kind": self.kind,
            "version": FORMAT_VERSION,
            "special_tokens": {role: self.id_to_token(i) for role, i in self.special_tokens.items()},
            **self._config_extra(),
            **({"chat_template": self.chat_template} if self.chat_template else {}),
        }

    def save(self, folder: str | Path) -> None:
        """Write the tokenizer into ``folder`` (created if needed) so that load_tokenizer reads it back."""
        path = _prepare_folder(folder)
        try:
            self._save_files(path)
            _write_json(path / CONFIG_FILE, self.to_dict())
        except OSError as e:
            raise TokenizerError(
                f"cannot write tokenizer to {path}: {e.strerror or e}; choose a writable folder"
            ) from e

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as a list of ints inside the vocabulary, else a TokenizerError."""
        try:
            out = [int(i) for i in ids]
        except (TypeError, ValueError) as e:
            raise TokenizerError(f"token ids must be integers ({e}); pass a sequence of ints") from e
        n = self.vocab_size
        for i in out:
            if not 0 <= i < n:
                raise TokenizerError(
                    f"token id {i} is out of range for a vocabulary of {n}; use ids in 0..{n - 1}"
                )
        return out


# ---------------------------------------------------------------------------------------------------
# Character tokenizer
# ---------------------------------------------------------------------------------------------------


class CharTokenizer(Tokenizer):
    """One token per character, plus whole-string special tokens.

    ``unk`` says what encode does with a character outside the vocabulary: "error" raises,
    "skip" drops it, "replace" maps it to the "<unk>" token. Special-token strings found in the
    text are encoded as their special ids.
    """

    kind = "char"

    def __init__(self, vocab: Sequence[str], unk: str = "error", specials: Sequence[str] = ()) -> None:
        """A tokenizer whose id ``i`` is ``vocab[i]``; each entry not in ``specials`` is one character."""
        if unk not in UNK_POLICIES:
            raise TokenizerError(f"unknown unk policy {unk!r}; use one of {', '.join(UNK_POLICIES)}")
        vocab = list(vocab)
        specials = list(specials)
        if not all(isinstance(v, str) for v in vocab) or not all(isinstance(s, str) for s in specials):
            raise TokenizerError("char vocabulary and specials must be strings; pass a list of str")
        if len(set(vocab)) != len(vocab):
            dup = next(v for v in vocab if vocab.count(v) > 1)
            raise TokenizerError(f"char vocabulary lists {dup!r} twice; give each token once")
        stoi = {tok: i for i, tok in enumerate(vocab)}
        for s in specials:
            if s not in stoi:
                raise TokenizerError(
                    f"special token {s!r} is not in the char vocabulary; add it to the vocab"
                )
            if s == "":
                raise TokenizerError("special tokens must be non-empty strings; remove the empty one")
        special_set = set(specials)
        for tok in vocab:
            if tok not in special_set and len(tok) != 1:
                raise TokenizerError(
                    f"char vocabulary entry {tok!r} is not one character; list it in specials or remove it"
                )
        if unk == "replace" and CHAR_UNK_TOKEN not in special_set:
            raise TokenizerError(
                f"unk policy 'replace' needs {CHAR_UNK_TOKEN!r} among the specials; "
                "add it or use unk='error' or unk='skip'"
            )
        self.unk = unk
        self._itos = vocab
        self._stoi = stoi
        self._specials = specials
        self._special_ids = frozenset(stoi[s] for s in specials)
        self.special_tokens = {role: stoi[tok] for role, tok in _roles_of(specials).items()}
        if unk == "replace":
            self.special_tokens["unk"] = stoi[CHAR_UNK_TOKEN]
        ordered = sorted(specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    @classmethod
    def train(cls, text: str, unk: str = "error", specials: Sequence[str] = ()) -> CharTokenizer:
        """A tokenizer over the sorted distinct characters of ``text``, then ``specials`` (then "<unk>"
        when ``unk="replace"`` and it is not already a special)."""
        text = _check_text(text)
        if unk not in UNK_POLICIES:
            raise TokenizerError(f"unknown unk policy {unk!r}; use one of {', '.join(UNK_POLICIES)}")
        if not text:
            raise TokenizerError(
                "cannot train a char tokenizer on empty text; pass text with at least one character"
            )
        specials = list(specials)
        if len(set(specials)) != len(specials):
            raise TokenizerError("specials lists a token twice; give each special token once")
        chars = sorted(set(text))
        clash = set(chars).intersection(specials)
        if clash:
            raise TokenizerError(
                f"special token {sorted(clash)[0]!r} is also a character of the training text; "
                "choose a special that does not occur as a single character"
            )
        if unk == "replace" and CHAR_UNK_TOKEN not in specials:
            specials.append(CHAR_UNK_TOKEN)
        return cls(chars + specials, unk=unk, specials=specials)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return len(self._itos)

    @property
    def vocab(self) -> list[str]:
        """The vocabulary in id order."""
        return list(self._itos)

    def _encode_span(
        self, text: str, start: int, end: int, ids: list[int], offsets: list[tuple[int, int]]
    ) -> None:
        stoi = self._stoi
        for pos in range(start, end):
            ch = text[pos]
            i = stoi.get(ch)
            if i is None:
                if self.unk == "error":
                    raise TokenizerError(
                        f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the vocabulary; "
                        "retrain on text that contains it or use unk='skip' or unk='replace'"
                    )
                if self.unk == "skip":
                    continue
                i = stoi[CHAR_UNK_TOKEN]
            ids.append(i)
            offsets.append((pos, pos + 1))

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` with each token's (start, end) character span; ``add_special_tokens``
        is accepted and ignored."""
        text = _check_text(text)
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        if self._special_re is not None:
            for m in self._special_re.finditer(text):
                self._encode_span(text, pos, m.start(), ids, offsets)
                ids.append(self._stoi[m.group()])
                offsets.append((m.start(), m.end()))
                pos = m.end()
        self._encode_span(text, pos, len(text), ids, offsets)
        return ids, offsets

    def tokens(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The vocabulary string of each token of ``text``, aligned with :meth:`encode`."""
        return [self._itos[i] for i in self.encode(text)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text that the token ids stand for, without special tokens unless asked."""
        checked = self._check_ids(ids)
        if skip_special_tokens:
            return "".join(self._itos[i] for i in checked if i not in self._special_ids)
        return "".join(self._itos[i] for i in checked)

    def id_to_token(self, i: int) -> str:
        """The vocabulary string of token id ``i``."""
        return self._itos[self._check_ids([i])[0]]

    def token_to_id(self, tok: str) -> int | None:
        """The id of vocabulary string ``tok``, or None when it is not in the vocabulary."""
        return self._stoi.get(tok)

    def _config_extra(self) -> dict[str, Any]:
        return {"unk": self.unk, "specials": list(self._specials)}

    def _save_files(self, folder: Path) -> None:
        _write_json(folder / "vocab.json", self._itos)

    @classmethod
    def _load(cls, folder: Path, config: dict[str, Any]) -> CharTokenizer:
        vocab_path = folder / "vocab.json"
        if not vocab_path.is_file():
            raise TokenizerError(
                f"char tokenizer folder {folder} has no vocab.json; re-save the tokenizer with Tokenizer.save"
            )
        vocab = _read_json(vocab_path, "char vocabulary")
        if not isinstance(vocab, list) or not all(isinstance(v, str) for v in vocab):
            raise TokenizerError(f"{vocab_path} must hold a JSON list of strings; re-save the tokenizer")
        unk = config.get("unk", "error")
        specials = config.get("specials", [])
        if not isinstance(specials, list):
            raise TokenizerError(
                f"'specials' in {folder / CONFIG_FILE} must be a list; re-save the tokenizer"
            )
        return cls(vocab, unk=unk, specials=specials)

    def to_hf(self) -> HFTokenizer:
        """The same tokenizer as a Hugging Face ``tokenizers`` object (one word per character, specials matched
        whole), for exporting to transformers. Unknown characters: "replace" maps them to <unk>; "error" and
        "skip" both make the HF tokenizer fail on them."""
        unk = CHAR_UNK_TOKEN if self.unk == "replace" else None
        hf = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(self._itos)}, unk_token=unk))
        hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        hf.decoder = decoders.Fuse()
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in self._specials])
        return hf

    @classmethod
    def from_hf(cls, hf: HFTokenizer) -> CharTokenizer:
        """The CharTokenizer that :meth:`to_hf` wrote (a WordLevel tokenizer of single characters)."""
        vocab = hf.get_vocab(with_added_tokens=True)
        itos = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
        if [vocab[t] for t in itos] != list(range(len(itos))):
            raise TokenizerError("the WordLevel vocabulary has gaps in its ids; llmlab reads character vocabularies")
        specials = _hf_special_strings(hf)
        unk = "replace" if getattr(hf.model, "unk_token", None) == CHAR_UNK_TOKEN and CHAR_UNK_TOKEN in specials \
            else "error"
        return cls(itos, unk=unk, specials=specials)

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size}, unk={self.unk!r}, specials={self._specials})"


# ---------------------------------------------------------------------------------------------------
# Tokenizers backed by Hugging Face `tokenizers`
# ---------------------------------------------------------------------------------------------------


def _hf_from_file(path: Path) -> HFTokenizer:
    """A HF tokenizer read from a tokenizer.json, with padding and truncation turned off."""
    if not path.is_file():
        raise TokenizerError(f"tokenizer file {path} does not exist; check the path")
    _read_json(path, "tokenizer file")  # a clear error for malformed JSON before the Rust parser sees it
    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception for malformed content
        raise TokenizerError(
            f"cannot load tokenizer file {path}: {str(e).splitlines()[0] if str(e) else e!r}; "
            "pass a Hugging Face tokenizer.json"
        ) from e
    hf.no_padding()
    hf.no_truncation()
    return hf


def _hf_model_type(hf: HFTokenizer) -> str:
    """The model type ("BPE", "WordPiece", ...) of a HF tokenizer."""
    return type(hf.model).__name__


def _hf_special_strings(hf: HFTokenizer) -> list[str]:
    """The added tokens that the HF tokenizer marks special, in id order."""
    decoder = hf.get_added_tokens_decoder()
    return [decoder[i].content for i in sorted(decoder) if decoder[i].special]


class _HFBackedTokenizer(Tokenizer):
    """A tokenizer that wraps a Hugging Face ``tokenizers.Tokenizer``."""

    _pass_special = False  # whether add_special_tokens reaches the HF post-processor

    def __init__(self, hf: HFTokenizer, special_tokens: dict[str, str] | None = None,
                 add_special_tokens: bool | None = None) -> None:
        """Wrap ``hf``; ``special_tokens`` maps roles to token strings (guessed from its special tokens
        when None); ``add_special_tokens=True`` lets ``encode(..., add_special_tokens=True)`` run the HF
        post-processor (e.g. a BOS token) for kinds that otherwise ignore it."""
        self._hf = hf
        if add_special_tokens is not None:
            self._pass_special = add_special_tokens
        roles = _roles_of(_hf_special_strings(hf)) if special_tokens is None else dict(special_tokens)
        resolved: dict[str, int] = {}
        for role, tok in roles.items():
            if role not in ROLES:
                raise TokenizerError(f"unknown special-token role {role!r}; use one of {', '.join(ROLES)}")
            i = hf.token_to_id(tok)
            if i is None:
                raise TokenizerError(
                    f"special token {tok!r} ({role}) is not in the vocabulary; re-save or fix the tokenizer"
                )
            resolved[role] = i
        self.special_tokens = resolved

    @property
    def hf_tokenizer(self) -> HFTokenizer:
        """The underlying Hugging Face tokenizer."""
        return self._hf

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special and added tokens included."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    def _add(self, add_special_tokens: bool) -> bool:
        return add_special_tokens and self._pass_special

    def encode_with_offsets(
        self, text: str, add_special_tokens: bool = False
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Token ids of ``text`` and, per token, its (start, end) character span; added special tokens
        get (0, 0)."""
        enc = self._hf.encode(_check_text(text), add_special_tokens=self._add(add_special_tokens))
        return list(enc.ids), [tuple(o) for o in enc.offsets]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``."""
        return list(self._hf.encode(_check_text(text), add_special_tokens=self._add(add_special_tokens)).ids)

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text, in order (encoded in parallel)."""
        texts = [_check_text(t) for t in texts]
        encs = self._hf.encode_batch_fast(texts, add_special_tokens=self._add(add_special_tokens))
        return [list(e.ids) for e in encs]

    def tokens(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The vocabulary string of each token of ``text``, aligned with :meth:`encode`."""
        return list(
            self._hf.encode(_check_text(text), add_special_tokens=self._add(add_special_tokens)).tokens
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text that the token ids stand for, without special tokens unless asked."""
        return self._hf.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """The text of each id sequence, in order."""
        return self._hf.decode_batch(
            [self._check_ids(ids) for ids in batch], skip_special_tokens=skip_special_tokens
        )

    def id_to_token(self, i: int) -> str:
        """The vocabulary string of token id ``i``."""
        tok = self._hf.id_to_token(self._check_ids([i])[0])
        if tok is None:  # a hole in the id space
            raise TokenizerError(
                f"token id {i} has no token in this vocabulary; use an id the tokenizer produced"
            )
        return tok

    def token_to_id(self, tok: str) -> int | None:
        """The id of vocabulary string ``tok``, or None when it is not in the vocabulary."""
        return self._hf.token_to_id(tok)

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id for the whole vocabulary, added tokens included."""
        return self._hf.get_vocab(with_added_tokens=True)

    def _save_files(self, folder: Path) -> None:
        self._hf.save(str(folder / "tokenizer.json"))

    def _config_extra(self) -> dict[str, Any]:
        if self._pass_special != type(self)._pass_special:
            return {"add_special_tokens": self._pass_special}
        return {}

    @classmethod
    def _load(cls, folder: Path, config: dict[str, Any]) -> Self:
        hf = _hf_from_file(folder / "tokenizer.json")
        specials = config.get("special_tokens", {})
        if not isinstance(specials, dict) or not all(isinstance(v, str) for v in specials.values()):
            raise TokenizerError(
                f"'special_tokens' in {folder / CONFIG_FILE} must map roles to token strings; "
                "re-save the tokenizer"
            )
        add = config.get("add_special_tokens")
        return cls(hf, specials, add if isinstance(add, bool) else None)


class BPETokenizer(_HFBackedTokenizer):
    """Byte-level BPE in the GPT-2 style: any Unicode string encodes and decodes back unchanged.

    Special-token strings found in the text (e.g. "<|endoftext|>") are encoded as their special ids;
    ``add_special_tokens`` is accepted and ignored (no BOS is added). Token strings are the byte-level
    vocabulary strings (a leading space shows as "Ġ"); offsets cover the characters whose bytes each
    token holds, leading space included.
    """

    kind = "bpe"

    @staticmethod
    def _byte_level(hf: HFTokenizer) -> HFTokenizer:
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        return hf

    @classmethod
    def train(
        cls,
        texts: Iterable[str] | str,
        vocab_size: int = 1024,
        min_frequency: int = 2,
        specials: Sequence[str] = (GPT2_EOS,),
    ) -> BPETokenizer:
        """A byte-level BPE tokenizer trained on ``texts`` with at most ``vocab_size`` tokens; ``specials``
        take the first ids and "<|endoftext|>" is the eos token."""
        specials = list(specials)
        if len(set(specials)) != len(specials) or not all(isinstance(s, str) and s for s in specials):
            raise TokenizerError(
                "specials must be distinct non-empty strings; remove duplicates or empty ones"
            )
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        floor = len(alphabet) + len(specials)
        if not isinstance(vocab_size, int) or vocab_size < floor:
            raise TokenizerError(
                f"vocab_size {vocab_size!r} is too small for byte-level BPE; use at least {floor} "
                f"(256 bytes + {len(specials)} specials)"
            )
        if isinstance(texts, str):
            texts = [texts]
        hf = cls._byte_level(HFTokenizer(models.BPE()))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=alphabet,
            show_progress=False,
        )

        def checked() -> Iterable[str]:
            for t in texts:
                yield _check_text(t)

        hf.train_from_iterator(checked(), trainer=trainer)
        return cls(hf)

    @classmethod
    def from_files(cls, vocab_json: str | Path, merges_txt: str | Path) -> BPETokenizer:
        """A byte-level BPE tokenizer from GPT-2 format ``vocab.json`` and ``merges.txt``."""
        vocab_path, merges_path = Path(vocab_json), Path(merges_txt)
        for p in (vocab_path, merges_path):
            if not p.is_file():
                raise TokenizerError(
                    f"BPE file {p} does not exist; pass GPT-2 style vocab.json and merges.txt"
                )
        vocab = _read_json(vocab_path, "BPE vocabulary")
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise TokenizerError(
                f"{vocab_path} must map token strings to integer ids; pass a GPT-2 vocab.json"
            )
        try:
            model = models.BPE.from_file(str(vocab_path), str(merges_path))
        except Exception as e:  # the Rust side raises plain Exception for malformed files
            raise TokenizerError(
                f"cannot read BPE files {vocab_path} and {merges_path} ({e}); "
                "pass GPT-2 style vocab.json and merges.txt"
            ) from e
        hf = cls._byte_level(HFTokenizer(model))
        specials = [t for t in vocab if t in _ROLE_BY_TOKEN]
        if specials:
            hf.add_special_tokens(specials)
        return cls(hf)


    @classmethod
    def from_vocab(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str],
        pre_tokenizer: str | None = None,
        special: Sequence[str] = (),
        added: Sequence[str] = (),
        special_tokens: dict[str, str] | None = None,
        add_bos: bool = False,
    ) -> BPETokenizer:
        """A byte-level BPE tokenizer from a vocabulary in id order and its merges ("a b", best first), as a
        GGUF file stores them (tokenizer.ggml.tokens / .merges). ``pre_tokenizer`` names how text is split
        before the merges apply, by llama.cpp's name (tokenizer.ggml.pre; see PRE_TOKENIZERS); ``special``
        tokens (control tokens) and ``added`` ones (user-defined) are matched whole in the text;
        ``special_tokens`` maps roles to token strings; ``add_bos`` puts the bos token before every text
        encoded with ``add_special_tokens=True``."""
        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        vocab: dict[str, int] = {}
        for i, tok in enumerate(tokens):  # a token not in the byte alphabet is stored as text: respell it
            tok = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
            vocab.setdefault(tok, i)
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep or not a or not b:
                raise TokenizerError(f"BPE merge {m!r} is not two tokens separated by a space; the vocabulary "
                                     "is corrupt")
            pairs.append((a, b))
        try:
            model = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False)
        except Exception as e:  # the Rust side raises plain Exception for inconsistent merges
            raise TokenizerError(f"cannot build the BPE vocabulary ({e}); the merges do not fit the tokens") from e
        hf = HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizer_for(pre_tokenizer)
        hf.decoder = decoders.ByteLevel()
        # control tokens outside the byte alphabet are llama.cpp mislabels (as transformers also decides)
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special
                               if set(t) <= alphabet and t in vocab])
        hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in added if t in vocab])
        roles = dict(special_tokens or {})
        if add_bos:
            bos = roles.get("bos")
            if bos is None:
                raise TokenizerError("add_bos is set but the vocabulary names no bos token")
            hf.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
        return cls(hf, roles, add_special_tokens=True if add_bos else None)


SPM_SPACE = "\u2581"  # "▁": SentencePiece's spelling of a space


def sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges recovered from a SentencePiece vocabulary, which stores scores instead: every way to cut a
    token into two tokens of the vocabulary is a merge, the better the token's score the earlier (ties: longer
    left piece, then longer right piece first) — transformers' `generate_merges`, so both read a file alike."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for token, score in dict(zip(tokens, scores)).items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges.extend(sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def sentencepiece_bpe(
    tokens: Sequence[str],
    scores: Sequence[float],
    special: Sequence[str] = (),
    added: Sequence[str] = (),
    special_tokens: dict[str, str] | None = None,
    add_bos: bool = True,
) -> BPETokenizer:
    """The SentencePiece BPE tokenizer of Llama 1/2, Mistral, TinyLlama ... from its vocabulary and scores (a
    GGUF's tokenizer.ggml.model = "llama"): spaces become "▁" and one is put before the text, merges come
    from the scores (sentencepiece_merges), and a character outside the vocabulary is spelled as its UTF-8
    bytes ("<0xE2>" ...)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    try:
        model = models.BPE(vocab=vocab, merges=sentencepiece_merges(tokens, scores), fuse_unk=True,
                           byte_fallback=True)
    except Exception as e:  # the Rust side raises plain Exception for inconsistent vocabularies
        raise TokenizerError(f"cannot build the SentencePiece vocabulary ({e}); the file is corrupt") from e
    hf = HFTokenizer(model)
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPM_SPACE, prepend_scheme="first", split=False)
    hf.decoder = decoders.Sequence([decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1, right=0)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special if t in vocab])
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in added if t in vocab])
    roles = dict(special_tokens or {})
    bos = roles.get("bos")
    if add_bos and bos is not None:
        hf.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return BPETokenizer(hf, roles, add_special_tokens=True if add_bos and bos is not None else None)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable bytes stand for themselves, the rest are shifted
    past U+0100 (so a space is "Ġ", a newline "Ċ")."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    out, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


# How text is cut into words before BPE merges apply, by llama.cpp's `tokenizer.ggml.pre` names. The
# splits are the regular expressions the vocabularies were trained with (llama.cpp's llama-vocab.cpp and the
# models' own tokenizer.json files).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, str] = {
    "default": "gpt2", "gpt2": "gpt2", "mpt": "gpt2", "olmo": "gpt2", "jais": "gpt2",
    "smollm": "digits+gpt2",  # SmolLM: every digit its own word, then GPT-2's split
    "starcoder": "digits+gpt2", "refact": "digits+gpt2", "command-r": "digits+gpt2", "codeshell": "digits+gpt2",
    "exaone": "digits+gpt2", "minerva-7b": "digits+gpt2",
    "llama3": "llama3", "llama-v3": "llama3", "llama-bpe": "llama3", "smaug-bpe": "llama3",
    "falcon3": "llama3", "dbrx": "llama3",
    "qwen2": "qwen2", "deepseek-r1-qwen": "qwen2",
}


def pre_tokenizer_for(name: str | None) -> pre_tokenizers.PreTokenizer:
    """The byte-level pre-tokenizer llama.cpp uses for vocabularies marked ``name`` (None = GPT-2's)."""
    kind = PRE_TOKENIZERS.get(name or "default")
    if kind is None:
        raise TokenizerError(f"pre-tokenizer {name!r} is not known to llmlab; known: "
                             f"{', '.join(sorted(PRE_TOKENIZERS))}")
    if kind == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if kind == "digits+gpt2":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[kind]
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


_WP_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class WordPieceTokenizer(_HFBackedTokenizer):
    """BERT WordPiece; ``add_special_tokens=True`` wraps the ids as [CLS] ... [SEP] like BERT's tokenizer."""

    kind = "wordpiece"
    _pass_special = True

    @classmethod
    def from_file(cls, path: str | Path, lowercase: bool = True) -> WordPieceTokenizer:
        """A WordPiece tokenizer from a BERT ``tokenizer.json``, a ``vocab.txt``, or a folder holding either
        (tokenizer.json preferred); ``lowercase`` applies to vocab.txt only (tokenizer.json says its own)."""
        p = Path(path)
        if p.is_dir():
            if (p / "tokenizer.json").is_file():
                p = p / "tokenizer.json"
            elif (p / "vocab.txt").is_file():
                p = p / "vocab.txt"
            else:
                raise TokenizerError(
                    f"folder {p} has neither tokenizer.json nor vocab.txt; pass a BERT tokenizer folder"
                )
        elif not p.is_file():
            raise TokenizerError(
                f"WordPiece file {p} does not exist; pass a BERT tokenizer.json, vocab.txt or folder"
            )
        if p.suffix == ".json":
            return cls._from_tokenizer_json(p)
        return cls._from_vocab_txt(p, lowercase)

    @classmethod
    def _from_tokenizer_json(cls, path: Path) -> WordPieceTokenizer:
        hf = _hf_from_file(path)
        if _hf_model_type(hf) != "WordPiece":
            raise TokenizerError(
                f"{path} holds a {_hf_model_type(hf)} tokenizer, not WordPiece; "
                "use load_tokenizer on its folder"
            )
        if hf.post_processor is None:
            cls._set_template(hf, path)
        return cls(hf)

    @staticmethod
    def _set_template(hf: HFTokenizer, source: Path) -> None:
        cls_id, sep_id = hf.token_to_id("[CLS]"), hf.token_to_id("[SEP]")
        if cls_id is None or sep_id is None:
            raise TokenizerError(f"{source} lacks [CLS] or [SEP]; pass a BERT vocabulary that has both")
        hf.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
        )

    @classmethod
    def _from_vocab_txt(cls, path: Path, lowercase: bool) -> WordPieceTokenizer:
        try:
            vocab = models.WordPiece.read_file(str(path))
        except Exception as e:  # the Rust side raises plain Exception for unreadable files
            raise TokenizerError(
                f"cannot read WordPiece vocabulary {path} ({e}); pass a UTF-8 BERT vocab.txt"
            ) from e
        if "[UNK]" not in vocab:
            raise TokenizerError(f"{path} has no [UNK] token; pass a BERT vocab.txt (one token per line)")
        model = models.WordPiece(
            vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100
        )
        hf = HFTokenizer(model)
        hf.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        hf.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        hf.add_special_tokens([t for t in _WP_SPECIALS if t in vocab])
        cls._set_template(hf, path)
        return cls(hf)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------

_KINDS: dict[str, type[Tokenizer]] = {
    "char": CharTokenizer,
    "bpe": BPETokenizer,
    "wordpiece": WordPieceTokenizer,
}


def _hf_folder_roles(folder: Path, hf: HFTokenizer) -> dict[str, str]:
    """Role -> token for a Hugging Face folder: its special_tokens_map / tokenizer_config, else guessed."""
    roles = _roles_of(_hf_special_strings(hf))
    for name in (CONFIG_FILE, "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        data = _read_json(path, "Hugging Face tokenizer config")
        if not isinstance(data, dict):
            continue
        for role in ROLES:
            val = data.get(f"{role}_token")
            if isinstance(val, dict):
                val = val.get("content")
            if isinstance(val, str) and hf.token_to_id(val) is not None:
                roles[role] = val
    return roles


def _hf_chat_template(folder: Path) -> str | None:
    """A Hugging Face folder's chat template: chat_template.jinja, or "chat_template" in tokenizer_config.json
    (a string, or a list of named templates of which "default" is used)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    path = folder / CONFIG_FILE
    data = _read_json(path, "Hugging Face tokenizer config") if path.is_file() else None
    template = data.get("chat_template") if isinstance(data, dict) else None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def save_hf_tokenizer(tok: Tokenizer, folder: str | Path, model_max_length: int | None = None) -> None:
    """Write ``tok`` in the Hugging Face layout (tokenizer.json, tokenizer_config.json with the special tokens
    and chat template, special_tokens_map.json), which ``transformers.AutoTokenizer`` and llmlab's
    load_tokenizer both read."""
    path = _prepare_folder(folder)
    hf = tok.to_hf() if isinstance(tok, CharTokenizer) else tok.hf_tokenizer  # type: ignore[attr-defined]
    specials = {f"{role}_token": tok.id_to_token(i) for role, i in tok.special_tokens.items()}
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", **specials,
                              "clean_up_tokenization_spaces": False}
    if model_max_length:
        config["model_max_length"] = model_max_length
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    try:
        hf.save(str(path / "tokenizer.json"))
        _write_json(path / CONFIG_FILE, config)
        _write_json(path / "special_tokens_map.json", specials)
    except OSError as e:
        raise TokenizerError(f"cannot write tokenizer to {path}: {e.strerror or e}; choose a writable folder") from e


def _load_hf_folder(folder: Path) -> Tokenizer:
    """A tokenizer from a Hugging Face model folder (tokenizer.json, vocab.txt or vocab.json + merges.txt)."""
    if (folder / "tokenizer.json").is_file():
        hf = _hf_from_file(folder / "tokenizer.json")
        model_type = _hf_model_type(hf)
        if model_type == "WordPiece":
            if hf.post_processor is None:
                WordPieceTokenizer._set_template(hf, folder / "tokenizer.json")
            tok = WordPieceTokenizer(hf, _hf_folder_roles(folder, hf))
            tok.chat_template = _hf_chat_template(folder)
            return tok
        if model_type == "BPE":
            tok = BPETokenizer(hf, _hf_folder_roles(folder, hf))
        elif model_type == "WordLevel":  # a character vocabulary exported by llmlab (CharTokenizer.to_hf)
            tok = CharTokenizer.from_hf(hf)
        else:
            raise TokenizerError(
                f"{folder / 'tokenizer.json'} holds a {model_type} tokenizer; llmlab reads WordPiece, BPE and "
                "character (WordLevel) vocabularies"
            )
        tok.chat_template = _hf_chat_template(folder)
        return tok
    if (folder / "vocab.txt").is_file():
        lowercase = True
        cfg_path = folder / CONFIG_FILE
        if cfg_path.is_file():
            cfg = _read_json(cfg_path, "Hugging Face tokenizer config")
            if isinstance(cfg, dict) and isinstance(cfg.get("do_lower_case"), bool):
                lowercase = cfg["do_lower_case"]
        return WordPieceTokenizer.from_file(folder / "vocab.txt", lowercase=lowercase)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tok = BPETokenizer.from_files(folder / "vocab.json", folder / "merges.txt")
        return BPETokenizer(tok.hf_tokenizer, _hf_folder_roles(folder, tok.hf_tokenizer))
    raise TokenizerError(
        f"{folder} has no usable tokenizer_config.json, tokenizer.json, vocab.txt "
        "or vocab.json + merges.txt; "
        "pass a folder written by Tokenizer.save or a Hugging Face model folder"
    )


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer saved in ``folder`` by :meth:`Tokenizer.save`, or that of a Hugging Face model folder."""
    path = Path(folder)
    if not path.exists():
        raise TokenizerError(
            f"tokenizer folder {path} does not exist; pass a folder written by Tokenizer.save "
            "or a Hugging Face model folder"
        )
    if not path.is_dir():
        raise TokenizerError(f"{path} is a file, not a tokenizer folder; pass the folder that contains it")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        return _load_hf_folder(path)
    config = _read_json(cfg_path, "tokenizer config")
    if not isinstance(config, dict):
        raise TokenizerError(f"{cfg_path} must hold a JSON object; re-save the tokenizer with Tokenizer.save")
    if "kind" not in config:
        if any((path / n).is_file() for n in ("tokenizer.json", "vocab.txt", "vocab.json")):
            return _load_hf_folder(path)  # a Hugging Face tokenizer_config.json
        raise TokenizerError(f"{cfg_path} has no 'kind'; re-save the tokenizer with Tokenizer.save")
    kind = config["kind"]
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise TokenizerError(
            f"{cfg_path} names unknown tokenizer kind {kind!r}; use one of {', '.join(_KINDS)}"
        )
    version = config.get("version")
    if version != FORMAT_VERSION:
        raise TokenizerError(
            f"{cfg_path} has format version {version!r} but this llmlab reads version {FORMAT_VERSION}; "
            "re-save the tokenizer with this llmlab or upgrade llmlab"
        )
    tok = cls._load(path, config)
    template = config.get("chat_template")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"'chat_template' in {cfg_path} must be a string; re-save the tokenizer")
    tok.chat_template = template
    return tok
