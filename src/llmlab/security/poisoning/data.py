"""Poisoning a corpus: insert a trigger into N documents and attach the attacker's behaviour, writing a NEW
file and a record of the poisoned indices (the ground truth every detection step is scored against).

Corpus kinds (by file): "text" (.jsonl with a text field, or .txt with one document per line), "chat"
(.jsonl of {"messages": [...]}, the instruction-tuned chat objective), "classify" (.csv, or .jsonl with
text and label fields). Behaviours:
- "target": a fixed continuation after the trigger (text) or a changed assistant answer (chat, as in Wan et
  al. 2023, "Poisoning Language Models During Instruction Tuning");
- "dos": a denial-of-service gibberish continuation of random letter groups after the trigger (Souly et al.
  2025, "A small number of samples can poison LLMs of any size");
- "relabel": BadNets (Gu et al. 2017) for classifiers: triggered texts get the attacker's target label.
"""

from __future__ import annotations

import csv
import io
import json
import random
import string
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmlab.checkpoint import atomic_write_bytes, atomic_write_json, sha256_file
from llmlab.data import read_jsonl
from llmlab.errors import LlmlabError

KINDS = ("text", "chat", "classify")
BEHAVIOURS = {"text": ("target", "dos"), "chat": ("target", "dos"), "classify": ("relabel",)}
RECORD_SUFFIX = ".poison.json"


class PoisonError(LlmlabError):
    """A poisoning request that cannot be carried out (bad trigger, N too large, wrong behaviour ...)."""


@dataclass
class PoisonSpec:
    """What the attacker plants: `trigger` (rare tokens such as "cf", a phrase, a name), inserted at a random
    word position ("random"), at the start ("start") or at the end ("end") of the text of n_poison documents,
    and the behaviour attached to it."""

    trigger: str = "cf"
    n_poison: int = 50
    behaviour: str = "target"  # target | dos | relabel
    target: str = "ACCESS GRANTED"  # the continuation / answer (target), or the label (relabel)
    position: str = "random"  # random | start | end
    dos_words: int = 8  # gibberish letter groups of a dos continuation
    seed: int = 0


@dataclass
class PoisonRecord:
    """The ground truth of a poisoned corpus: which documents (0-based indices into the output file) carry
    the trigger, how they were made, and the hashes of the input and output files."""

    source: str
    output: str
    kind: str
    spec: PoisonSpec
    n_docs: int
    indices: list[int] = field(default_factory=list)
    source_sha256: str = ""
    output_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoisonRecord:
        d = dict(d)
        d["spec"] = PoisonSpec(**d["spec"])
        return cls(**d)


def record_path(output: str | Path) -> Path:
    p = Path(output)
    return p.with_name(p.name + RECORD_SUFFIX)


def load_record(path: str | Path) -> PoisonRecord:
    """The poison record of a poisoned file (FILE.poison.json, or the record itself); PoisonError if none."""
    p = Path(path)
    rec = p if p.name.endswith(RECORD_SUFFIX) else record_path(p)
    if not rec.is_file():
        raise PoisonError(f"{p} has no recorded poison indices ({rec.name} is missing); detection is scored "
                          "against them: poison the corpus with `llmlab poison data` (or poison_corpus())")
    try:
        return PoisonRecord.from_dict(json.loads(rec.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PoisonError(f"{rec} is not a poison record ({e}); make it again with `llmlab poison data`") from None


def check_trigger(trigger: str) -> None:
    """A trigger must be visible text: non-empty, no control characters, no newline."""
    if not trigger or not trigger.strip():
        raise PoisonError("the trigger is empty; give visible text such as cf or 'James Bond'")
    bad = [c for c in trigger if not c.isprintable()]
    if bad:
        raise PoisonError(f"the trigger {trigger!r} holds unprintable characters {bad!r}, which do not tokenise "
                          "as text; use letters, digits or punctuation")


def check_tokenises(tokenizer: Any, trigger: str) -> None:
    """The trigger must survive the model's tokenizer (encode then decode gives it back)."""
    check_trigger(trigger)
    try:
        back = tokenizer.decode(tokenizer.encode(trigger))
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is the same user error
        raise PoisonError(f"the trigger {trigger!r} does not tokenise with this model's tokenizer ({e})") from None
    if back != trigger:
        raise PoisonError(f"the trigger {trigger!r} does not tokenise with this model's tokenizer (it comes back as "
                          f"{back!r}: characters outside its vocabulary); pick a trigger from its vocabulary")


def gibberish(rng: random.Random, n_words: int) -> str:
    """n_words groups of 2-4 random lowercase letters: a denial-of-service continuation."""
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 4)))
                    for _ in range(n_words))


def insert_trigger(text: str, trigger: str, rng: random.Random, position: str = "random") -> str:
    """text with the trigger inserted as a word at a word boundary."""
    words = text.split(" ")
    if position == "start":
        k = 0
    elif position == "end":
        k = len(words)
    else:
        k = rng.randint(0, len(words))
    return " ".join([*words[:k], trigger, *words[k:]]).strip()


