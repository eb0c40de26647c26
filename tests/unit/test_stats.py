"""align/stats.py: logistic regression and the seeded bootstrap by hand; Cohen's kappa and Krippendorff's alpha by
hand and against well-kept libraries on the same data (the `krippendorff` package, NLTK's AnnotationTask)."""

import math

import krippendorff  # a dev dependency (pyproject.toml), for this comparison only
import numpy as np
import pytest

from align.stats import (
    bootstrap_ci,
    cohen_kappa,
    interval_text,
    krippendorff_alpha,
    logistic_regression,
    mean_with_ci,
    pairwise_agreement,
    resample_counts,
    verdict,
    wilson_interval,
)

# Logistic regression


def test_logistic_regression_by_hand():
    # An intercept alone on targets averaging 0.75: the fit is logit(0.75) = ln 3.
    w = logistic_regression(np.ones((4, 1)), np.array([1, 1, 1, 0]))
    assert w[0] == pytest.approx(math.log(3), abs=1e-8)
    # Fractional targets (ties): 0.5 and 1 average 0.75 too.
    w = logistic_regression(np.ones((2, 1)), np.array([0.5, 1.0]))
    assert w[0] == pytest.approx(math.log(3), abs=1e-8)
    # Weights count rows: weight 3 on a win, 1 on a loss is the same data.
    w = logistic_regression(np.ones((2, 1)), np.array([1.0, 0.0]), np.array([3.0, 1.0]))
    assert w[0] == pytest.approx(math.log(3), abs=1e-8)


# The bootstrap


def test_bootstrap_is_deterministic_under_a_seed():
    values = np.array([0.1, 0.5, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4])
    mean = lambda idx: values[idx].mean()  # noqa: E731
    first = bootstrap_ci(mean, len(values), rounds=500, seed=11)
    assert first == bootstrap_ci(mean, len(values), rounds=500, seed=11)
    assert first != bootstrap_ci(mean, len(values), rounds=500, seed=12)
    low, high = first
    assert low < values.mean() < high
    assert 0.1 <= low and high <= 0.9
    # A constant has a zero-width interval; mean_with_ci carries the point estimate.
    assert mean_with_ci([2.0, 2.0, 2.0], rounds=50) == {"value": 2.0, "low": 2.0, "high": 2.0}
    assert all(math.isnan(x) for x in bootstrap_ci(mean, 0))
    with pytest.raises(ValueError, match="at least 1 round"):
        bootstrap_ci(mean, 3, rounds=0)


def test_resample_counts():
    counts = resample_counts(5, rounds=200, seed=3)
    assert counts.shape == (200, 5) and np.all(counts.sum(axis=1) == 5)  # each resample draws n items
    assert np.array_equal(counts, resample_counts(5, rounds=200, seed=3))
    assert not np.array_equal(counts, resample_counts(5, rounds=200, seed=4))
    with pytest.raises(ValueError, match="at least 1 round"):
        resample_counts(5, rounds=0)


# Proportions


def test_wilson_interval_by_hand():
    # 8 of 10: the bounds solve (0.8 - x)^2 = z^2 x (1 - x) / 10, i.e. 1.38416 x^2 - 1.98416 x + 0.64 = 0:
    # x = (1.98416 -+ sqrt(0.393441)) / 2.76832 = 0.49016 and 0.94332.
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.49016, abs=1e-5), pytest.approx(0.94332, abs=1e-5))
    # 0 of 10: the upper bound is z^2 / (n + z^2) = 3.8416 / 13.8416.
    assert wilson_interval(0, 10) == (0.0, pytest.approx(3.8416 / 13.8416))
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    assert interval_text(0.8, 10) == "0.800 [0.490, 0.943] on 10"
    assert [verdict(0.55, 0.7), verdict(0.3, 0.45), verdict(0.4, 0.6)] == [
        "better",
        "worse",
        "no detectable difference",
    ]


# Agreement, by hand


def test_cohen_kappa_by_hand():
    # 50 units: yes/yes 20, yes/no 5, no/yes 10, no/no 15. p_o = 0.7; p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5.
    pairs = [("y", "y")] * 20 + [("y", "n")] * 5 + [("n", "y")] * 10 + [("n", "n")] * 15
    assert cohen_kappa(pairs) == pytest.approx(0.4)
    assert cohen_kappa([("a", "a"), ("b", "b")]) == pytest.approx(1.0)
    # p_o = 0, p_e = 0.5: kappa = -1.
    assert cohen_kappa([("a", "b"), ("b", "a")]) == pytest.approx(-1.0)
    assert cohen_kappa([("a", "a"), ("a", "a")]) is None  # chance agreement 1: undefined
    assert cohen_kappa([]) is None


