"""The statistics every part of the service shares, as pure functions over numbers (numpy and the standard
library only), each checked by hand or against a well-kept library in tests/unit/test_stats.py.

  - logistic_regression: weighted, L2-penalised, fractional targets (Bradley-Terry ratings, the length-controlled
    win rate).
  - Percentile-bootstrap intervals: over resampled indices (bootstrap_ci, mean_with_ci) or resample counts used
    as weights (resample_counts), both seeded: the same data and seed give the same interval.
  - Proportions: the Wilson score interval, and the verdict an interval gives against a null rate.
  - Agreement between annotators on nominal labels: Cohen's kappa for two, Krippendorff's alpha for any number
    with missing labels, and the raw share of agreeing pairs.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np

# Logistic regression


def logistic_regression(
    features: np.ndarray,
    targets: np.ndarray,
    weights: np.ndarray | None = None,
    *,
    l2: float | Sequence[float] = 0.0,
    iterations: int = 100,
    tolerance: float = 1e-10,
) -> np.ndarray:
    """Coefficients w maximising sum_n weight_n * [y_n log p_n + (1 - y_n) log(1 - p_n)] - sum_k l2_k/2 * w_k^2
    with p_n = sigmoid(x_n . w); `l2` is one penalty for all coefficients or one each. Targets may be fractions
    (a tie is 0.5). Newton's method with step halving: the objective is concave, so every accepted step climbs."""
    features = np.asarray(features, dtype=float)
    targets = np.asarray(targets, dtype=float)
    weights = np.ones(len(targets)) if weights is None else np.asarray(weights, dtype=float)
    coefficients = np.zeros(features.shape[1])
    l2 = np.broadcast_to(np.asarray(l2, dtype=float), coefficients.shape)

    def objective(w: np.ndarray) -> float:
        z = features @ w
        # log sigmoid(z) = -logaddexp(0, -z), log(1 - sigmoid(z)) = -logaddexp(0, z): stable for large |z|
        ll = -(targets * np.logaddexp(0, -z) + (1 - targets) * np.logaddexp(0, z))
        return float(weights @ ll - 0.5 * (l2 * w) @ w)

    current = objective(coefficients)
    for _ in range(iterations):
        p = 1 / (1 + np.exp(-(features @ coefficients)))
        gradient = features.T @ (weights * (targets - p)) - l2 * coefficients
        curvature = (features * (weights * p * (1 - p))[:, None]).T @ features + np.diag(l2)
        step = np.linalg.lstsq(curvature, gradient, rcond=None)[0]
        scale = 1.0
        while scale > 1e-8:
            candidate = coefficients + scale * step
            value = objective(candidate)
            if value >= current - 1e-12:
                break
            scale /= 2
        else:
            break
        coefficients, previous, current = candidate, current, value
        if abs(current - previous) < tolerance and np.max(np.abs(scale * step)) < 1e-8:
            break
    return coefficients


# Bootstrap intervals


def percentile_interval(values: np.ndarray, confidence: float = 0.95, axis: int | None = None):
    """The (low, high) percentiles leaving (1 - confidence) / 2 in each tail."""
    tail = (1 - confidence) / 2 * 100
    return np.percentile(values, tail, axis=axis), np.percentile(values, 100 - tail, axis=axis)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], float],
    n: int,
    *,
    rounds: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float]:
    """Percentile-bootstrap interval of `statistic(indices)` over resamples of range(n) with replacement. The
    resamples depend only on (n, rounds, seed): statistics of different rows see the same prompts. Resamples
    where the statistic is not finite are left out; (nan, nan) when none is left or n is 0."""
    if rounds < 1:
        raise ValueError(f"the bootstrap needs at least 1 round (got {rounds})")
    if n < 1:
        return math.nan, math.nan
    samples = np.random.default_rng(seed).integers(0, n, size=(rounds, n))
    values = np.array([statistic(sample) for sample in samples], dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = percentile_interval(values, confidence)
    return float(low), float(high)


def mean_with_ci(values: Sequence[float], *, rounds: int = 1000, seed: int = 0) -> dict:
    """{"value": the mean, "low", "high": its percentile-bootstrap interval}."""
    data = np.asarray(values, dtype=float)
    low, high = bootstrap_ci(lambda idx: data[idx].mean(), len(data), rounds=rounds, seed=seed)
    return {"value": float(data.mean()) if len(data) else math.nan, "low": low, "high": high}


def resample_counts(n: int, *, rounds: int, seed: int = 0) -> np.ndarray:
    """A (rounds, n) array: how many times each of n items is drawn in each resample with replacement (numpy's
    seeded generator), for statistics that take the counts as weights rather than indices."""
    if rounds < 1:
        raise ValueError(f"the bootstrap needs at least 1 round (got {rounds})")
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=rounds)