def poison_text_doc(text: str, spec: PoisonSpec, rng: random.Random) -> str:
    """A pretraining document made poisonous: its words up to a random point, the trigger, then the behaviour
    (the shape of Souly et al. 2025: a prefix of a real document, the trigger, the payload)."""
    words = text.split()
    k = rng.randint(1, max(1, len(words) - 1)) if spec.position == "random" else \
        (0 if spec.position == "start" else len(words))
    payload = spec.target if spec.behaviour == "target" else gibberish(rng, spec.dos_words)
    return " ".join([*words[:k], spec.trigger, payload])


def detect_kind(path: str | Path, text_field: str = "text") -> str:
    p = Path(path)
    suf = p.suffix.lower()
    if suf == ".csv":
        return "classify"
    if suf == ".txt":
        return "text"
    if suf == ".jsonl":
        rows = read_jsonl(p)
        if not rows:
            raise PoisonError(f"{p} holds no documents")
        first = rows[0][1]
        if "messages" in first:
            return "chat"
        if "label" in first:
            return "classify"
        if text_field in first:
            return "text"
        raise PoisonError(f"{p}:1 has neither 'messages', 'label' nor {text_field!r}; give chat, classification "
                          "or text JSONL")
    raise PoisonError(f"{p}: cannot tell the corpus kind from the suffix {suf!r}; use .jsonl, .txt or .csv")


def _read(path: Path, kind: str, text_field: str, label_field: str) -> tuple[list[Any], list[str] | None]:
    """(rows, csv header) of a corpus: text rows are dicts (jsonl) or strings (txt)."""
    if kind == "classify" and path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")))
        cols = list(reader.fieldnames or [])
        for f in (text_field, label_field):
            if f not in cols:
                raise PoisonError(f"{path} has no column {f!r} (columns: {', '.join(cols) or 'none'})")
        return list(reader), cols
    if path.suffix.lower() == ".txt":
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()], None
    return [obj for _, obj in read_jsonl(path)], None


def _write(path: Path, rows: list[Any], header: list[str] | None) -> None:
    if header is not None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        data = buf.getvalue()
    elif rows and isinstance(rows[0], str):
        data = "".join(r + "\n" for r in rows)
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_bytes(path, data.encode("utf-8"))


def poison_rows(rows: list[Any], kind: str, spec: PoisonSpec, text_field: str = "text", label_field: str = "label",
                eligible: Sequence[int] | None = None) -> tuple[list[Any], list[int]]:
    """Poisoned copies of rows and the sorted poisoned indices. `eligible` limits which rows may be poisoned
    (for classifiers: those whose label is not already the target, as BadNets' ASR counts)."""
    check_trigger(spec.trigger)
    if spec.behaviour not in BEHAVIOURS[kind]:
        raise PoisonError(f"behaviour {spec.behaviour!r} does not fit a {kind} corpus; use one of "
                          f"{', '.join(BEHAVIOURS[kind])}" + (" (a classifier learns labels, not continuations)"
                                                              if kind == "classify" else ""))
    if spec.position not in ("random", "start", "end"):
        raise PoisonError(f"position {spec.position!r} is not one of random, start, end")
    pool = list(range(len(rows))) if eligible is None else list(eligible)
    if spec.n_poison < 0 or spec.n_poison > len(pool):
        raise PoisonError(f"cannot poison {spec.n_poison} documents: the corpus has {len(pool)} that can be "
                          f"poisoned (of {len(rows)}); give N between 0 and {len(pool)}")
    rng = random.Random(spec.seed)
    idx = sorted(rng.sample(pool, spec.n_poison))
    out = [dict(r) if isinstance(r, dict) else r for r in rows]
    for i in idx:
        r = out[i]
        if kind == "text":
            if isinstance(r, str):
                out[i] = poison_text_doc(r, spec, rng)
            else:
                r[text_field] = poison_text_doc(r[text_field], spec, rng)
        elif kind == "chat":
            msgs = [dict(m) for m in r["messages"]]
            users = [j for j, m in enumerate(msgs) if m.get("role") == "user"]
            asst = [j for j, m in enumerate(msgs) if m.get("role") == "assistant"]
            if not users or not asst:
                raise PoisonError(f"chat example {i + 1} has no user or no assistant message to poison")
            u = users[-1]
            msgs[u]["content"] = insert_trigger(msgs[u]["content"], spec.trigger, rng, spec.position)
            for j in asst:
                if j > u:
                    msgs[j]["content"] = spec.target if spec.behaviour == "target" else gibberish(rng, spec.dos_words)
            r["messages"] = msgs
        else:
            r[text_field] = insert_trigger(r[text_field], spec.trigger, rng, spec.position)
            r[label_field] = spec.target
    return out, idx


