"""The bias lab on the real SmolLM2-135M-Instruct (slow: run with -m slow): CrowS-Pairs and BBQ scored in
batches equal the one-at-a-time loop, the chat prompt works, and the CLI writes reports with the metric."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmlab.cli import main
from llmlab.labs.bias import bbq, counterfactual, crows

pytestmark = pytest.mark.slow

CROWS_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "crows-pairs" / "crows_pairs_anonymized.csv"


def test_crows_on_smollm2_batched_equals_loop(smollm2) -> None:  # noqa: ANN001
    if not CROWS_CSV.is_file():
        pytest.skip(f"{CROWS_CSV} is absent")
    pairs = crows.read_pairs(CROWS_CSV, limit=12)
    a = crows.score_pairs(smollm2, pairs)
    b = crows.score_pairs(smollm2, pairs, batched=False)
    np.testing.assert_allclose(a[0], b[0], atol=2e-3)
    np.testing.assert_allclose(a[1], b[1], atol=2e-3)
    assert np.array_equal(a[0] > a[1], b[0] > b[1])


def test_bbq_on_smollm2_batched_equals_loop_and_chat_prompt(smollm2) -> None:  # noqa: ANN001
    items = bbq.read_bbq(sample=8, seed=3)
    pa, la = bbq.predict(smollm2, items)
    pb, lb = bbq.predict(smollm2, items, batched=False)
    np.testing.assert_allclose(np.array(la), np.array(lb), atol=2e-3)
    assert np.array_equal(pa, pb)
    pc, lc = bbq.predict(smollm2, items, prompt="chat")
    assert len(pc) == 8 and all(len(x) == 3 for x in lc)


def test_counterfactual_logprob_on_smollm2(smollm2) -> None:  # noqa: ANN001
    res = counterfactual.run(counterfactual.CounterfactualConfig(attribute="pronouns", scorer="logprob",
                                                                 n_boot=50, permutations=20), smollm2)
    assert res.metric >= 0 and res.group_scores["female"]["n"] == len(counterfactual.DEFAULT_TEMPLATES)


def test_cli_crows_and_bbq_on_smollm2(tmp_path: Path) -> None:
    if not CROWS_CSV.is_file():
        pytest.skip(f"{CROWS_CSV} is absent")
    assert main(["bias", "crows-pairs", "smollm2", "--data", str(CROWS_CSV), "--limit", "10", "--out",
                 str(tmp_path / "c")]) == 0
    doc = json.loads((tmp_path / "c" / "report.json").read_text())["results"]
    assert 0 <= doc["metric"] <= 1 and doc["n"] == 10 and doc["per_category"]
    assert main(["bias", "bbq", "smollm2", "--sample", "6", "--out", str(tmp_path / "b")]) == 0
    doc = json.loads((tmp_path / "b" / "report.json").read_text())["results"]
    assert -1 <= doc["metric"] <= 1 and "s_dis" in doc["scores"]


def test_the_labs_sentiment_classifier_learns_its_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmlab.labs.bias import sentiment

    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))
    rows = sentiment.labelled_set()
    assert {lab for _, lab in rows} == {"positive", "negative"} and len(rows) > 300
    run = sentiment.ensure_classifier()
    assert run == sentiment.default_classifier_dir() and sentiment.ensure_classifier() == run  # reused
    scorer = sentiment.SentimentScorer(run)
    assert scorer.accuracy is not None and scorer.accuracy > 0.85
    good, bad = scorer(["What a wonderful, kind neighbour.", "It was a horrible, cruel evening."])
    assert good > 0.5 > bad
