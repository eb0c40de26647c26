"""Reward-model machinery: which layers LoRA trains, the tokenized pairs with their labels, the collator and the
trainer with our loss. Kept free of the registry, so that tests and benchmarks use it directly.

    training_examples         token ids per pair plus the label columns in use (margin, weight, tie, and the
                              attribute heads' targets: reward/objectives.py)
    PairCollator              TRL's preference collator plus per-pair weights and tie flags
    PreferenceRewardTrainer   TRL's RewardTrainer with the loss of reward/loss.py (margins, weights, ties)
    CachedStateCollator       batches of cached frozen-layer states (reward/features.py) instead of token ids
    layer_linear_names, top_layers   LoRA on the top transformer layers only
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from align.errors import AlignError
from reward.features import add_feature_scoring, pad_states
from reward.loss import attribute_loss, preference_loss
from reward.objectives import attribute_targets


def layer_linear_names(model, target_modules) -> list[str]:
    """The module names LoRA targets inside the transformer layers: every linear layer's for 'all-linear'."""
    if isinstance(target_modules, list):
        return target_modules
    if target_modules != "all-linear":
        raise AlignError(
            f"config key 'lora_top_layers' needs lora_target_modules to be all-linear or a list of names "
            f"(got the pattern {target_modules!r})"
        )
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }
    return sorted(names)


def top_layers(model, count: int) -> list[int]:
    """The indices of the model's top `count` transformer layers (refused when it has fewer)."""
    total = model.config.num_hidden_layers
    if count > total:
        raise AlignError(f"config key 'lora_top_layers' is {count}, but {model.config.name_or_path} has {total} layers")
    return list(range(total - count, total))


def training_examples(
    rows: list[dict],
    encoded: list,
    *,
    use_margins: bool,
    use_weights: bool,
    ties: str,
    objectives: Sequence[str] = (),
) -> tuple[list[dict], int]:
    """Token ids per pair plus the label columns in use; returns (examples, ties dropped).

    `encoded` is align.truncation.encode_rows's output for `rows` (None for a pair that does not fit). `ties`:
    together (tie flags for the tie-aware loss) or drop (tied pairs are left out). `objectives`: the attribute
    heads, whose targets and masks ([2][A]: chosen, rejected) come from the rows' rubric `scores`.
    """
    has_margin = use_margins and any("margin" in row for row in rows)
    has_weight = use_weights and any("weight" in row for row in rows)
    has_tie = ties == "together" and any(row.get("tie") for row in rows)
    examples, ties_dropped = [], 0
    for row, item in zip(rows, encoded):
        if item is None:
            continue  # a reply alone is longer than max_length: counted by the truncation stats
        if row.get("tie") and ties == "drop":
            ties_dropped += 1
            continue
        chosen, rejected = item.sequence(0), item.sequence(1)
        example = {
            "chosen_ids": chosen,
            "rejected_ids": rejected,
            "length": max(len(chosen), len(rejected)),
            "reply_start": len(item.prompt_ids),  # both replies follow the same (cut) prompt
        }
        if has_margin:
            example["margin"] = float(row.get("margin", 0.0))
        if has_weight:
            example["weight"] = float(row.get("weight", 1.0))
        if has_tie:
            example["tie"] = bool(row.get("tie", False))
        if objectives:
            example["attribute_targets"], example["attribute_mask"] = attribute_targets(row, objectives)
        examples.append(example)
    return examples, ties_dropped


@dataclass
class PairCollator(DataCollatorForPreference):
    """TRL's collator (chosen then rejected, right-padded, margins) plus per-pair weights and tie flags, and with
    `reply_starts` (reply_mean pooling) where each reply begins."""

    reply_starts: bool = False

    def torch_call(self, examples: list[dict]) -> dict:
        batch = super().torch_call(examples)  # margins as TRL has them
        return _label_columns(batch, examples, margin=False, reply_starts=self.reply_starts)


