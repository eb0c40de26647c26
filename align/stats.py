"""Statistics shared by every stage and app: intervals and verdicts."""

from __future__ import annotations


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
