"""The truthfulness lab on a tiny model trained here, on a small generated corpus: frequently seen facts are
answered far better than singletons and unseen people, deduplication raises the monofact rate, every stage
produces its numbers, and the report is written."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llmlab.errors import LlmlabError
from llmlab.labs.truth import lab
from llmlab.labs.truth.ask import AskConfig
from llmlab.labs.truth.detectors import DETECTORS
from llmlab.labs.truth.lab import LabConfig, corpus_for
from llmlab.labs.truth.measure import MeasureConfig
from llmlab.labs.truth.world import WorldConfig, count_statements, generate_world, monofact_rate
from llmlab.stats import rate_ci

WORLD = WorldConfig(people=30, unseen=10, val_people=4, relations=("city", "job"), max_count=32, zipf_s=1.0, myths=3,
                    templates=2)
TRAIN = dict(n_layer=2, n_head=4, n_embd=128, block_size=64, batch_size=32, max_iters=250, lr=3e-3, min_lr=3e-4,
             warmup_iters=20, eval_interval=250, eval_iters=2, num_samples=0, threads=1)
MEASURE = MeasureConfig(ask=AskConfig(mode="cloze", max_new_tokens=11, samples=4, batch_size=256), bootstrap=200)


def config(**kw) -> LabConfig:  # noqa: ANN003
    return LabConfig(**{"world": WORLD, "seeds": (0,), "train": dict(TRAIN), "measure": MEASURE, "free_samples": 60,
                        **kw})


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("truth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMLAB_CACHE", str(root / "cache"))
        events: list[str] = []
        r = lab.run(config(), progress=lambda e, i: events.append(e), out=root / "lab")
    r.events = events  # type: ignore[attr-defined]
    return r


def _acc(items, pred) -> tuple[int, int]:  # noqa: ANN001
    sel = [it["outcome"] == "correct" for it in items if pred(it)]
    return sum(sel), len(sel)


def test_frequent_facts_beat_singletons_and_unseen(result) -> None:  # noqa: ANN001
    base = next(r for r in result.runs if r.condition == "none")
    items = base.measurement.items
    freq = rate_ci(*_acc(items, lambda it: it["group"] == "seen" and it["count"] >= 8))
    once = rate_ci(*_acc(items, lambda it: it["group"] == "seen" and it["count"] == 1))
    unseen = rate_ci(*_acc(items, lambda it: it["group"] == "unseen"))
    assert freq.n >= 10 and once.n >= 10 and unseen.n == 20
    assert freq.rate >= 0.6, freq
    assert freq.lo > once.hi and freq.lo > unseen.hi, (freq, once, unseen)  # exact intervals apart
    assert unseen.rate <= 0.25  # the negative control: a guess among 24 values (chance 4%)


def test_every_stage_has_numbers(result) -> None:  # noqa: ANN001
    assert [r.condition for r in result.runs] == ["none", "dedup"]
    for r in result.runs:
        m = r.measurement
        assert m.n == 30 * 2 + 10 * 2 and m.mode == "cloze"
        assert sum(m.outcomes[o]["k"] for o in ("correct", "wrong", "abstain")) == m.n
        cal = m.calibration["answer probability"]
        assert 0 <= cal["ece"] <= 1 and cal["ece_ci"][0] <= cal["ece"] <= cal["ece_ci"][1]
        assert set(m.detectors) == set(DETECTORS)
        for name in ("max_prob", "min_token_prob", "mean_entropy", "selfcheck_ngram", "semantic_entropy",
                     "random"):
            assert m.detectors[name]["measured"], (name, m.detectors[name])
        assert m.choice["myth"]["mc1"]["n"] == 3 and m.myths["n"] == 3
        h = r.hallucination
        assert h["n"] == 60 and h["parsed"] + h["unparsed"] == 60
        assert h["true"] + h["wrong"] + h["myth"] + h["fabricated"] == h["parsed"]
        assert r.training["steps"] == 250
    base = result.runs[0].measurement
    assert base.detectors["max_prob"]["auroc"] > 0.6  # the model's own probability knows when it is guessing
    # by_count buckets follow the counts in the corpus the model saw
    assert [b["bucket"] for b in base.by_count][:2] == ["0", "1"]
    assert {"stage_start", "advance", "stage_end", "start", "end", "message"} <= set(result.events)


def test_dedup_raises_the_monofact_rate(result) -> None:  # noqa: ANN001
    mf = {r.condition: r.corpus["monofact_rate"] for r in result.runs}
    assert mf["dedup"] > mf["none"] + 0.05
    d = result.differences["monofact_rate"]
    assert d["n"] == 1 and d["values"][0] == pytest.approx(mf["dedup"] - mf["none"])
    # after exact dedup no fact is stated more often than there are templates
    w = generate_world(dataclasses.replace(WORLD, seed=0))
    docs, info = corpus_for(w, "dedup", "exact")
    counts = count_statements(docs)
    assert max(counts.values()) <= WORLD.templates and info["repeated_lines_removed"] > 0
    assert monofact_rate(counts)["monofact_rate"] == pytest.approx(mf["dedup"])
    # the fact table beside each run holds the counts of the corpus that run was trained on
    from pathlib import Path

    from llmlab.data import load_corpus

    for r in result.runs:
        folder = Path(r.run).parent
        written = count_statements(load_corpus(str(folder / "corpus.jsonl")))
        for line in (folder / "facts.jsonl").read_text().splitlines():
            f = json.loads(line)
            if f["group"] != "val":
                assert written[(f["person"], f["relation"], f["value"])] == f["count"]


def test_lab_report(result, tmp_path) -> None:  # noqa: ANN001
    from llmlab.labs.truth.report import write_lab_report

    out = write_lab_report(result, tmp_path / "rep")
    data = json.loads((out / "report.json").read_text())
    assert data["experiment"] == "truth lab"
    assert data["results"]["conditions"]["none"]["accuracy_unseen"]["pooled"]["n"] == 20
    md = (out / "report.md").read_text()
    for heading in ("## The experiment", "## Accuracy by training frequency", "## Free generation",
                    "Hallucination detectors", "Calibration", "Example answers"):
        assert heading in md
    assert len(list((out / "figures").glob("*.png"))) >= 4
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4 and "http://" not in html.split("<body>")[1][:2000]


def test_rerun_reuses_finished_runs_and_refuses_other_training(result) -> None:  # noqa: ANN001
    quick_measure = dataclasses.replace(MEASURE, ask=dataclasses.replace(MEASURE.ask, samples=0), bootstrap=0)
    again = lab.run(config(measure=quick_measure, free_samples=0, conditions=("none",)), out=result.out)
    assert [r.training for r in again.runs] == [result.runs[0].training]  # not trained again
    assert [it["answer"] for it in again.runs[0].measurement.items] == [
        it["answer"] for it in result.runs[0].measurement.items]  # the same model gives the same greedy answers
    assert not again.runs[0].measurement.detectors["semantic_entropy"]["measured"]
    with pytest.raises(LlmlabError, match="other settings"):
        lab.run(config(train={**TRAIN, "max_iters": 10}), out=result.out)


def test_bad_lab_settings(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(LlmlabError, match="sets 'data' itself"):
        lab.run(dataclasses.replace(config(), train={"data": "x"}), out=tmp_path / "a")
    with pytest.raises(LlmlabError, match="condition"):
        lab.run(config(conditions=("dp",)), out=tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "keep.txt").write_text("mine")
    with pytest.raises(LlmlabError, match="not a truth lab folder"):
        lab.run(config(), out=tmp_path / "c")
    assert (tmp_path / "c" / "keep.txt").read_text() == "mine"
