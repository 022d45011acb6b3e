"""Gao, Schulman & Hilton (2022), "Scaling laws for reward model overoptimization": the gold reward as a
function of d = sqrt(KL(pi || pi_init)), relative to the initial policy,

    best-of-n:  R(d) = d (alpha - beta d)
    RL:         R(d) = d (alpha - beta log d)

both linear in (alpha, beta), fitted here by least squares through the origin; the peak of each, the
over-optimisation statistic (how far the gold reward falls after its peak) with a bootstrap interval, and
best-of-n's KL: the analytic log n - (n - 1)/n (Stiennon et al. 2020), which Beirami et al. (2024) show is
only an upper bound, and the exact KL of best-of-n on a finite pool of samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

FORMS = ("bon", "rl")


def bon_kl_analytic(n: int) -> float:
    """log n - (n - 1)/n: the KL of best-of-n to the base policy when rewards never tie (an upper bound in
    general, Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def _design(d: np.ndarray, form: str) -> np.ndarray:
    if form == "bon":
        return np.stack([d, -d * d], 1)
    if form == "rl":
        logd = np.log(np.where(d > 0, d, 1.0))
        return np.stack([d, -d * logd], 1)
    raise ValueError(f"form {form!r} is not one of {FORMS}")


def gao_curve(d: np.ndarray | Sequence[float], alpha: float, beta: float, form: str) -> np.ndarray:
    """R(d) of the fitted form."""
    d = np.asarray(d, dtype=np.float64)
    return _design(d, form) @ np.array([alpha, beta])


def fit_gao(d: Sequence[float], r: Sequence[float], form: str) -> dict[str, Any]:
    """Least-squares (alpha, beta) of R(d) (through the origin: no gain at zero KL), with R^2, the peak (d*,
    R(d*)) and the points' number. A form without a maximum (beta <= 0) has peak_d = inf."""
    d_arr, r_arr = np.asarray(d, dtype=np.float64), np.asarray(r, dtype=np.float64)
    ok = np.isfinite(d_arr) & np.isfinite(r_arr)
    d_arr, r_arr = np.clip(d_arr[ok], 0, None), r_arr[ok]
    if d_arr.size < 2:
        return {"form": form, "alpha": float("nan"), "beta": float("nan"), "r2": float("nan"), "n": int(d_arr.size),
                "peak_d": float("nan"), "peak_r": float("nan")}
    X = _design(d_arr, form)
    coef, *_ = np.linalg.lstsq(X, r_arr, rcond=None)
    alpha, beta = float(coef[0]), float(coef[1])
    pred = X @ coef
    ss = float(((r_arr - r_arr.mean()) ** 2).sum())
    r2 = 1 - float(((r_arr - pred) ** 2).sum()) / ss if ss > 0 else float("nan")
    peak_d, peak_r = gao_peak(alpha, beta, form)
    return {"form": form, "alpha": alpha, "beta": beta, "r2": r2, "n": int(d_arr.size), "peak_d": peak_d,
            "peak_r": peak_r, "d_max": float(d_arr.max())}


def gao_peak(alpha: float, beta: float, form: str) -> tuple[float, float]:
    """(d*, R(d*)): bon d* = alpha / (2 beta), R* = alpha^2 / (4 beta); rl d* = exp(alpha / beta - 1), R* = beta d*."""
    if not (beta > 0):
        return float("inf"), float("inf") if alpha > 0 else 0.0
    if form == "bon":
        return alpha / (2 * beta), alpha * alpha / (4 * beta)
    ex = alpha / beta - 1
    if ex > 50:
        return float("inf"), float("inf")
    dstar = math.exp(ex)
    return dstar, beta * dstar


def bon_distribution(scores: np.ndarray, n: int, tol: float = 1e-6) -> tuple[np.ndarray, float]:
    """(probability of each sample under best-of-n, KL(best-of-n || pool)) for one prompt's pool of N samples
    with selection scores `scores` (N,), on the pool's empirical distribution (each sample 1/N). Ties (equal
    scores, such as the same answer sampled twice) are broken at random, so a block of tied samples with pool
    mass p_b and cumulative mass F_b gets F_b^n - F_{b-1}^n, shared equally. The KL is exact on the pool; it
    equals log n - (n-1)/n only without ties (Beirami et al. 2024)."""
    N = scores.size
    order = np.argsort(scores, kind="stable")
    s = scores[order]
    q = np.zeros(N)
    kl = 0.0
    i = 0
    F_prev = 0.0
    while i < N:
        j = i
        while j + 1 < N and abs(s[j + 1] - s[i]) <= tol:
            j += 1
        size = j - i + 1
        p_b = size / N
        F_b = F_prev + p_b
        q_b = F_b ** n - F_prev ** n
        q[order[i:j + 1]] = q_b / size
        if q_b > 0:
            kl += q_b * math.log(q_b / p_b)
        F_prev = F_b
        i = j + 1
    return q, kl


def fall_statistic(A: np.ndarray, n_boot: int = 1000, seed: int = 0, higher: bool = True) -> dict[str, Any]:
    """How far a curve falls after its peak: A (points, units) holds each unit's (seed x prompt) value at each
    point of optimisation, in order. fall = max_j mean(A_j) - mean(A_last), with a percentile bootstrap
    interval over units (the peak chosen again in every resample); also where the peak is and the rise from
    the first point to the peak."""
    A = np.asarray(A, dtype=np.float64)
    means = A.mean(1)
    j = int(np.argmax(means))
    fall = float(means[j] - means[-1])
    rng = np.random.default_rng(seed)
    U = A.shape[1]
    boots = []
    for _ in range(n_boot):
        m = A[:, rng.integers(0, U, U)].mean(1)
        boots.append(m.max() - m[-1])
    lo, hi = np.percentile(boots, [2.5, 97.5]) if boots else (float("nan"), float("nan"))
    return {"fall": fall, "lo": float(lo), "hi": float(hi), "peak_index": j, "peak": float(means[j]),
            "first": float(means[0]), "last": float(means[-1]), "units": U, "points": int(A.shape[0])}
