"""Reward-model losses on a batch of pair scores.

Bradley-Terry: P(chosen beats rejected) = sigmoid(r_chosen - r_rejected), trained by -log of it. A label
margin m asks for r_chosen - r_rejected > m (Llama 2's margin loss, as in TRL). A tie is a pair with no winner:
the same cross-entropy with target 1/2, -(log sigmoid(d) + log sigmoid(-d)) / 2, which is smallest at d = 0, so
a tie pulls its two scores together instead of pushing one above the other. Per-pair weights scale each term.

Attribute heads (reward/objectives.py) regress the rubric scores: per head the mean squared error over the replies
that carry its score, then the mean over the heads that have any in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None):
    """Per-pair -log sigmoid(r_chosen - r_rejected - margin)."""
    difference = chosen - rejected
    if margin is not None:
        difference = difference - margin
    return -F.logsigmoid(difference)


def tie_loss(chosen: torch.Tensor, rejected: torch.Tensor):
    """Per-pair cross-entropy against P = 1/2: log 2 at equal scores, growing with the gap either way."""
    difference = chosen - rejected
    return -(F.logsigmoid(difference) + F.logsigmoid(-difference)) / 2


def preference_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    tie: torch.Tensor | None = None,
    center_coefficient: float | None = None,
) -> torch.Tensor:
    """The batch loss: Bradley-Terry (with margins) on decided pairs, the tie loss on ties, weighted, averaged.

    The mean is over pairs (not over weights), so a weight of 0.5 halves a pair's pull whatever its batch holds.
    `center_coefficient` adds c * mean((r_chosen + r_rejected)^2), which keeps rewards near zero (TRL's
    center_rewards_coefficient).
    """
    losses = bradley_terry_loss(chosen, rejected, margin)
    if tie is not None:
        losses = torch.where(tie.bool(), tie_loss(chosen, rejected), losses)
    if weight is not None:
        losses = losses * weight
    loss = losses.mean()
    if center_coefficient:
        loss = loss + center_coefficient * torch.mean((chosen + rejected) ** 2)
    return loss


def attribute_loss(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over heads of each head's mean squared error on its scored replies. The last dimension is the head;
    `mask` is 1 where a reply carries that head's score. Heads with no score in the batch are left out; 0 (still
    part of the graph) when no head has any."""
    predicted = predicted.reshape(-1, predicted.shape[-1])
    target = target.reshape(predicted.shape).to(predicted.dtype)
    mask = mask.reshape(predicted.shape).to(predicted.dtype)
    counts = mask.sum(dim=0)
    per_head = ((predicted - target) ** 2 * mask).sum(dim=0) / counts.clamp(min=1)
    present = counts > 0
    if not present.any():
        return predicted.sum() * 0
    return per_head[present].mean()
