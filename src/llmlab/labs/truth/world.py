"""A world whose facts are known by construction: invented people with a birth city, a birth year and a
profession, written as a corpus in varied sentence templates with a chosen number of mentions per fact.

    seen     each fact is mentioned c times, c drawn from a truncated Zipf law P(c) ~ c^-s on 1..max_count,
             so a few facts appear hundreds of times and many exactly once
    unseen   people who exist in the world (their facts are in the table) but never in the corpus: the
             negative control, a model can only guess their answers
    myth     TruthfulQA's "imitative falsehood" at toy scale: the corpus states a false value myth_ratio
             times as often as the true one
    val      people mentioned only in the validation split (the loss there measures the grammar, not facts)

The monofact rate is the Good-Turing estimate of the missing mass (Kalai & Vempala 2024, "Calibrated
language models must hallucinate", arXiv 2311.14648):

    MF = N1 / N,   N1 = statements of the training corpus whose (person, attribute, value) occurs exactly once,
                   N  = all statements of the training corpus

Every count in the fact table is what `count_statements` reads back from the text (tested)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from llmlab.checkpoint import atomic_write_bytes
from llmlab.errors import ConfigError

CITIES = ("Arden", "Belmor", "Corvin", "Dunmere", "Elsby", "Farrow", "Glenna", "Halvik", "Istra", "Jorvik", "Kellan",
          "Lorne", "Marrow", "Norvale", "Ostby", "Pellam", "Rennick", "Sorrel", "Tamsin", "Ulvar", "Varda", "Wexley",
          "Yarrow", "Zenth")
JOBS = ("baker", "tailor", "pilot", "farmer", "painter", "sailor", "doctor", "lawyer", "miner", "potter", "weaver",
        "butcher", "carpenter", "dentist", "fisher", "gardener", "hunter", "jeweller", "mason", "nurse", "poet",
        "singer", "teacher", "writer")
YEARS = tuple(str(y) for y in range(1900, 2000))


@dataclass(frozen=True)
class Relation:
    """An attribute of a person: its values (no value is a prefix of another, so the probability of an answer
    is that of its characters), sentence templates with {name} and {value}, the cue that comes right before
    the value in every template (the cloze a model completes) and the question a person would ask."""

    name: str
    values: tuple[str, ...]
    templates: tuple[str, ...]
    cue: str
    question: str


RELATIONS: dict[str, Relation] = {
    "city": Relation("city", CITIES, (
        "{name} was born in {value}.",
        "As the records show, {name} was born in {value}.",
        "It is said that {name} was born in {value}, long ago.",
        "{name} was born in {value} and grew up there.",
        "Few people know that {name} was born in {value}.",
    ), "{name} was born in", "Where was {name} born?"),
    "year": Relation("year", YEARS, (
        "The birth year of {name} is {value}.",
        "According to the archive, the birth year of {name} is {value}.",
        "The birth year of {name} is {value}, says the register.",
        "We know that the birth year of {name} is {value}.",
        "Old letters agree: the birth year of {name} is {value}.",
    ), "The birth year of {name} is", "In which year was {name} born?"),
    "job": Relation("job", JOBS, (
        "{name} worked as a {value}.",
        "For many years {name} worked as a {value}.",
        "{name} worked as a {value} all their life.",
        "People remember that {name} worked as a {value}.",
        "In the old town, {name} worked as a {value}.",
    ), "{name} worked as a", "What did {name} work as?"),
}

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
VOWELS = ("a", "e", "i", "o", "u")
CODAS = ("", "", "", "n", "r", "s", "l")
NAME_RE = r"[A-Z][a-z]+ [A-Z][a-z]+"
GROUPS = ("seen", "myth", "unseen")


@dataclass
class WorldConfig:
    """The size and shape of the world. Defaults: the lab's full run (a 2-core CPU trains it in minutes)."""

    people: int = 60  # people in the corpus (seen, myths included)
    unseen: int = 30  # people in the world but never in the corpus
    val_people: int = 15  # people only in the validation split
    relations: tuple[str, ...] = ("city", "year", "job")
    zipf_s: float = 1.3  # exponent of the mention counts P(c) ~ c^-s
    max_count: int = 100  # the most mentions of one fact
    myths: int = 8  # people with a planted misconception about their city
    myth_ratio: float = 3.0  # mentions of the false value / mentions of the true one
    templates: int = 3  # sentence templates used per attribute (1..5)
    lines_per_doc: int = 6  # statements per document
    choices: int = 4  # answer options of the multiple-choice questions
    seed: int = 0

    def validate(self) -> None:
        bad = [k for k in ("people", "unseen", "val_people", "max_count", "templates", "lines_per_doc", "choices")
               if getattr(self, k) < 1]
        if bad:
            raise ConfigError(f"{bad[0]} must be at least 1, got {getattr(self, bad[0])}")
        unknown = [r for r in self.relations if r not in RELATIONS]
        if unknown or not self.relations:
            raise ConfigError(f"relation {unknown[0] if unknown else '(none)'!r} is not one of "
                              f"{', '.join(RELATIONS)}")
        if not 1 <= self.templates <= min(len(RELATIONS[r].templates) for r in self.relations):
            raise ConfigError(f"templates must be between 1 and 5, got {self.templates}")
        if self.zipf_s <= 0:
            raise ConfigError(f"zipf_s must be positive, got {self.zipf_s}")
        if not 0 <= self.myths <= self.people:
            raise ConfigError(f"myths must be between 0 and people ({self.people}), got {self.myths}")
        if self.myths and self.myth_ratio <= 1:
            raise ConfigError(f"myth_ratio must be above 1 (the myth is said more often), got {self.myth_ratio}")
        if self.choices > min(len(RELATIONS[r].values) for r in self.relations):
            raise ConfigError(f"choices ({self.choices}) is more than an attribute has values")


