"""Reward-model metrics on numbers worked out by hand."""

import math

import pytest

from reward.metrics import (
    expected_calibration_error,
    headline,
    length_buckets,
    pair_metrics,
    pairwise_accuracy,
    pearson,
    plot_length_bias,
    plot_reliability,
    reliability_bins,
    sigmoid,
)


def logit(p):
    return math.log(p / (1 - p))


def test_accuracy_counts_an_exact_tie_as_half():
    # gaps 2, -1, 0, 2 -> right, wrong, half, right
    assert pairwise_accuracy([2, 1, 0, 3], [0, 2, 0, 1]) == 0.625


def test_ece_by_hand():
    # Five bins over [0.5, 1]. p = P(chosen wins); the prediction is right when p > 0.5.
    #   0.92, 0.98 -> bin [0.9, 1.0): mean confidence 0.95, both right: |1 - 0.95| = 0.05, 2 of 4 pairs
    #   0.25       -> confidence 0.75, bin [0.7, 0.8), wrong:          |0 - 0.75| = 0.75, 1 of 4
    #   0.62       -> bin [0.6, 0.7), right:                            |1 - 0.62| = 0.38, 1 of 4
    # ECE = 0.5 * 0.05 + 0.25 * 0.75 + 0.25 * 0.38 = 0.3075
    probabilities = [0.92, 0.98, 0.25, 0.62]
    assert expected_calibration_error(probabilities, bins=5) == pytest.approx(0.3075)
    bins = reliability_bins(probabilities, bins=5)
    assert [b.count for b in bins] == [0, 1, 1, 0, 2]
    assert bins[4].confidence == pytest.approx(0.95) and bins[4].accuracy == 1.0
    assert bins[2].accuracy == 0.0 and math.isnan(bins[0].accuracy)


def test_a_perfectly_calibrated_model_has_zero_ece():
    # 4 pairs at confidence 0.75: 3 right, 1 wrong.
    assert expected_calibration_error([0.75, 0.75, 0.75, 0.25]) == pytest.approx(0.0)


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # cov 4 / sqrt(5 * 5)
    assert math.isnan(pearson([1, 1], [1, 2]))


def test_length_bias_by_hand():
    chosen, rejected = [2, 1, 0, 3], [0, 2, 0, 1]
    chosen_lengths, rejected_lengths = [100, 20, 30, 5], [20, 40, 30, 60]  # differences 80, -20, 0, -55
    buckets = {b["bucket"]: b for b in length_buckets(chosen, rejected, chosen_lengths, rejected_lengths)}
    assert buckets[">= 50"]["pairs"] == 1 and buckets[">= 50"]["accuracy"] == 1.0
    assert buckets["[-50, -10)"]["accuracy"] == 0.0
    assert buckets["[-10, 10)"]["accuracy"] == 0.5
    assert buckets["< -50"]["accuracy"] == 1.0
    assert buckets["[10, 50)"]["pairs"] == 0 and math.isnan(buckets["[10, 50)"]["accuracy"])

    metrics = pair_metrics(chosen, rejected, chosen_lengths, rejected_lengths)
    assert metrics["accuracy"] == 0.625 and metrics["mean_margin"] == 0.75
    # Unequal lengths: pairs 0, 1, 3. The longer reply is chosen only in pair 0; it scores higher in 0 and 1.
    assert metrics["longer_is_chosen"] == pytest.approx(1 / 3)
    assert metrics["longer_scores_higher"] == pytest.approx(2 / 3)
    assert metrics["ece"] == pytest.approx(expected_calibration_error([sigmoid(2), sigmoid(-1), 0.5, sigmoid(2)]))


def test_ties_count_apart():
    metrics = pair_metrics([1.0, 0.5, 2.0], [0.0, 0.25, 0.0], [3, 3, 3], [3, 3, 3], tie=[False, True, False])
    assert metrics["pairs"] == 2 and metrics["accuracy"] == 1.0
    assert metrics["ties"] == 1 and metrics["tie_mean_abs_gap"] == 0.25
    assert "length_buckets" not in headline(metrics) and headline(metrics)["ties"] == 1


def test_plots_are_written(tmp_path):
    metrics = pair_metrics([logit(0.92), logit(0.98), logit(0.25)], [0.0, 0.0, 0.0], [10, 50, 5], [20, 5, 80])
    assert plot_reliability(metrics, tmp_path / "r.png").stat().st_size > 1000
    assert plot_length_bias(metrics, tmp_path / "l.png").stat().st_size > 1000