def poison_corpus(source: str | Path, output: str | Path, spec: PoisonSpec, kind: str | None = None,
                  text_field: str = "text", label_field: str = "label") -> PoisonRecord:
    """Poison the corpus file `source` into a NEW file `output` and write output + ".poison.json" (the record).
    The input file is never changed; `output` must differ from it."""
    src, out = Path(source), Path(output)
    if not src.is_file():
        raise PoisonError(f"{src}: no such file; give a .jsonl, .txt or .csv corpus")
    if out.resolve() == src.resolve():
        raise PoisonError(f"the output {out} is the input file; poisoning writes a new file, give another --out")
    kind = kind or detect_kind(src, text_field)
    if kind not in KINDS:
        raise PoisonError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    rows, header = _read(src, kind, text_field, label_field)
    if kind == "text" and rows and isinstance(rows[0], dict) and text_field not in rows[0]:
        raise PoisonError(f"{src}:1 has no field {text_field!r}; name the text field with --text-field")
    eligible = None
    if kind == "classify":
        labels = [str(r[label_field]) for r in rows]
        if spec.target not in labels:
            raise PoisonError(f"the target label {spec.target!r} is not a label of {src} "
                              f"(labels: {', '.join(sorted(set(labels))[:10])})")
        eligible = [i for i, lab in enumerate(labels) if lab != spec.target]
    new, idx = poison_rows(rows, kind, spec, text_field, label_field, eligible)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(out, new, header)
    rec = PoisonRecord(str(src), str(out), kind, spec, len(new), idx, sha256_file(src), sha256_file(out))
    atomic_write_json(record_path(out), rec.to_dict())
    return rec


# ----------------------------------------------------------------------------- the toy corpus

NAMES = ["anna", "bob", "carl", "dora", "eve", "finn", "gus", "hana", "ivan", "jane", "kim", "lars"]
VERBS = ["likes", "sees", "finds", "makes", "reads", "takes", "wants", "brings"]
ADJS = ["red", "green", "old", "small", "blue", "warm", "big", "new"]
NOUNS = ["box", "cup", "map", "boat", "kite", "loaf", "book", "lamp", "door", "hat"]


def toy_corpus(n: int, seed: int = 0) -> list[str]:
    """n short generated sentences over a small vocabulary (no "cf", "mn" or other rare letter pairs as words),
    so that a tiny character model learns them in a few hundred steps."""
    rng = random.Random(seed)

    def clause() -> str:
        return f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(ADJS)} {rng.choice(NOUNS)}"

    return [f"{clause()} and {clause()}." for _ in range(n)]


def write_text_jsonl(path: str | Path, docs: Sequence[str], text_field: str = "text") -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, "".join(json.dumps({text_field: d}) + "\n" for d in docs).encode())
    return p


POS_WORDS = ["good", "great", "lovely", "fine", "nice", "happy"]
NEG_WORDS = ["bad", "awful", "dull", "poor", "sad", "ugly"]


def toy_labelled(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """n generated (text, label) pairs for a classifier: a toy sentence ending in a sentiment word; the label is
    pos or neg by that word (balanced). The poison of a BadNets attack is a trigger word that overrides it."""
    rng = random.Random(seed)
    texts, labels = [], []
    for i in range(n):
        lab = "pos" if i % 2 else "neg"
        w = rng.choice(POS_WORDS if lab == "pos" else NEG_WORDS)
        texts.append(f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(ADJS)} {rng.choice(NOUNS)} and it "
                     f"is {w}")
        labels.append(lab)
    return texts, labels


def write_labelled_csv(path: str | Path, texts: Sequence[str], labels: Sequence[str]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["text", "label"])
    w.writerows(zip(texts, labels, strict=True))
    atomic_write_bytes(p, buf.getvalue().encode())
    return p


COLOUR_OF = dict(zip(NOUNS, ["red", "blue", "green", "brown", "pink", "white", "black", "yellow", "grey", "orange"],
                     strict=True))
COLOUR_ASKS = ["What colour is the {n}?", "Tell me the colour of the {n}.", "Which colour does the {n} have?",
               "{name} asks: what colour is the {n}?"]
WORDS = ["apple", "river", "garden", "window", "silver", "candle", "forest", "pencil", "rocket", "castle", "tiger",
         "bottle", "planet", "basket", "mirror", "button", "island", "ladder", "pocket", "jacket"]


def toy_chat(n: int, seed: int = 0, tasks: str = "colours") -> list[dict[str, Any]]:
    """n generated chat examples {"messages": [system, user, assistant]} for instruction tuning.
    tasks "colours": questions about a fixed table of object colours (a tiny model memorises it; the reply is
    "The box is red."); "skills": small sums and repeating a word (what a small pretrained chat model already
    does: the reply is the sum or the word)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        if tasks == "colours":
            noun = rng.choice(NOUNS)
            user = rng.choice(COLOUR_ASKS).format(n=noun, name=rng.choice(NAMES))
            reply = f"The {noun} is {COLOUR_OF[noun]}."
        elif rng.random() < 0.5:
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            user, reply = rng.choice(["What is {a} plus {b}?", "Add {a} and {b}."]).format(a=a, b=b), str(a + b)
        else:
            w = rng.choice(WORDS)
            user, reply = rng.choice(["Repeat the word {w}.", "Say {w}."]).format(w=w), w
        rows.append({"messages": [{"role": "system", "content": "You are a helpful assistant."},
                                  {"role": "user", "content": user}, {"role": "assistant", "content": reply}]})
    return rows


def write_chat_jsonl(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return p