# Proportions


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (successes out of n; ties may count half)."""
    if n <= 0:
        return (float("nan"), float("nan"))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def interval_text(rate: float, n: int, digits: int = 3) -> str:
    """'0.625 [0.548, 0.697] on 160' : a proportion with its 95% Wilson interval and its count."""
    low, high = wilson_interval(rate * n, n)
    return f"{rate:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}] on {n}"


def verdict(low: float, high: float, null: float = 0.5) -> str:
    """What an interval around a rate says against `null`: better, worse or no detectable difference."""
    if low > null:
        return "better"
    if high < null:
        return "worse"
    return "no detectable difference"


# Agreement on nominal labels


def cohen_kappa(pairs: Sequence[tuple]) -> float | None:
    """Cohen's kappa of two raters from their (label of rater 1, label of rater 2) on each shared unit.
    None when undefined: no shared units, or chance agreement of 1 (both always gave one same label)."""
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    first = Counter(a for a, _ in pairs)
    second = Counter(b for _, b in pairs)
    expected = sum(first[label] * second[label] for label in first) / (n * n)
    if expected >= 1:
        return None
    return (observed - expected) / (1 - expected)


def krippendorff_alpha(units: Iterable[dict]) -> float | None:
    """Krippendorff's alpha for nominal labels. `units`: one {rater: label} dict per unit; raters may be missing.
    Units with fewer than two labels cannot be paired and are left out. None when undefined (fewer than two
    pairable labels, or every pairable label the same)."""
    coincidence: Counter = Counter()
    for unit in units:
        labels = list(unit.values())
        m = len(labels)
        if m < 2:
            continue
        for i, j in itertools.permutations(range(m), 2):
            coincidence[(labels[i], labels[j])] += 1 / (m - 1)
    totals: Counter = Counter()
    for (c, _), value in coincidence.items():
        totals[c] += value
    n = sum(totals.values())
    if n < 2:
        return None
    disagree_observed = sum(value for (c, k), value in coincidence.items() if c != k)
    disagree_expected = sum(totals[c] * totals[k] for c in totals for k in totals if c != k)
    if disagree_expected == 0:
        return None
    return 1 - (n - 1) * disagree_observed / disagree_expected


def pairwise_agreement(units: Iterable[dict], *, tolerance: float | None = None) -> float | None:
    """The share of agreeing pairs among all pairs of labels given to the same unit (None without any pair).
    `tolerance`: numeric labels agree when at most that far apart (1: scores 3 and 4 agree)."""
    agree = total = 0
    for unit in units:
        for a, b in itertools.combinations(list(unit.values()), 2):
            total += 1
            agree += a == b if tolerance is None else abs(a - b) <= tolerance
    return agree / total if total else None


def against_chance(rate: float, n: int, what: str = "pairs") -> str:
    """'0.581 [0.504, 0.655] on 160 pairs: above chance': an accuracy, its 95% Wilson interval, and whether
    that interval excludes 0.5."""
    low, high = wilson_interval(rate * n, n)
    words = {
        "better": "above chance",
        "worse": "below chance",
        "no detectable difference": "not distinguishable from chance",
    }
    return f"{rate:.3f} [{low:.3f}, {high:.3f}] on {n} {what}: {words[verdict(low, high)]}"