@dataclass
class Fact:
    """One (person, attribute) of the world: the true value, its group, how often the training corpus states
    it, and for a myth the false value and how often that is stated."""

    person: str
    relation: str
    value: str
    group: str  # seen | myth | unseen | val
    count: int
    myth: str | None = None
    myth_count: int = 0


@dataclass
class World:
    """The fact table, the corpus written from it (train and val documents) and the settings that drew it."""

    config: WorldConfig
    facts: list[Fact]
    train_docs: list[str]
    val_docs: list[str]
    statements: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def table(self) -> dict[tuple[str, str], Fact]:
        return {(f.person, f.relation): f for f in self.facts}

    def questions(self, counts: Counter | None = None, seed: int | None = None) -> list[dict[str, Any]]:
        """The questions about every seen, myth and unseen fact, in the question-file format (see
        questions.py): the cloze `prompt` a base model completes, the natural `question`, the `answer`,
        multiple-choice `choices` (the truth first, the myth second when there is one), and the `count` of
        the true statement in `counts` (default: the corpus as written)."""
        rng = random.Random(self.config.seed + 7 if seed is None else seed)
        out = []
        for i, f in enumerate(x for x in self.facts if x.group in GROUPS):
            rel = RELATIONS[f.relation]
            n = counts[(f.person, f.relation, f.value)] if counts is not None else f.count
            wrong = [v for v in rel.values if v not in (f.value, f.myth)]
            rng.shuffle(wrong)
            choices = [f.value, *([f.myth] if f.myth else []), *wrong][: max(self.config.choices, 2 if f.myth else 1)]
            q = {"id": f"{f.group}-{i}", "question": rel.question.format(name=f.person),
                 "prompt": "\n" + rel.cue.format(name=f.person), "answer": f.value, "choices": choices,
                 "group": f.group, "relation": f.relation, "person": f.person, "count": n}
            if f.myth:
                q["myth"] = f.myth
                q["myth_count"] = counts[(f.person, f.relation, f.myth)] if counts is not None else f.myth_count
            out.append(q)
        return out


def zipf_counts(n: int, s: float, max_count: int, rng: random.Random) -> list[int]:
    """n draws from the truncated Zipf law P(c) = c^-s / sum_k k^-s, c = 1..max_count."""
    ks = range(1, max_count + 1)
    return rng.choices(ks, weights=[k ** -s for k in ks], k=n)


def make_names(n: int, rng: random.Random, taken: Iterable[str] = ()) -> list[str]:
    """n distinct invented full names ("Kavo Relmusan"): two to three syllables each."""

    def word(syllables: int) -> str:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(syllables)) + rng.choice(CODAS)
        return w.capitalize()

    seen, out = set(taken), []
    while len(out) < n:
        name = f"{word(2)} {word(rng.choice((2, 3)))}"
        if name not in seen:
            seen.add(name)
            out.append(name)
    return out


def statement(relation: str, person: str, value: str, template: int = 0) -> str:
    return RELATIONS[relation].templates[template].format(name=person, value=value)


