"""Calibration and detector scores: ECE by hand, reliability bins, Brier, AUROC and the rejection curves checked
against scikit-learn on the same scores, and the detectors' formulas on small cases."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import accuracy_score, brier_score_loss, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from llmlab.labs.truth import detectors as det
from llmlab.metrics import brier_score, expected_calibration_error, maximum_calibration_error, reliability_bins

CONF = [0.05, 0.15, 0.18, 0.45, 0.55, 0.62, 0.68, 0.81, 0.93, 0.97]
OK = [0, 0, 1, 1, 0, 1, 1, 1, 1, 1]


def test_ece_equals_a_hand_computation() -> None:
    # 5 bins of width 0.2: (0, .2] holds .05 .15 .18 -> conf .1267, acc 1/3; (.4, .6] .45 .55 -> .5, 1/2;
    # (.6, .8] .62 .68 -> .65, 1; (.8, 1] .81 .93 .97 -> .9033, 1
    hand = (3 / 10 * abs(1 / 3 - (0.05 + 0.15 + 0.18) / 3) + 2 / 10 * abs(0.5 - 0.5)
            + 2 / 10 * abs(1 - 0.65) + 3 / 10 * abs(1 - (0.81 + 0.93 + 0.97) / 3))
    assert expected_calibration_error(CONF, OK, n_bins=5) == pytest.approx(hand, abs=1e-12)
    assert maximum_calibration_error(CONF, OK, n_bins=5) == pytest.approx(0.35, abs=1e-12)
    # a value on a bin edge belongs to the lower bin ((m-1)/M, m/M]; 0 to the first
    b = reliability_bins([0.0, 0.2, 0.2000001, 1.0], [1, 1, 1, 1], n_bins=5)
    assert b["count"].tolist() == [2, 1, 0, 0, 1]


def test_reliability_bins_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    p = rng.random(500)
    y = (rng.random(500) < p ** 1.5).astype(int)
    b = reliability_bins(p, y, n_bins=10)
    prob_true, prob_pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    full = b["count"] > 0
    np.testing.assert_allclose(b["accuracy"][full], prob_true, atol=1e-12)
    np.testing.assert_allclose(b["confidence"][full], prob_pred, atol=1e-12)
    assert brier_score(p, y) == pytest.approx(brier_score_loss(y, p), abs=1e-12)


def test_auroc_and_roc_match_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    correct = rng.random(300) < 0.6
    u = rng.normal(size=300) + (~correct) * 0.8  # wrong answers are more uncertain
    u[:20] = np.round(u[:20], 1)  # some ties
    d = det.score_detector(u, correct, bootstrap=200)
    assert d["measured"]
    assert d["auroc"] == pytest.approx(roc_auc_score(~correct, u), abs=1e-12)
    lo, hi = d["auroc_ci"]
    assert lo < d["auroc"] < hi
    fpr, tpr, _ = sk_roc_curve(~correct, u, drop_intermediate=False)
    from llmlab.security.privacy.mia import roc_curve

    f2, t2, _ = roc_curve(u, (~correct).astype(int))
    np.testing.assert_allclose(f2, fpr, atol=1e-12)
    np.testing.assert_allclose(t2, tpr, atol=1e-12)


def test_rejection_curve_matches_scikit_learn_accuracy() -> None:
    rng = np.random.default_rng(2)
    u = rng.random(200)  # no ties
    correct = rng.random(200) < 1 - u  # confident answers are right more often
    order = np.argsort(u)
    cov, acc = det.rejection_curve(u, correct)
    for k in (1, 37, 100, 160, 200):
        top = order[:k]
        assert acc[k - 1] == pytest.approx(accuracy_score(np.ones(k, bool), correct[top]), abs=1e-12)
        assert cov[k - 1] == pytest.approx(k / 200)
    for c in (0.8, 0.9, 0.95):
        k = math.ceil(c * 200)
        assert det.accuracy_at_coverage(u, correct, c) == pytest.approx(correct[order[:k]].mean(), abs=1e-12)
    assert det.aurac(u, correct) == pytest.approx(np.mean([correct[order[:k]].mean() for k in range(1, 201)]))
    assert det.prr(-correct.astype(float), correct) == pytest.approx(1.0)  # the oracle
    assert det.prr(correct.astype(float), correct) < 0  # the worst order


def test_ties_count_at_their_expected_accuracy() -> None:
    u = [0.1, 0.5, 0.5, 0.5, 0.9]
    y = [1, 1, 0, 0, 1]
    _, acc = det.rejection_curve(u, y)
    # average over every order of the three tied answers
    perms = [p for p in itertools.permutations([1, 0, 0])]
    for k in range(1, 6):
        expect = np.mean([np.mean(([1] + list(p) + [1])[:k]) for p in perms])
        assert acc[k - 1] == pytest.approx(expect)


def test_detector_formulas() -> None:
    lp = [math.log(0.9), math.log(0.5), math.log(0.8)]
    assert det.max_prob(lp) == pytest.approx(1 - 0.9 * 0.5 * 0.8)
    assert det.min_token_prob(lp) == pytest.approx(0.5)
    assert det.mean_entropy([0.1, 0.3]) == pytest.approx(0.2)
    # SelfCheck unigram: counts over the answer and the samples, -mean log p of the answer's words
    s = det.selfcheck_ngram("Paris", ["Paris", "Lyon", "Paris"])
    assert s["avg_neg_logprob"] == pytest.approx(-math.log(3 / 4))
    s2 = det.selfcheck_ngram("Lyon Paris", ["Paris"])
    assert s2["avg_neg_logprob"] == pytest.approx((-math.log(1 / 3) - math.log(2 / 3)) / 2)
    assert s2["max_neg_logprob"] == pytest.approx(-math.log(1 / 3))
    # discrete semantic entropy
    assert det.discrete_semantic_entropy(det.cluster_strings(["a", "a", "a", "a"])) == 0.0
    assert det.discrete_semantic_entropy(det.cluster_strings(["a", "b", "a", "b"])) == pytest.approx(math.log(2))
    assert det.discrete_semantic_entropy(det.cluster_strings(list("abcd"))) == pytest.approx(math.log(4))


def test_embedding_clusters() -> None:
    vecs = {"paris": [1, 0], "paris france": [0.99, 0.14], "lyon": [0, 1]}
    ids = det.cluster_embeddings(["paris", "lyon", "paris france", "paris"], lambda ts: np.array([vecs[t] for t in ts]),
                                 threshold=0.9)
    assert ids == [0, 1, 0, 0]


def test_p_ik_probe_is_cross_fitted() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(120) < 0.5
    x = rng.normal(size=(120, 8))
    x[:, 0] += 2.5 * y  # one feature knows
    p = det.p_ik_probe(x, y, folds=5)
    assert roc_auc_score(y, p) > 0.85
    noise = det.p_ik_probe(rng.normal(size=(120, 8)), y, folds=5)
    assert abs(roc_auc_score(y, noise) - 0.5) < 0.2
    assert det.p_ik_probe(x, np.ones(120, bool)) is None  # one outcome only: not measured


def test_detector_needs_both_outcomes() -> None:
    d = det.score_detector([0.1, 0.2, 0.3], [True, True, True])
    assert not d["measured"] and "both" in d["why"] and d["aurac"] == 1.0


def test_minilm_clusters_paraphrases() -> None:
    """The shipped all-MiniLM-L6-v2 as the semantic-equivalence test of semantic entropy."""
    embed = det.minilm_embedder()
    ids = det.cluster_embeddings(["paris", "city of paris", "paris france", "lyon", "london", "paris"], embed, 0.8)
    assert ids == [0, 0, 0, 1, 2, 0]
    assert det.discrete_semantic_entropy(ids) < det.discrete_semantic_entropy(det.cluster_strings(
        ["paris", "city of paris", "paris france", "lyon", "london", "paris"]))
