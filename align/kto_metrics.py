"""KTO machinery: exact held-out metrics on unpaired feedback, for a KTOTrainer whose reference is an adapter.

Kept free of the registry so tests and benchmarks use it directly. TRL's own evaluation averages batch means
(and leaves the margin out of batches holding one label only); these numbers are over every held-out row:

    reward       beta * (log-prob of the reply under the policy - under the reference): the implicit reward
    accuracy     the share of rows whose reward has the label's sign (desirable > 0, undesirable < 0; 0 counts
                 half, so the policy equal to its reference scores 0.5)
    margin       mean reward of the desirable replies - mean reward of the undesirable ones
    logp margin  the policy's mean per-token log-prob of desirable replies - of undesirable ones: whether it now
                 writes the desirable replies more readily, without reference to the reference
"""

from __future__ import annotations

import math

import torch
from trl.trainer.utils import use_adapter


def feedback_logps(trainer, dataset=None) -> dict:
    """Per held-out row: the reply's summed log-prob under the policy and under the reference, its token count and
    its label, over `dataset` (default: the trainer's eval dataset, which KTOTrainer has tokenized)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    reference = "ref" if "ref" in getattr(model, "peft_config", {}) else None  # None: the adapters switched off
    was_training = model.training
    model.eval()
    out = {"policy": [], "reference": [], "tokens": [], "label": []}
    try:
        for batch in trainer.get_eval_dataloader(dataset):
            batch = {key: value.to(trainer.accelerator.device) for key, value in batch.items()}
            with torch.no_grad():
                out["policy"].append(_reply_logps(model, batch))
                with use_adapter(model, reference):
                    out["reference"].append(_reply_logps(model, batch))
            out["tokens"].append(batch["completion_mask"][:, 1:].sum(-1))
            out["label"].append(batch["label"].bool())
    finally:
        model.train(was_training)
    return {key: torch.cat(values).cpu() for key, values in out.items()}


def _reply_logps(model, batch: dict) -> torch.Tensor:
    """The summed log-prob of each row's reply tokens (the completion mask), from the model's logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].to(logits.dtype)
    token_logps = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token_logps * mask).sum(-1)


def feedback_metrics(logps: dict, beta: float) -> dict:
    """The held-out numbers of the module docstring, from `feedback_logps`."""
    label = logps["label"]
    rewards = beta * (logps["policy"] - logps["reference"])
    per_token = logps["policy"] / logps["tokens"].clamp(min=1)
    signed = torch.where(label, rewards, -rewards)
    right = (signed > 0).float() + 0.5 * (signed == 0).float()

    def mean(values: torch.Tensor) -> float:
        return values.mean().item() if len(values) else math.nan

    desirable, undesirable = rewards[label], rewards[~label]
    return {
        "reward_accuracy": mean(right),
        "reward_margin": mean(desirable) - mean(undesirable),
        "reward_desirable": mean(desirable),
        "reward_undesirable": mean(undesirable),
        "logp_per_token_desirable": mean(per_token[label]),
        "logp_per_token_undesirable": mean(per_token[~label]),
        "logp_margin": mean(per_token[label]) - mean(per_token[~label]),
        "rows": len(label),
        "desirable": int(label.sum()),
        "undesirable": int((~label).sum()),
        "rewards_desirable": desirable.tolist(),
        "rewards_undesirable": undesirable.tolist(),
    }
