"""Reward-model losses on numbers worked out by hand.

log(1 + e^-1) = 0.3132617, log(1 + e) = 1.3132617, log 2 = 0.6931472.
"""

import math

import pytest
import torch

from reward.loss import bradley_terry_loss, preference_loss, tie_loss

SOFTPLUS_MINUS_1 = math.log(1 + math.exp(-1))  # -log sigmoid(1)
SOFTPLUS_1 = math.log(1 + math.e)  # -log sigmoid(-1)
LOG2 = math.log(2)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def test_bradley_terry_per_pair_and_mean():
    losses = bradley_terry_loss(t(1.0, 0.0, 0.0), t(0.0, 0.0, 1.0))
    assert losses.tolist() == pytest.approx([SOFTPLUS_MINUS_1, LOG2, SOFTPLUS_1])
    assert preference_loss(t(1.0, 0.0), t(0.0, 0.0)).item() == pytest.approx((0.3132617 + 0.6931472) / 2, abs=1e-7)


def test_a_margin_asks_for_that_much_of_a_gap():
    # gap 1 with margin 1 counts as no gap at all: log 2; gap 1 with margin -1 is a gap of 2.
    assert bradley_terry_loss(t(1.0), t(0.0), t(1.0)).item() == pytest.approx(LOG2)
    assert bradley_terry_loss(t(1.0), t(0.0), t(-1.0)).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_tie_loss_is_smallest_at_equal_scores_and_symmetric():
    assert tie_loss(t(0.3), t(0.3)).item() == pytest.approx(LOG2)
    assert tie_loss(t(1.0), t(0.0)).item() == pytest.approx((SOFTPLUS_MINUS_1 + SOFTPLUS_1) / 2)  # 0.8132617
    assert tie_loss(t(1.0), t(0.0)).item() == pytest.approx(tie_loss(t(0.0), t(1.0)).item())
    assert tie_loss(t(1.0), t(0.0)).item() == pytest.approx(0.8132617, abs=1e-7)


def test_a_tie_pulls_the_two_scores_together():
    chosen, rejected = t(1.0).requires_grad_(), t(0.0).requires_grad_()
    preference_loss(chosen, rejected, tie=torch.tensor([True])).backward()
    # d/d r_chosen = (sigmoid(d) - sigmoid(-d)) / 2 = (0.7310586 - 0.2689414) / 2 at d = 1: a step lowers chosen
    assert chosen.grad.item() == pytest.approx(0.2310586, abs=1e-7)
    assert rejected.grad.item() == pytest.approx(-0.2310586, abs=1e-7)
    # the same pair as a decided preference pushes them apart instead
    chosen.grad = rejected.grad = None
    preference_loss(chosen, rejected, tie=torch.tensor([False])).backward()
    assert chosen.grad.item() == pytest.approx(-0.2689414, abs=1e-7)


def test_ties_weights_margins_and_centering_together():
    chosen, rejected = t(1.0, 1.0, 0.0), t(0.0, 0.0, 0.0)
    loss = preference_loss(
        chosen,
        rejected,
        margin=t(0.0, 5.0, 0.0),  # a tie ignores its margin
        weight=t(2.0, 1.0, 0.5),
        tie=torch.tensor([False, True, False]),
        center_coefficient=0.01,
    )
    expected = (2 * SOFTPLUS_MINUS_1 + 1 * 0.8132617 + 0.5 * LOG2) / 3 + 0.01 * (1 + 1 + 0) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    # weights scale a pair's pull and do not renormalise: (2 * 0.3132617 + 0.5 * 0.6931472) / 2
    assert preference_loss(t(1.0, 0.0), t(0.0, 0.0), weight=t(2.0, 0.5)).item() == pytest.approx(0.4865485, abs=1e-7)