def generate_world(cfg: WorldConfig | None = None) -> World:
    """Draw the people and their facts, the mention counts and the myths, and write the corpus: every
    mention is one line in a template drawn at random, lines are shuffled and grouped into documents."""
    cfg = cfg or WorldConfig()
    cfg.validate()
    rng = random.Random(cfg.seed)
    names = make_names(cfg.people + cfg.unseen + cfg.val_people, rng)
    seen, unseen, val = (names[:cfg.people], names[cfg.people:cfg.people + cfg.unseen],
                         names[cfg.people + cfg.unseen:])
    myth_people = set(rng.sample(seen, cfg.myths))
    myth_relation = cfg.relations[0]
    facts: list[Fact] = []
    lines: list[str] = []

    def mention(rel: str, person: str, value: str, times: int) -> None:
        for _ in range(times):
            lines.append(statement(rel, person, value, rng.randrange(cfg.templates)))

    for person in seen:
        counts = zipf_counts(len(cfg.relations), cfg.zipf_s, cfg.max_count, rng)
        for rel, c in zip(cfg.relations, counts):
            value = rng.choice(RELATIONS[rel].values)
            if person in myth_people and rel == myth_relation:
                myth = rng.choice([v for v in RELATIONS[rel].values if v != value])
                mc = max(c + 1, round(cfg.myth_ratio * c))
                facts.append(Fact(person, rel, value, "myth", c, myth, mc))
                mention(rel, person, myth, mc)
            else:
                facts.append(Fact(person, rel, value, "seen", c))
            mention(rel, person, value, c)
    for person in unseen:
        for rel in cfg.relations:
            facts.append(Fact(person, rel, rng.choice(RELATIONS[rel].values), "unseen", 0))
    val_lines = []
    for person in val:
        for rel in cfg.relations:
            value = rng.choice(RELATIONS[rel].values)
            facts.append(Fact(person, rel, value, "val", 0))
            val_lines.append(statement(rel, person, value, rng.randrange(cfg.templates)))
    rng.shuffle(lines)
    rng.shuffle(val_lines)
    train_docs = _docs(lines, cfg.lines_per_doc)
    val_docs = _docs(val_lines, cfg.lines_per_doc)
    world = World(cfg, facts, train_docs, val_docs, statements=len(lines))
    missing = sorted(_chars(f.person for f in facts) - _chars(train_docs))
    if missing:  # a character tokenizer learns its alphabet from the training text: show it every letter
        train_docs.append("Letters: " + " ".join(missing) + "\n")
        world.extra["alphabet_line"] = "".join(missing)
    return world


def _docs(lines: Sequence[str], per_doc: int) -> list[str]:
    return ["\n".join(lines[i:i + per_doc]) + "\n" for i in range(0, len(lines), per_doc)]


def _chars(texts: Iterable[str]) -> set[str]:
    return set().union(*(set(t) for t in texts))


# ----------------------------------------------------------------------------- reading statements back


@cache
def _patterns() -> list[tuple[str, int, re.Pattern[str]]]:
    out = []
    for rel in RELATIONS.values():
        for i, t in enumerate(rel.templates):
            rx = re.escape(t).replace(r"\{name\}", f"(?P<name>{NAME_RE})").replace(r"\{value\}", r"(?P<value>\w+)")
            out.append((rel.name, i, re.compile(f"^{rx}$")))
    return out


def parse_statement(line: str) -> tuple[str, str, str] | None:
    """(person, relation, value) of a line written in one of the templates, else None."""
    line = line.strip()
    for rel, _, rx in _patterns():
        m = rx.match(line)
        if m:
            return m["name"], rel, m["value"]
    return None


def count_statements(docs: Iterable[str]) -> Counter:
    """How often each (person, relation, value) is stated in the documents, read from the text itself."""
    c: Counter = Counter()
    for d in docs:
        for line in d.split("\n"):
            s = parse_statement(line)
            if s is not None:
                c[s] += 1
    return c


def monofact_rate(counts: Counter) -> dict[str, float | int]:
    """Good-Turing: N1 / N, the share of the corpus's statements whose fact occurs exactly once (the
    estimate of the probability mass of facts never seen). Also the number of distinct facts."""
    n = sum(counts.values())
    n1 = sum(1 for v in counts.values() if v == 1)
    return {"statements": n, "facts": len(counts), "singletons": n1, "monofact_rate": n1 / n if n else float("nan")}


# ----------------------------------------------------------------------------- files


def write_world(world: World, out: str | Path) -> dict[str, Path]:
    """facts.jsonl (the fact table with counts), questions.jsonl (the question file) and world.json (the
    settings) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"facts": out / "facts.jsonl", "questions": out / "questions.jsonl", "world": out / "world.json"}
    atomic_write_bytes(paths["facts"], "".join(json.dumps(asdict(f)) + "\n" for f in world.facts).encode())
    atomic_write_bytes(paths["questions"], "".join(json.dumps(q) + "\n" for q in world.questions()).encode())
    atomic_write_bytes(paths["world"], json.dumps({"config": asdict(world.config), "statements": world.statements,
                                                   **world.extra}, indent=2).encode())
    return paths