def test_krippendorff_alpha_by_hand():
    # Coincidences: unit 1 (f, f) adds 2 to o_ff; unit 2 adds 1 to o_fs and o_sf; unit 3 (three s) adds 6 * 1/2
    # to o_ss. n_f = 3, n_s = 4, n = 7: alpha = 1 - (n - 1) * 2 / (2 * n_f * n_s) = 1 - 12 / 24 = 0.5.
    units = [{"a": "f", "b": "f"}, {"a": "f", "b": "s"}, {"a": "s", "b": "s", "c": "s"}, {"a": "f"}]
    assert krippendorff_alpha(units) == pytest.approx(0.5)
    assert krippendorff_alpha([{"a": "x", "b": "x"}, {"a": "x", "b": "x"}]) is None  # no variation
    assert krippendorff_alpha([{"a": "x"}]) is None


# Krippendorff (2011), "Computing Krippendorff's alpha-reliability", nominal data with missing values: 0.743.
PUBLISHED = {
    "A": "1 2 3 3 2 1 4 1 2 . . .",
    "B": "1 2 3 3 2 2 4 1 2 5 . 3",
    "C": ". 3 3 3 2 3 4 2 2 5 1 .",
    "D": "1 2 3 3 2 4 4 1 2 5 1 .",
}


def test_krippendorff_alpha_matches_the_published_example():
    columns = zip(*(values.split() for values in PUBLISHED.values()))
    units = [{coder: value for coder, value in zip(PUBLISHED, column) if value != "."} for column in columns]
    assert krippendorff_alpha(units) == pytest.approx(0.743, abs=5e-4)


def test_pairwise_agreement_by_hand():
    # Unit 1: (x, x) agree, (x, y) and (x, y) do not; unit 2: one agreeing pair. 2 of 4.
    assert pairwise_agreement([{"a": "x", "b": "x", "c": "y"}, {"a": "z", "b": "z"}]) == pytest.approx(0.5)
    assert pairwise_agreement([{"a": "x"}]) is None


# Agreement, against the libraries


def labels_table(seed: int, coders: int, units: int, labels: int, missing: float) -> np.ndarray:
    """coders x units label indices, nan where a coder gave no label; labels lean on a per-unit truth so that
    coders agree more than chance."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, labels, size=units)
    table = np.where(rng.random((coders, units)) < 0.6, truth, rng.integers(0, labels, size=(coders, units)))
    return np.where(rng.random((coders, units)) < missing, np.nan, table.astype(float))


def as_units(table: np.ndarray) -> list[dict]:
    """Our form: one {coder: label} per unit, missing labels left out (labels as strings: nominal)."""
    return [
        {f"coder{c}": str(int(table[c, u])) for c in range(table.shape[0]) if not np.isnan(table[c, u])}
        for u in range(table.shape[1])
    ]


@pytest.mark.parametrize(
    ("seed", "coders", "units", "labels", "missing"),
    [(0, 2, 30, 2, 0.0), (1, 3, 50, 4, 0.3), (2, 5, 80, 3, 0.5), (3, 4, 20, 5, 0.1)],
)
def test_krippendorff_alpha_matches_the_krippendorff_package(seed, coders, units, labels, missing):
    table = labels_table(seed, coders, units, labels, missing)
    expected = krippendorff.alpha(reliability_data=table, level_of_measurement="nominal")
    assert krippendorff_alpha(as_units(table)) == pytest.approx(expected, abs=1e-12)


def test_the_published_example_matches_the_krippendorff_package():
    table = np.array([[np.nan if v == "." else float(v) for v in row.split()] for row in PUBLISHED.values()])
    expected = krippendorff.alpha(reliability_data=table, level_of_measurement="nominal")
    assert krippendorff_alpha(as_units(table)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("seed", "units", "labels"), [(0, 30, 2), (1, 60, 4), (2, 15, 3)])
def test_cohen_kappa_and_alpha_match_nltk(seed, units, labels):
    """NLTK's AnnotationTask on two coders who labelled every unit (its kappa does not restrict itself to shared
    units, so missing labels are left to the krippendorff comparison above)."""
    from nltk.metrics.agreement import AnnotationTask

    table = labels_table(seed, 2, units, labels, 0.0)
    triples = [(f"coder{c}", str(u), str(int(table[c, u]))) for c in range(2) for u in range(units)]
    task = AnnotationTask(data=triples)
    pairs = [(str(int(a)), str(int(b))) for a, b in zip(table[0], table[1])]
    assert cohen_kappa(pairs) == pytest.approx(task.kappa(), abs=1e-12)
    assert krippendorff_alpha(as_units(table)) == pytest.approx(task.alpha(), abs=1e-12)
