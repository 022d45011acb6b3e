"""Shared statistics: exact intervals for rates, the report rule, the TPR-at-FPR rule, the blind membership
baseline, and i.i.d. train/val splits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from llmlab.data import DEFAULT_SOURCE, load_corpus, split_corpus
from llmlab.security.privacy.mia import blind_baseline, evaluate_scores
from llmlab.stats import (
    NOT_MEASURED,
    bootstrap_ci,
    clopper_pearson,
    mean_ci,
    min_negatives_for_fpr,
    rate_ci,
    rate_of,
    resolvable_fpr,
    wilson,
)


def test_zero_of_eight_is_not_known_to_be_zero() -> None:
    lo, hi = clopper_pearson(0, 8)
    assert lo == 0.0
    assert hi == pytest.approx(1 - 0.025 ** (1 / 8), abs=1e-9)  # 0.369: the exact 95% upper bound
    assert 0.36 < hi < 0.38
    assert str(rate_ci(0, 8)) == "0/8 = 0% [0%, 37%]"


@pytest.mark.parametrize("k,n", [(0, 1), (1, 10), (5, 10), (10, 10), (37, 200), (3, 1000)])
def test_intervals_equal_scipy(k: int, n: int) -> None:
    exact = binomtest(k, n).proportion_ci(0.95, method="exact")
    assert clopper_pearson(k, n) == pytest.approx((exact.low, exact.high), abs=1e-9)
    w = binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert wilson(k, n) == pytest.approx((w.low, w.high), abs=1e-9)


def test_a_rate_of_nothing_is_not_measured() -> None:
    r = rate_of([])
    assert not r.measured and str(r) == NOT_MEASURED and np.isnan(r.rate)
    assert r.to_dict()["rate"] is None and r.to_dict()["n"] == 0
    assert rate_of([1, 0, 1, 1]).k == 3


def test_bootstrap_and_mean_intervals_cover_the_estimate() -> None:
    v = np.random.default_rng(0).normal(1.0, 0.5, 400)
    lo, hi = bootstrap_ci(v, np.mean, 1000)
    assert lo < v.mean() < hi and hi - lo < 0.2
    m, lo, hi = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and lo < 2.0 < hi
    assert np.isnan(mean_ci([1.0])[1])


def test_tpr_at_fpr_hidden_without_enough_negatives() -> None:
    rng = np.random.default_rng(0)
    scores = np.r_[rng.normal(1, 1, 200), rng.normal(0, 1, 200)]
    labels = [1] * 200 + [0] * 200
    r = evaluate_scores(scores, labels, bootstrap=50)
    assert min_negatives_for_fpr(0.001) == 10_000 and min_negatives_for_fpr(0.01) == 1000
    assert r["tpr_at_0.1pct"] is None and r["tpr_at_1pct"] is None
    assert r["tpr_at_resolvable"]["fpr"] == pytest.approx(resolvable_fpr(200)) == pytest.approx(0.05)
    assert 0 < r["tpr_at_resolvable"]["tpr"] < 1
    big = np.r_[rng.normal(1, 1, 200), rng.normal(0, 1, 10_000)]
    r2 = evaluate_scores(big, [1] * 200 + [0] * 10_000, bootstrap=20)
    assert r2["tpr_at_0.1pct"] is not None and r2["tpr_at_1pct"] is not None


def _docs() -> list[str]:
    return load_corpus(None)  # the built-in Python language reference (DEFAULT_SOURCE)


def test_blind_baseline_sees_a_topic_shift_but_not_an_iid_split() -> None:
    assert DEFAULT_SOURCE.startswith("default:")
    text = "".join(_docs())
    pieces = [text[i:i + 400] for i in range(0, len(text) - 400, 400)]
    n = 150
    shifted = blind_baseline(pieces[:n], pieces[-n:], bootstrap=50)  # the corpus's start vs its end: other topics
    perm = np.random.default_rng(1).permutation(len(pieces))
    iid = blind_baseline([pieces[i] for i in perm[:n]], [pieces[i] for i in perm[n:2 * n]], bootstrap=50)
    assert shifted["auc"] > 0.7, shifted["auc"]
    assert 0.35 < iid["auc"] < 0.65, iid["auc"]


def test_iid_splits_are_seeded_and_hold_the_fraction() -> None:
    docs = _docs()
    a = split_corpus(docs, 0.1, "random", seed=3)
    assert a == split_corpus(docs, 0.1, "random", seed=3) and a != split_corpus(docs, 0.1, "random", seed=4)
    end_val = split_corpus(docs, 0.1, "end")[1]
    assert a[1] != end_val
    train, val = split_corpus(docs, 0.1, "chunks", seed=0)
    chars = sum(map(len, val)) / (sum(map(len, train)) + sum(map(len, val)))
    assert 0.095 < chars < 0.105  # the fraction holds in characters, not documents
    assert "".join(docs).startswith(train[0]) or "".join(docs).startswith(val[0])
    with pytest.raises(Exception, match="--split"):
        split_corpus(docs, 0.1, "sideways")


def test_reports_are_readable_by_others_and_render_markdown(tmp_path) -> None:  # noqa: ANN001
    import stat

    from llmlab.security.report import Section, write_report

    out = write_report(tmp_path / "r", "demo", {"x": 1}, [Section("S", text="uses `code` and **bold**")],
                       summary="all **fine**", target="openai:m@http://127.0.0.1:1/v1")
    for name in ("report.json", "report.html", "report.md"):
        assert stat.S_IMODE((out / name).stat().st_mode) & 0o044 == 0o044, name  # group and others may read
    page = (out / "report.html").read_text()
    assert "<code>code</code>" in page and "<strong>bold</strong>" in page and "**" not in page
    assert "None" not in page.split("<h2>Configuration")[0]  # no "model None" header for an endpoint
    assert "target openai:m@http://127.0.0.1:1/v1" in page
