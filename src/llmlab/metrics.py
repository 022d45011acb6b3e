"""Metrics shared by objectives and labs: accuracy, per-class scores, macro-F1, exact match, chrF, and
calibration (reliability bins, ECE, MCE, Brier)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts: row = true class, column = predicted class."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of predictions equal to the truth."""
    yt, yp = np.asarray(y_true), np.asarray(y_pred)
    return float((yt == yp).mean()) if len(yt) else float("nan")


def per_class_scores(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> dict[str, np.ndarray]:
    """Precision TP/(TP+FP), recall TP/(TP+FN), F1 = 2TP/(2TP+FP+FN) and support per class (0 where a
    denominator is 0, as scikit-learn's zero_division=0)."""
    m = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(m).astype(float)
    fp, fn = m.sum(0) - tp, m.sum(1) - tp

    def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    return {"precision": div(tp, tp + fp), "recall": div(tp, tp + fn), "f1": div(2 * tp, 2 * tp + fp + fn),
            "support": m.sum(1), "predicted": m.sum(0)}


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], n_classes: int) -> float:
    """Unweighted mean of the per-class F1 over the classes that occur in the truth or the predictions
    (scikit-learn's f1_score(average="macro"))."""
    s = per_class_scores(y_true, y_pred, n_classes)
    present = (s["support"] + s["predicted"]) > 0
    return float(s["f1"][present].mean()) if present.any() else float("nan")




def _char_ngrams(text: str, n: int) -> Counter:
    s = "".join(text.split())  # chrF ignores whitespace
    return Counter(s[i:i + n] for i in range(len(s) - n + 1))


def chrf(hypotheses: Sequence[str], references: Sequence[str], n: int = 6, beta: float = 2.0) -> float:
    """Corpus chrF (Popović 2015, "chrF: character n-gram F-score for automatic MT evaluation"), 0-100.

    For each order k = 1..n, character k-gram counts (whitespace removed) are matched between hypothesis and
    reference and summed over the corpus: chrP_k = matches / hypothesis k-grams, chrR_k = matches /
    reference k-grams. chrP and chrR are their arithmetic means over the orders that occur, and
        chrF_beta = (1 + beta^2) chrP chrR / (beta^2 chrP + chrR),
    beta = 2 weighting recall twice as much as precision."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    precs, recs = [], []
    for k in range(1, n + 1):
        match = hyp_total = ref_total = 0
        for h, r in zip(hypotheses, references):
            hc, rc = _char_ngrams(h, k), _char_ngrams(r, k)
            match += sum((hc & rc).values())
            hyp_total += sum(hc.values())
            ref_total += sum(rc.values())
        if hyp_total == 0 and ref_total == 0:
            continue
        precs.append(match / hyp_total if hyp_total else 0.0)
        recs.append(match / ref_total if ref_total else 0.0)
    if not precs:
        return 100.0  # empty hypotheses for empty references
    p, r = sum(precs) / len(precs), sum(recs) / len(recs)
    b2 = beta * beta
    return 100.0 * (1 + b2) * p * r / (b2 * p + r) if (p + r) > 0 else 0.0


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference (surrounding whitespace ignored)."""
    if not references:
        return float("nan")
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references)) / len(references)


# ----------------------------------------------------------------------------- calibration


def reliability_bins(confidence: Sequence[float], correct: Sequence[bool | int], n_bins: int = 10
                     ) -> dict[str, np.ndarray]:
    """Equal-width confidence bins B_m = ((m-1)/M, m/M] (the first also holds 0), as Guo et al. 2017 and
    scikit-learn's calibration_curve(strategy="uniform"): per bin the count, the mean confidence and the
    accuracy (nan for an empty bin), and the bin edges."""
    p = np.clip(np.asarray(confidence, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(correct, dtype=np.float64)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} confidences for {y.size} outcomes")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], p, side="left")  # bin m holds (edge_m, edge_m+1]
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(idx, weights=p, minlength=n_bins) / count
        acc = np.bincount(idx, weights=y, minlength=n_bins) / count
    return {"count": count, "confidence": conf, "accuracy": acc, "edges": edges}


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool | int], n_bins: int = 10
                               ) -> float:
    """ECE = sum_m (|B_m| / n) |acc(B_m) - conf(B_m)| over equal-width bins (Guo, Pleiss, Sun, Weinberger
    2017, "On Calibration of Modern Neural Networks"); nan for no predictions."""
    b = reliability_bins(confidence, correct, n_bins)
    n = int(b["count"].sum())
    if n == 0:
        return float("nan")
    full = b["count"] > 0
    return float((b["count"][full] / n * np.abs(b["accuracy"][full] - b["confidence"][full])).sum())


def maximum_calibration_error(confidence: Sequence[float], correct: Sequence[bool | int], n_bins: int = 10
                              ) -> float:
    """MCE = max_m |acc(B_m) - conf(B_m)| over the non-empty bins (Guo et al. 2017)."""
    b = reliability_bins(confidence, correct, n_bins)
    full = b["count"] > 0
    return float(np.abs(b["accuracy"][full] - b["confidence"][full]).max()) if full.any() else float("nan")


def brier_score(confidence: Sequence[float], correct: Sequence[bool | int]) -> float:
    """Brier (1950): mean (p - y)^2 of the probability given to being right and the outcome."""
    p = np.asarray(confidence, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")
