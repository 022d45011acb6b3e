"""Built-in offline data sets with checkable answers, deterministic given a seed:

- ``pydoc-topics``: paragraphs of the Python language reference (``pydoc_data.topics``) labelled with the
  section they come from, restricted to the N largest sections (text classification);
- ``pydoc-titles``: the same paragraphs as sources, their section title as the target ("title the
  paragraph", sequence-to-sequence);
- ``reverse-words`` / ``sort-words``: a list of words and the same list reversed / sorted.

What a "section" is. The reference ships as 79 topic pages (``topics["if"]`` ...); each starts with a
title underlined with ``*`` and may contain sub-sections underlined with ``=``/``-``. Some pages contain
others verbatim ("Compound statements" holds the if/while/for/try/with pages, "Special method names" holds
"Basic customization", ...; "if" and "else" are the same page). A paragraph is therefore labelled with the
*most specific* page that contains it (the shortest page holding it), identical paragraphs are kept once,
headings are never part of a paragraph (so no example contains its own label), and paragraphs shorter than
`min_chars` ("Added in version 3.8.") are dropped. ``level="subsection"`` labels with the nearest heading
instead of the page title.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmlab.checkpoint import atomic_write_bytes
from llmlab.errors import DataError

_UNDERLINE = re.compile(r"[*=\-^~#]{3,}")
_RULE = re.compile(r"[\s+\-=|*~^#]+")

WORDS = ("apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "olive", "peach", "pear",
         "plum", "berry", "cat", "dog", "horse", "mouse", "tiger", "zebra", "eagle", "otter",
         "red", "blue", "green", "amber", "black", "white", "river", "stone", "cloud", "storm",
         "north", "south", "east", "west", "piano", "violin", "drum", "flute", "bread", "honey")


@dataclass
class Paragraph:
    """One paragraph of the language reference and where it comes from."""

    text: str
    topic: str  # the pydoc topic key of the most specific page holding it
    title: str  # that page's title
    heading: str  # the nearest heading above it (the page title when there is none)


def _blocks(page: str) -> list[tuple[str, str | None]]:
    """(paragraph text, heading it is under) for each paragraph of one page; headings themselves left out."""
    out: list[tuple[str, str | None]] = []
    heading: str | None = None
    for block in re.split(r"\n[ \t]*\n", page):
        lines = [ln for ln in block.split("\n") if ln.strip()]
        if not lines:
            continue
        if len(lines) >= 2 and _UNDERLINE.fullmatch(lines[-1].strip()):
            heading = " ".join(ln.strip() for ln in lines[:-1])
            continue
        lines = [ln for ln in lines if not _RULE.fullmatch(ln)]  # table borders, transitions
        if not lines:
            continue
        text = re.sub(r"\s+", " ", " ".join(ln.strip() for ln in lines)).strip()
        out.append((text, heading))
    return out


def pydoc_paragraphs(min_chars: int = 60) -> list[Paragraph]:
    """Every distinct paragraph of the language reference, attributed to the most specific page holding it
    (see the module docstring), in a fixed order."""
    from pydoc_data.topics import topics

    owners: dict[str, list[tuple[int, str, str]]] = {}
    titles = {}
    for key in sorted(topics):
        page = topics[key].strip()
        titles[key] = page.split("\n", 1)[0].strip()
        for text, heading in _blocks(page)[0:]:
            if len(text) < min_chars:
                continue
            owners.setdefault(text, []).append((len(page), key, heading or titles[key]))
    out = []
    for text, places in owners.items():
        _, key, heading = min(places)  # the shortest page holding the paragraph; ties by topic key
        out.append(Paragraph(text=text, topic=key, title=titles[key], heading=heading))
    return out


def _largest(labels: list[str], n: int) -> list[str]:
    """The n most frequent labels (ties broken by name), most frequent first."""
    counts = Counter(labels)
    return [lab for lab, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]]


def _label(p: Paragraph, level: str) -> str:
    if level == "topic":
        return p.title
    if level == "subsection":
        return p.heading
    raise DataError(f"level {level!r} is not one of topic, subsection")


def _cut(text: str, max_chars: int) -> str:
    """text cut at a word boundary to at most max_chars characters (0 = uncut)."""
    if not max_chars or len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def pydoc_topics(n_sections: int = 8, seed: int = 0, level: str = "topic", min_chars: int = 60,
                 max_chars: int = 0) -> list[dict[str, str]]:
    """Topic classification: [{"text": paragraph, "label": section title}] for the paragraphs of the
    n_sections largest sections, shuffled with `seed`."""
    if n_sections < 2:
        raise DataError(f"--sections must be at least 2 for a classification task, got {n_sections}")
    paras = pydoc_paragraphs(min_chars)
    keep = set(_largest([_label(p, level) for p in paras], n_sections))
    rows = [{"text": _cut(p.text, max_chars), "label": _label(p, level)} for p in paras if _label(p, level) in keep]
    random.Random(seed).shuffle(rows)
    return rows


def pydoc_titles(n_sections: int = 20, seed: int = 0, level: str = "topic", min_chars: int = 60,
                 max_chars: int = 400) -> list[dict[str, str]]:
    """"Title the paragraph": [{"source": paragraph (cut to max_chars), "target": its section title}] for the
    n_sections largest sections, shuffled with `seed`."""
    rows = pydoc_topics(n_sections, seed, level, min_chars, max_chars)
    return [{"source": r["text"], "target": r["label"]} for r in rows]


def _word_lists(n: int, seed: int, min_len: int, max_len: int, vocab: int) -> list[list[str]]:
    if not 1 <= min_len <= max_len:
        raise DataError(f"word-list lengths must satisfy 1 <= min_len <= max_len, got {min_len}, {max_len}")
    if not 2 <= vocab <= len(WORDS):
        raise DataError(f"--vocab must be between 2 and {len(WORDS)}, got {vocab}")
    rng = random.Random(seed)
    words = WORDS[:vocab]
    return [[rng.choice(words) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def reverse_words(n: int = 2000, seed: int = 0, min_len: int = 3, max_len: int = 8,
                  vocab: int = 20) -> list[dict[str, str]]:
    """[{"source": "w1 w2 ... wk", "target": "wk ... w2 w1"}]: the list reversed."""
    return [{"source": " ".join(w), "target": " ".join(reversed(w))}
            for w in _word_lists(n, seed, min_len, max_len, vocab)]


def sort_words(n: int = 2000, seed: int = 0, min_len: int = 3, max_len: int = 8,
               vocab: int = 20) -> list[dict[str, str]]:
    """[{"source": "w1 w2 ... wk", "target": the words in alphabetical order}]."""
    return [{"source": " ".join(w), "target": " ".join(sorted(w))}
            for w in _word_lists(n, seed, min_len, max_len, vocab)]


GENERATORS: dict[str, Callable[..., list[dict[str, str]]]] = {
    "pydoc-topics": pydoc_topics,
    "pydoc-titles": pydoc_titles,
    "reverse-words": reverse_words,
    "sort-words": sort_words,
}


def make_dataset(name: str, **kw: Any) -> list[dict[str, str]]:
    """The rows of the built-in data set `name` (keyword arguments as its generator takes them)."""
    if name not in GENERATORS:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(GENERATORS)}")
    return GENERATORS[name](**kw)


def rows_to_bytes(rows: list[dict[str, str]], suffix: str) -> bytes:
    """Rows as CSV (header from the keys) or JSONL (one object per line), by file suffix."""
    if suffix == ".jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    if suffix == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["text", "label"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue().encode()
    raise DataError(f"cannot write {suffix or 'a file without suffix'}; name the output .csv or .jsonl")


def write_dataset(rows: list[dict[str, str]], out: str | Path) -> Path:
    """Write rows to out (.csv or .jsonl) atomically."""
    out = Path(out)
    atomic_write_bytes(out, rows_to_bytes(rows, out.suffix.lower()))
    return out
