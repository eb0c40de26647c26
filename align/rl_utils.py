"""The arithmetic of PPO on per-token tensors: masked statistics, GAE, the clipped losses, the KL controller.

Shapes: [batch, response_tokens]; `mask` is 1 on the tokens of each response (a prefix: up to and including
its end-of-sequence token) and 0 on the padding after it.
"""

from __future__ import annotations

import math

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked entries."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    squares = ((values - mean) ** 2 * mask).sum()
    return squares / (count - 1).clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_sum=None) -> torch.Tensor:
    """Scale to unit variance over the masked entries (and centre them unless shift_mean=False).

    `all_sum` (align.distributed.all_sum) sums a tensor over the processes of a launch: the mean and the variance
    are then those of every process's entries together, as one process holding the whole batch would have them."""
    if all_sum is None:
        mean, var = masked_mean(values, mask), masked_var(values, mask)
    else:
        count = all_sum(mask.sum())
        mean = all_sum((values * mask).sum()) / count.clamp(min=1)
        var = all_sum(((values - mean) ** 2 * mask).sum()) / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation. Returns (advantages, returns), zero past each response's end.

    delta_t = r_t + gamma * V_{t+1} - V_t, with V past the last token taken as 0;
    A_t = delta_t + gamma * lam * A_{t+1}.
    """
    rewards, values = rewards * mask, values * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_mask = mask[:, t + 1] if t + 1 < steps else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] * next_mask if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running * next_mask
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def policy_loss(new_logprobs, old_logprobs, advantages, mask, cliprange: float):
    """PPO's clipped surrogate. Returns (loss, clip fraction, approx KL old->new)."""
    log_ratio = (new_logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approx_kl


def value_loss(new_values, old_values, returns, mask, cliprange_value: float):
    """PPO's clipped value loss: the worse of the unclipped and clipped squared errors, halved."""
    clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    losses = torch.max((new_values - returns) ** 2, (clipped - returns) ** 2)
    loss = 0.5 * masked_mean(losses, mask)
    clipfrac = masked_mean(((clipped - returns) ** 2 > (new_values - returns) ** 2).float(), mask)
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


class FixedKLController:
    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): move the KL coefficient so the KL tracks a target, by at most 20% a horizon."""

    def __init__(self, value: float, target: float, horizon: int):
        self.value, self.target, self.horizon = value, target, horizon

    def update(self, current_kl: float, steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * steps / self.horizon


class RunningMoments:
    """Running mean and standard deviation of scalar scores (Chan et al.'s parallel update)."""

    def __init__(self):
        self.count, self.mean, self.var = 0, 0.0, 1.0

    def update(self, values: list[float]) -> None:
        if not values:
            return
        n = len(values)
        batch_mean = sum(values) / n
        batch_var = sum((v - batch_mean) ** 2 for v in values) / n
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.count > 1 else 1.0

    def state(self) -> dict:
        return {"count": self.count, "mean": self.mean, "var": self.var}

    def load(self, state: dict) -> None:
        self.count, self.mean, self.var = state["count"], state["mean"], state["var"]
