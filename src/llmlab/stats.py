"""Statistics every lab and report shares: intervals for rates, the bootstrap for statistics that need it,
and the rule for showing them.

Rates (k successes of n attempts) get an exact interval, never a bootstrap: a percentile bootstrap of 0/8
is [0, 0] ("known to be exactly zero"), while the truth is only that the rate is probably below 37%.

    Clopper-Pearson (1934), exact: lo = Beta^-1(a/2; k, n - k + 1), hi = Beta^-1(1 - a/2; k + 1, n - k)
                                   (lo = 0 when k = 0, hi = 1 when k = n), a = 1 - level
    Wilson (1927), score:          (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), p = k/n

The report rule: an interval is always shown with its n, and a rate with n = 0 is "not measured", never 0%.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

NOT_MEASURED = "not measured"


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Clopper-Pearson) two-sided interval of a binomial rate k/n; (nan, nan) when n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= k <= n:
        raise ValueError(f"k={k} successes is not between 0 and n={n}")
    a = 1.0 - level
    lo = 0.0 if k == 0 else float(_st.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(_st.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial rate k/n; (nan, nan) when n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    z = float(_st.norm.ppf(1 - (1 - level) / 2))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class RateCI:
    """k successes of n with an interval: `str()` shows "k/n = r% [lo%, hi%]", or "not measured" when n = 0."""

    k: int
    n: int
    lo: float
    hi: float
    method: str = "clopper-pearson"
    level: float = 0.95

    @property
    def rate(self) -> float:
        return self.k / self.n if self.n else float("nan")

    @property
    def measured(self) -> bool:
        return self.n > 0

    def __str__(self) -> str:
        if not self.n:
            return NOT_MEASURED
        return f"{self.k}/{self.n} = {self.rate:.0%} [{self.lo:.0%}, {self.hi:.0%}]"

    def to_dict(self) -> dict[str, float | int | str | None]:
        m = self.measured
        return {"k": self.k, "n": self.n, "rate": self.rate if m else None, "lo": self.lo if m else None,
                "hi": self.hi if m else None, "method": self.method, "level": self.level}


def rate_ci(k: int, n: int, level: float = 0.95, method: str = "clopper-pearson") -> RateCI:
    """A rate with its exact (default) or Wilson interval."""
    if method not in ("clopper-pearson", "wilson"):
        raise ValueError(f"method {method!r} is not clopper-pearson or wilson")
    lo, hi = (clopper_pearson if method == "clopper-pearson" else wilson)(k, n, level)
    return RateCI(int(k), int(n), lo, hi, method, level)


def rate_of(outcomes: Sequence[bool | int], level: float = 0.95, method: str = "clopper-pearson") -> RateCI:
    """The rate of true outcomes with its interval."""
    return rate_ci(int(sum(bool(o) for o in outcomes)), len(outcomes), level, method)


def bootstrap_ci(values: Sequence[float] | np.ndarray, statistic: Callable[[np.ndarray], float] = np.mean,
                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron 1979) of `statistic` over values resampled with replacement:
    for statistics without an exact interval (AUC, mean differences, Wasserstein distances ...)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_boot, v.size))
    boots = np.array([statistic(v[i]) for i in idx])
    lo, hi = np.percentile(boots, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi) with a Student-t interval over seeds or repeats; the interval is nan with one value."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean()) if v.size else float("nan")
    if v.size < 2:
        return m, float("nan"), float("nan")
    half = float(_st.t.ppf(1 - (1 - level) / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
    return m, m - half, m + half


def min_negatives_for_fpr(fpr: float, factor: int = 10) -> int:
    """The fewest negatives at which a TPR at this FPR is reported: factor / fpr (10 false positives
    expected at the bound), so "TPR at 0.1% FPR" needs 10,000 negatives."""
    return math.ceil(factor / fpr)


def resolvable_fpr(n_negatives: int, factor: int = 10) -> float:
    """The lowest FPR that n negatives resolve by the same rule: factor / n (capped at 1)."""
    return min(1.0, factor / max(1, n_negatives))
