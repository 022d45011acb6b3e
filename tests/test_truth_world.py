"""The known-facts world: its fact table matches the text it wrote (every count exact), its questions, and the
monofact rate."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from llmlab.errors import ConfigError
from llmlab.labs.truth.world import (
    RELATIONS,
    WorldConfig,
    count_statements,
    generate_world,
    monofact_rate,
    parse_statement,
    statement,
    write_world,
    zipf_counts,
)

SMALL = WorldConfig(people=30, unseen=10, val_people=5, max_count=64, myths=4, templates=5, seed=3)


def test_fact_table_matches_the_text() -> None:
    w = generate_world(SMALL)
    counts = count_statements(w.train_docs)
    assert sum(counts.values()) == w.statements
    for f in w.facts:
        if f.group in ("seen", "myth"):
            assert counts[(f.person, f.relation, f.value)] == f.count
        if f.group == "myth":
            assert f.myth != f.value and counts[(f.person, f.relation, f.myth)] == f.myth_count > f.count
    # unseen and val people never appear in training text; val people are the whole validation split
    text = "".join(w.train_docs)
    for f in w.facts:
        if f.group in ("unseen", "val"):
            assert f.person not in text
    assert set(p for p, _, _ in count_statements(w.val_docs)) == {f.person for f in w.facts if f.group == "val"}
    # every statement in the text belongs to the table (nothing else is written)
    table = {(f.person, f.relation): f for f in w.facts}
    for (person, rel, value) in counts:
        f = table[(person, rel)]
        assert value in (f.value, f.myth)


def test_files_round_trip(tmp_path) -> None:  # noqa: ANN001
    w = generate_world(SMALL)
    paths = write_world(w, tmp_path)
    facts = [json.loads(line) for line in paths["facts"].read_text().splitlines()]
    counts = count_statements(w.train_docs)
    assert len(facts) == (30 + 10 + 5) * 3
    for f in facts:
        assert counts[(f["person"], f["relation"], f["value"])] == f["count"]
    qs = [json.loads(line) for line in paths["questions"].read_text().splitlines()]
    assert Counter(q["group"] for q in qs) == {"seen": 26 * 3 + 4 * 2, "myth": 4, "unseen": 30}
    for q in qs:
        assert q["choices"][0] == q["answer"] and len(set(q["choices"])) == len(q["choices"]) == 4
        assert q["prompt"].startswith("\n") and q["person"] in q["prompt"]
        if q["group"] == "myth":
            assert q["choices"][1] == q["myth"]


def test_templates_parse_back_and_cues_come_before_the_value() -> None:
    for rel in RELATIONS.values():
        for i in range(len(rel.templates)):
            s = statement(rel.name, "Kavo Relmu", rel.values[1], i)
            assert parse_statement(s) == ("Kavo Relmu", rel.name, rel.values[1])
            cue = rel.cue.format(name="Kavo Relmu").lower()
            assert cue + " " + rel.values[1].lower() in s.lower()
        # no value is a prefix of another: a value's probability is that of its characters
        assert not any(a != b and b.startswith(a) for a in rel.values for b in rel.values)
    assert parse_statement("Kavo Relmu was born in the sea of Arden.") is None


def test_monofact_rate_is_good_turing() -> None:
    c = Counter({("a", "city", "x"): 1, ("b", "city", "y"): 1, ("c", "city", "z"): 3, ("d", "job", "w"): 5})
    mf = monofact_rate(c)
    assert mf == {"statements": 10, "facts": 4, "singletons": 2, "monofact_rate": 0.2}


def test_zipf_counts_have_a_long_tail() -> None:
    import random

    c = zipf_counts(5000, 1.3, 200, random.Random(0))
    assert min(c) == 1 and max(c) > 100
    share_once = sum(x == 1 for x in c) / len(c)
    expected = 1 / sum(k ** -1.3 for k in range(1, 201))
    assert abs(share_once - expected) < 0.03
    # a larger exponent gives more singletons
    assert sum(x == 1 for x in zipf_counts(5000, 2.0, 200, random.Random(0))) > sum(x == 1 for x in c)


def test_seeds_give_different_worlds_and_the_same_seed_the_same() -> None:
    a, b = generate_world(SMALL), generate_world(SMALL)
    assert a.train_docs == b.train_docs and a.facts == b.facts
    import dataclasses

    c = generate_world(dataclasses.replace(SMALL, seed=4))
    assert c.train_docs != a.train_docs


@pytest.mark.parametrize("kw, msg", [({"templates": 9}, "templates"), ({"relations": ("colour",)}, "colour"),
                                     ({"myths": 99}, "myths"), ({"myth_ratio": 0.5}, "myth_ratio"),
                                     ({"people": 0}, "people")])
def test_bad_world_settings(kw: dict, msg: str) -> None:
    import dataclasses

    with pytest.raises(ConfigError, match=msg):
        generate_world(dataclasses.replace(SMALL, **kw))
