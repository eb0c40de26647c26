"""PPO arithmetic on small tensors, against numbers worked out by hand (in the comments)."""

import math

import pytest
import torch

from align.rl_utils import (
    AdaptiveKLController,
    RunningMoments,
    gae,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_gae_with_full_mask():
    # gamma=1, lam=0.5, V=0.5 everywhere, reward 1 on the last token:
    # t=2: delta = 1 - 0.5 = 0.5                 A2 = 0.5
    # t=1: delta = 0 + 0.5 - 0.5 = 0             A1 = 0 + 0.5 * 0.5 = 0.25
    # t=0: delta = 0                              A0 = 0.5 * 0.25 = 0.125
    advantages, returns = gae(t([[0, 0, 1]]), t([[0.5, 0.5, 0.5]]), t([[1, 1, 1]]), gamma=1.0, lam=0.5)
    torch.testing.assert_close(advantages, t([[0.125, 0.25, 0.5]]))
    torch.testing.assert_close(returns, t([[0.625, 0.75, 1.0]]))


def test_gae_stops_at_the_end_of_the_response():
    # gamma=0.9, lam=0.8, mask [1, 1, 0]: the third token is padding (its reward 9 and value 7 are ignored).
    # t=1: delta = 2 + 0 - 1 = 1                          A1 = 1
    # t=0: delta = 1 + 0.9 * 1 - 0.5 = 1.4                A0 = 1.4 + 0.72 * 1 = 2.12
    advantages, returns = gae(t([[1, 2, 9]]), t([[0.5, 1.0, 7]]), t([[1, 1, 0]]), gamma=0.9, lam=0.8)
    torch.testing.assert_close(advantages, t([[2.12, 1.0, 0.0]]))
    torch.testing.assert_close(returns, t([[2.62, 2.0, 0.0]]))


def test_clipped_policy_loss():
    # ratio0 = e^0.5 = 1.6487 with A=1: max(-1.6487, -1.2) = -1.2 (clipped); ratio1 = 1 with A=-2: 2.
    # loss = (-1.2 + 2) / 2 = 0.4; one of two tokens clipped; approx KL = 0.5 * mean(0.25, 0) = 0.0625.
    loss, clipfrac, approx_kl = policy_loss(t([[0.0, -1.0]]), t([[-0.5, -1.0]]), t([[1.0, -2.0]]), t([[1, 1]]), 0.2)
    assert loss.item() == pytest.approx(0.4)
    assert clipfrac.item() == pytest.approx(0.5)
    assert approx_kl.item() == pytest.approx(0.0625)


def test_clipped_policy_loss_ignores_padding():
    loss, _, _ = policy_loss(t([[0.0, 5.0]]), t([[0.0, 0.0]]), t([[1.0, 100.0]]), t([[1, 0]]), 0.2)
    assert loss.item() == pytest.approx(-1.0)  # ratio 1, A=1 on the only real token


def test_clipped_value_loss():
    # token 0: clipped value 0.5 + 0.2 = 0.7; max((1-2)^2, (0.7-2)^2) = 1.69
    # token 1: clipped value 0.5 - 0.2 = 0.3; max(0^2, 0.3^2) = 0.09
    # loss = 0.5 * (1.69 + 0.09) / 2 = 0.445; both tokens take the clipped error
    loss, clipfrac = value_loss(t([[1.0, 0.0]]), t([[0.5, 0.5]]), t([[2.0, 0.0]]), t([[1, 1]]), 0.2)
    assert loss.item() == pytest.approx(0.445)
    assert clipfrac.item() == pytest.approx(1.0)


def test_whiten_and_masked_mean():
    # over [1, 2, 3] (the 100 is padding): mean 2, unbiased variance 1
    mask = t([[1, 1, 1, 0]])
    assert masked_mean(t([[1, 2, 3, 100]]), mask).item() == pytest.approx(2.0)
    torch.testing.assert_close(whiten(t([[1, 2, 3, 100]]), mask), t([[-1, 0, 1, 0]]), atol=1e-6, rtol=0)


def test_adaptive_kl_moves_at_most_twenty_percent_per_horizon():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    controller.update(current_kl=12.0, steps=1000)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 0.1)
    assert controller.value == pytest.approx(0.102)
    controller.update(current_kl=3.0, steps=1000)  # error -0.5 clipped to -0.2: 0.102 * (1 - 0.02)
    assert controller.value == pytest.approx(0.09996)


def test_running_moments_match_the_population_statistics():
    moments = RunningMoments()
    moments.update([1.0, 2.0, 3.0])
    assert (moments.mean, moments.var) == pytest.approx((2.0, 2 / 3))
    moments.update([5.0])
    # [1, 2, 3, 5]: mean 2.75, variance (3.0625 + 0.5625 + 0.0625 + 5.0625) / 4 = 2.1875
    assert (moments.mean, moments.var) == pytest.approx((2.75, 2.1875))
    assert moments.std == pytest.approx(math.sqrt(2.1875))