def _label_columns(batch: dict, examples: list[dict], *, margin: bool = True, reply_starts: bool = False) -> dict:
    if reply_starts:  # chosen then rejected, as the sequences are
        starts = [e["reply_start"] for e in examples]
        batch["reply_start"] = torch.tensor(starts + starts, dtype=torch.long)
    if margin and "margin" in examples[0]:
        batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
    if "weight" in examples[0]:
        batch["weight"] = torch.tensor([e["weight"] for e in examples], dtype=torch.float)
    if "tie" in examples[0]:
        batch["tie"] = torch.tensor([e["tie"] for e in examples], dtype=torch.bool)
    if "attribute_targets" in examples[0]:  # [pairs, 2 (chosen, rejected), attributes]
        for key in ("attribute_targets", "attribute_mask"):
            batch[key] = torch.tensor([e[key] for e in examples], dtype=torch.float)
    return batch


@dataclass
class CachedStateCollator:
    """Pairs as cached hidden states: `states[example["index"]]` is (chosen, rejected), each [length, hidden].
    A batch holds the chosen states then the rejected ones, right-padded, plus the label columns in use."""

    states: list
    reply_starts: bool = False

    def __call__(self, examples: list[dict]) -> dict:
        pairs = [self.states[e["index"]] for e in examples]
        states, attention_mask = pad_states([c for c, _ in pairs] + [r for _, r in pairs])
        batch = {"states": states, "attention_mask": attention_mask}
        return _label_columns(batch, examples, reply_starts=self.reply_starts)


class PreferenceRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer with our loss: margins as TRL has them, plus weights and ties. The private
    `_set_signature_columns_if_needed` keeps our label columns (tests/unit/test_trl_overrides.py watches it)."""

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:  # keep our label columns, and `length` for grouped batches
            self._signature_columns = [
                "chosen_ids",
                "rejected_ids",
                "margin",
                "weight",
                "tie",
                "length",
                "index",
                "reply_start",
                "attribute_targets",
                "attribute_mask",
            ]

    def __init__(self, model, *args, **kwargs):
        # TRL refuses a model with more than one output; ours has one per head (reward/objectives.py): output 0 is
        # the preference score TRL expects, and compute_loss reads the others. Shown one label while TRL checks.
        config = model.config
        labels = config.id2label
        config.id2label = {0: labels[0]}
        try:
            super().__init__(model, *args, **kwargs)
        finally:
            config.id2label = labels
        add_feature_scoring(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        # Scores come from `model(...)` (add_feature_scoring): under DDP the forward pass must go through its wrapper.
        if "states" in inputs:  # cached frozen-layer states: only the top layers run (inside top_layers_only)
            with self.accelerator.autocast():
                scores = model(
                    inputs_embeds=inputs["states"],
                    attention_mask=inputs["attention_mask"],
                    reply_start=inputs.get("reply_start"),
                    cached_states=True,
                )
        elif "reply_start" in inputs:  # the head reads the mean of each reply's tokens
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            scores = model(input_ids=ids, attention_mask=mask, reply_start=inputs["reply_start"])
        else:
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            scores = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        heads = scores.reshape(scores.shape[0], -1)  # [2 x pairs, heads]: the preference head first
        outputs = {"logits": heads}
        heads = heads.float()  # the loss in fp32 under bf16 autocast
        chosen, rejected = heads[:, 0].chunk(2)
        tie = inputs.get("tie")
        loss = preference_loss(
            chosen,
            rejected,
            margin=inputs.get("margin"),
            weight=inputs.get("weight"),
            tie=tie,
            center_coefficient=self.args.center_rewards_coefficient,
        )
        if "attribute_targets" in inputs:  # the attribute heads regress the rubric scores (reward/objectives.py)
            predicted = torch.stack(heads[:, 1:].chunk(2), dim=1)  # [pairs, 2 (chosen, rejected), attributes]
            attributes = attribute_loss(predicted, inputs["attribute_targets"], inputs["attribute_mask"])
            loss = loss + attributes
            gathered = self.accelerator.gather_for_metrics(attributes.detach())
            self._metrics[mode]["attribute_loss"].append(gathered.mean().item())
        with torch.no_grad():
            decided = ~tie if tie is not None else torch.ones_like(chosen, dtype=torch.bool)
            if decided.any():
                accuracy = (chosen[decided] > rejected[decided]).float().mean()
                margin = (chosen[decided] - rejected[decided]).mean()
                self._metrics[mode]["accuracy"].append(self.accelerator.gather_for_metrics(accuracy).mean().item())
                self._metrics[mode]["margin"].append(self.accelerator.gather_for_metrics(margin).mean().item())
        return (loss, outputs) if return_outputs else loss
