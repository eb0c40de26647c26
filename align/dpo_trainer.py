"""DPO machinery: the loss, the tokenized pairs and their batch layout, the trainer and the held-out evaluation.

What the DPO stage trains with, kept free of the registry so that tests and benchmarks use it directly:

    dpo_loss          sigmoid (DPO, conservative DPO), robust (rDPO) and ipo on sequence log-probs, with per-pair
                      weights, margins and ties
    tokenize_pairs    chat-templated prompt / chosen / rejected token ids, long prompts cut from the left
    PairCollator      a batch layout that runs each prompt once for both replies (or two rows per pair, TRL's)
    PairDPOTrainer    TRL's DPOTrainer with that data path, that loss, and log-probs of the reply tokens only
    evaluate_pairs    exact held-out metrics over all pairs (accuracy, margins, log-probs, loss)
    cpu_threads       how many torch threads to use on a CPU shared with other work
"""

from __future__ import annotations

import contextlib
import math
import os
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from trl import DPOTrainer
from trl.trainer.utils import use_adapter

from align.errors import AlignError

LOSS_TYPES = ("sigmoid", "robust", "ipo")
AUTO_SMOOTHING_CAP = 0.4  # rDPO divides by 1 - 2 * smoothing: past this, labels are close to coin flips


def cpu_threads(setting: int | str | None) -> int | None:
    """The torch thread count to use: a number as given; auto: one per idle core; None: leave torch's default.

    On a CPU shared with other processes, threads that wait for each other at every op run far slower than one
    thread (benchmarks/dpo_benchmark.py measured 5x on 2 busy cores), while on idle cores more threads win (1.8x).
    auto measures how busy the cores are right now (/proc/stat over half a second; the load average lags by a
    minute) and leaves torch's default where it cannot tell or with a GPU.
    """
    if setting is None:
        return None
    if setting != "auto":
        return int(setting)
    idle = idle_fraction()
    if idle is None or torch.cuda.is_available():
        return None
    cores = torch.get_num_threads()
    return max(1, min(cores, round(cores * idle)))


def idle_fraction(seconds: float = 0.5) -> float | None:
    """The share of CPU time spent idle across all cores over `seconds` (Linux), or None."""
    import time

    def sample():
        fields = [int(value) for value in open("/proc/stat").readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle_before, total_before = sample()
        time.sleep(seconds)
        idle_after, total_after = sample()
    except (OSError, ValueError, IndexError):
        return None
    total = total_after - total_before
    if total <= 0:
        return None
    return min(max((idle_after - idle_before) / total, 0.0), 1.0)  # iowait can step back: keep it a share


# The loss, on sequence log-probs. Kept free of the trainer so it can be checked by hand (tests/unit).


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    margins: torch.Tensor | None = None,
    ties: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean of weight * per-pair loss, per-pair losses).

    sigmoid  -(1-e) log s(z) - e log s(-z), with z = beta * (chosen log-ratio - rejected log-ratio) - margin
             (e = label_smoothing; e = 0 is plain DPO, e > 0 conservative DPO)
    robust   ((1-e) * -log s(z) - e * -log s(-z)) / (1 - 2e): rDPO, unbiased when labels flip with probability e
    ipo      (d - (1/2 + margin) / beta)^2, d = the log-ratio gap averaged per reply token (TRL's normalisation)
    A tie's loss is -(log s(z0) + log s(-z0)) / 2 with z0 = beta * gap (sigmoid, robust), or d^2 (ipo): both
    are smallest when the two implicit rewards are equal.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    margins = torch.zeros_like(chosen_logratios) if margins is None else margins.to(chosen_logratios.dtype)
    ties = torch.zeros_like(chosen_logratios, dtype=torch.bool) if ties is None else ties.bool()
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the ipo loss needs the reply lengths")
        gap = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
        preferred = (gap - (0.5 + margins) / beta) ** 2
        tied = gap**2
    elif loss_type in ("sigmoid", "robust"):
        z0 = beta * (chosen_logratios - rejected_logratios)
        z = z0 - margins
        e = label_smoothing
        if loss_type == "sigmoid":
            preferred = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
        else:
            preferred = ((1 - e) * -F.logsigmoid(z) - e * -F.logsigmoid(-z)) / (1 - 2 * e)
        tied = -(F.logsigmoid(z0) + F.logsigmoid(-z0)) / 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: use one of {', '.join(LOSS_TYPES)}")
    losses = torch.where(ties, tied, preferred)
    if weights is not None:
        return (losses * weights.to(losses.dtype)).mean(), losses
    return losses.mean(), losses


def smoothing_from_agreement(pairwise_agreement: float) -> float:
    """The label flip rate e implied by how often two annotators agree.

    If every vote flips the true preference with probability e, independently, two votes agree with probability
    p = (1-e)^2 + e^2, so e = (1 - sqrt(2p - 1)) / 2: p = 1 gives 0, p = 0.8 gives 0.113, p <= 0.5 gives 0.5 (labels
    carry no signal), capped at AUTO_SMOOTHING_CAP. It is the flip rate of one vote: an upper bound for labels
    aggregated from several votes.
    """
    p = min(max(float(pairwise_agreement), 0.5), 1.0)
    return min((1 - math.sqrt(2 * p - 1)) / 2, AUTO_SMOOTHING_CAP)


# Data: tokenized pairs, the prompt cut from the left, and a batch layout that runs the prompt once.


def tokenize_pairs(
    rows: list[dict], tokenizer, *, max_length: int | None, min_prompt_length: int, overflow: str = "drop"
) -> tuple[list[dict], dict]:
    """Chat-template each pair into prompt / chosen / rejected token ids (TRL's way), cut long prompts from the left.

    A pair whose longer reply leaves less than `min_prompt_length` prompt tokens is dropped (`overflow="drop"`,
    training) or kept (`overflow="cut"`, evaluation: every held-out pair counts): its prompt keeps its last
    `min_prompt_length` tokens and the replies keep their first tokens up to the budget, as TRL truncates
    completions. Returns (examples, counts) with how many rows had the prompt cut, the replies cut, or were dropped.
    """
    if overflow not in ("drop", "cut"):
        raise AlignError(f"overflow must be drop or cut (got {overflow!r})")
    from trl.data_utils import common_prefix_length

    def ids(messages, **kwargs):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])

    examples, truncated, dropped, replies_cut = [], 0, 0, 0
    for row in rows:
        prompt = ids(row["prompt"], add_generation_prompt=True)
        with_chosen = ids(row["prompt"] + row["chosen"])
        with_rejected = ids(row["prompt"] + row["rejected"])
        # The replies start where the tokenized prompt and prompt + reply first differ (TRL does the same).
        start = min(common_prefix_length(prompt, with_chosen), common_prefix_length(prompt, with_rejected))
        prompt, chosen, rejected = prompt[:start], with_chosen[start:], with_rejected[start:]
        if not chosen or not rejected:
            dropped += 1
            continue
        if max_length is not None:
            room = max_length - max(len(chosen), len(rejected))
            if room < min(min_prompt_length, len(prompt)):
                if overflow == "drop":
                    dropped += 1
                    continue
                room = min(min_prompt_length, len(prompt), max_length - 1)
                chosen, rejected = chosen[: max_length - room], rejected[: max_length - room]
                replies_cut += 1
            if len(prompt) > room:
                prompt = prompt[len(prompt) - room :]
                truncated += 1
        examples.append(
            {
                "prompt_ids": prompt,
                "chosen_ids": chosen,
                "rejected_ids": rejected,
                "weight": float(row.get("weight", 1.0)),
                "margin": float(row.get("margin", 0.0)),
                "tie": bool(row.get("tie", False)),
                "length": len(prompt) + len(chosen) + len(rejected),
            }
        )
    counts = {"rows": len(rows), "truncated": truncated, "replies_cut": replies_cut, "dropped": dropped}
    return examples, counts | {"kept": len(examples)}


@dataclass
class PairCollator:
    """Batches tokenized pairs for `pair_logps`.

    share_prompt=True: one row per pair, prompt + chosen + rejected. The rejected reply attends to the prompt and
    not to the chosen reply, and its positions continue the prompt's, so each reply sees exactly what it would see
    alone, while the prompt is computed once. share_prompt=False: two rows per pair (TRL's layout).
    `score_*` list the reply tokens: row, position of the hidden state that predicts the token, token id, and
    segment (pair i's chosen reply is segment i, its rejected reply segment n_pairs + i).
    """

    pad_token_id: int
    share_prompt: bool = True

    def __call__(self, examples: list[dict]) -> dict:
        pairs = len(examples)
        sequences, positions = [], []
        rows, sources, tokens, segments = [], [], [], []

        def score(row: int, prompt_length: int, reply_start: int, reply: list[int], segment: int) -> None:
            # Reply token k sits at reply_start + k. The hidden state that predicts it is the last prompt token's
            # for k = 0 and the reply's own previous token's after that.
            for k, token in enumerate(reply):
                rows.append(row)
                sources.append(prompt_length - 1 if k == 0 else reply_start + k - 1)
                tokens.append(token)
                segments.append(segment)

        for i, example in enumerate(examples):
            prompt, chosen, rejected = example["prompt_ids"], example["chosen_ids"], example["rejected_ids"]
            p, c = len(prompt), len(chosen)
            if self.share_prompt:
                sequences.append(prompt + chosen + rejected)
                positions.append(list(range(p + c)) + list(range(p, p + len(rejected))))
                score(i, p, p, chosen, i)
                score(i, p, p + c, rejected, pairs + i)
            else:
                sequences.append(prompt + chosen)
                score(i, p, p, chosen, i)
        if not self.share_prompt:
            for i, example in enumerate(examples):
                prompt, rejected = example["prompt_ids"], example["rejected_ids"]
                sequences.append(prompt + rejected)
                score(pairs + i, len(prompt), len(prompt), rejected, pairs + i)

        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            input_ids[row, : len(sequence)] = torch.tensor(sequence)
        batch = {"input_ids": input_ids}
        if self.share_prompt:
            masks = [_shared_prompt_mask(example, width) for example in examples]
            batch["attention_mask"] = torch.stack(masks).unsqueeze(1)  # (pairs, 1, width, width); True: may attend
            position_ids = torch.zeros((pairs, width), dtype=torch.long)
            for row, pos in enumerate(positions):
                position_ids[row, : len(pos)] = torch.tensor(pos)
            batch["position_ids"] = position_ids
        else:
            lengths = torch.tensor([len(s) for s in sequences])
            batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        batch |= {
            "score_rows": torch.tensor(rows),
            "score_positions": torch.tensor(sources),
            "score_tokens": torch.tensor(tokens),
            "score_segments": torch.tensor(segments),
            "chosen_lengths": torch.tensor([len(ex["chosen_ids"]) for ex in examples], dtype=torch.float),
            "rejected_lengths": torch.tensor([len(ex["rejected_ids"]) for ex in examples], dtype=torch.float),
            "weight": torch.tensor([float(ex.get("weight", 1.0)) for ex in examples]),
            "margin": torch.tensor([float(ex.get("margin", 0.0)) for ex in examples]),
            "tie": torch.tensor([bool(ex.get("tie", False)) for ex in examples]),
        }
        if "ref_chosen_logps" in examples[0]:
            batch["ref_chosen_logps"] = torch.tensor([ex["ref_chosen_logps"] for ex in examples])
            batch["ref_rejected_logps"] = torch.tensor([ex["ref_rejected_logps"] for ex in examples])
        return batch


def _shared_prompt_mask(example: dict, width: int) -> torch.Tensor:
    p, c, r = len(example["prompt_ids"]), len(example["chosen_ids"]), len(example["rejected_ids"])
    n = p + c + r
    mask = torch.zeros((width, width), dtype=torch.bool)
    mask[:n, :n] = torch.ones((n, n), dtype=torch.bool).tril()
    mask[p + c : n, p : p + c] = False  # the rejected reply does not see the chosen one
    padding = torch.arange(n, width)
    mask[padding, padding] = True  # padding attends to itself: no all-masked row (NaN) in attention
    return mask


def add_pair_scoring(causal_lm) -> None:
    """Let `model(..., score_index=(rows, positions, tokens))` return the log-probs of just those tokens.

    Going through `model(...)` keeps PEFT's adapter switching and accelerate/DDP wrapping in the path; only the
    reply tokens go through the LM head (TRL's CPU path projects every position).
    """
    if getattr(causal_lm, "_align_pair_scoring", False):
        return
    original_forward = causal_lm.forward
    softcap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)

    def forward(self, *args, score_index=None, **kwargs):
        if score_index is None:
            return original_forward(*args, **kwargs)
        dropped = ("labels", "return_dict", "output_attentions", "output_hidden_states", "use_cache")
        kwargs = {key: value for key, value in kwargs.items() if value is not None and key not in dropped}
        hidden = getattr(self, self.base_model_prefix)(*args, use_cache=False, **kwargs).last_hidden_state
        rows, positions, tokens = score_index
        head = self.get_output_embeddings()
        logits = head(hidden[rows, positions].to(head.weight.device)).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return torch.log_softmax(logits, dim=-1).gather(-1, tokens.to(logits.device).unsqueeze(-1)).squeeze(-1)

    causal_lm.forward = types.MethodType(forward, causal_lm)
    causal_lm._align_pair_scoring = True


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each pair's chosen and rejected reply under `model` (its active adapter)."""
    mask = batch["attention_mask"]
    if mask.dim() == 4:
        inner = getattr(model, "module", model)  # under DDP the model is wrapped
        attention = getattr(inner.config, "_attn_implementation", "sdpa")
        if attention not in ("sdpa", "eager"):
            raise AlignError(f"share_prompt needs sdpa or eager attention, not {attention}: set share_prompt: false")
        if attention == "eager":  # eager adds the mask to the scores
            mask = torch.zeros(mask.shape, dtype=inner.dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(inner.dtype).min
            )
    token_logps = model(
        input_ids=batch["input_ids"],
        attention_mask=mask,
        position_ids=batch.get("position_ids"),
        score_index=(batch["score_rows"], batch["score_positions"], batch["score_tokens"]),
    )
    pairs = batch["chosen_lengths"].size(0)
    sums = token_logps.new_zeros(2 * pairs).index_add(0, batch["score_segments"].to(token_logps.device), token_logps)
    return sums[:pairs], sums[pairs:]


class PairDPOTrainer(DPOTrainer):
    """TRL's DPOTrainer, with our data path (pre-tokenized pairs, `PairCollator`), our loss (`dpo_loss`: weights,
    margins, ties) and log-probs from `pair_logps`. The reference, precomputing and logging are TRL's.

    Two private TRL methods are overridden, as no public setting does their job: `_prepare_dataset` (TRL would
    tokenize the pairs again) and `_set_signature_columns_if_needed` (TRL's keeps none of our label columns).
    tests/unit/test_trl_overrides.py fails, naming the method, when a TRL release changes their signatures.
    """

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "prompt_ids" not in dataset.column_names:
            raise AlignError("PairDPOTrainer takes datasets from tokenize_pairs")
        return dataset

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [
                "prompt_ids",
                "chosen_ids",
                "rejected_ids",
                "weight",
                "margin",
                "tie",
                "length",
                "ref_chosen_logps",
                "ref_rejected_logps",
            ]

    def reference(self):
        """The frozen reference: the "ref" adapter (TRL's copy of the starting adapter), else adapters off."""
        if self.ref_model is not None:
            return contextlib.nullcontext()
        model = self.accelerator.unwrap_model(self.model)
        return use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)

    def compute_ref_log_probs(self, model, inputs):
        with torch.no_grad(), self.reference():
            return pair_logps(self.ref_model or model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        chosen, rejected = pair_logps(model, inputs)
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(model, inputs)
        loss, _ = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            loss_type=self.loss_types[0],
            beta=self.beta,
            label_smoothing=self.label_smoothing,
            margins=inputs["margin"] * self.args.margin_scale,
            ties=inputs["tie"],
            weights=inputs["weight"],
            chosen_lengths=inputs["chosen_lengths"],
            rejected_lengths=inputs["rejected_lengths"],
        )
        gather = self.accelerator.gather_for_metrics
        chosen_rewards = gather(self.beta * (chosen - ref_chosen).detach())
        rejected_rewards = gather(self.beta * (rejected - ref_rejected).detach())
        decided = ~gather(inputs["tie"])
        metrics = self._metrics[mode]
        metrics["rewards/chosen"].append(chosen_rewards.mean().item())
        metrics["rewards/rejected"].append(rejected_rewards.mean().item())
        metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
        if decided.any():
            won = (chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()
            metrics["rewards/accuracies"].append(won[decided].mean().item())
        metrics["logps/chosen"].append(gather(chosen.detach()).mean().item())
        metrics["logps/rejected"].append(gather(rejected.detach()).mean().item())
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


# Evaluation on the held-out split: exact sums over all pairs, not averages of batch averages.


def evaluate_pairs(
    trainer: PairDPOTrainer, examples: list[dict], *, reference: dict | None = None, desc="eval"
) -> dict:
    """Policy and reference log-probs of every pair in `examples` (from tokenize_pairs), and the metrics they give.

    `reference` (the "logps" of an earlier call) skips the reference pass. Before any training step the policy is
    a copy of the reference, so one pass serves both.
    """
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    model = trainer.model
    was_training = model.training
    model.eval()
    loader = DataLoader(examples, batch_size=trainer.args.per_device_eval_batch_size, collate_fn=trainer.data_collator)
    columns = {"chosen": [], "rejected": [], "ref_chosen": [], "ref_rejected": []}
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=bool(os.environ.get("TQDM_DISABLE"))):
            batch = {key: value.to(trainer.accelerator.device) for key, value in batch.items()}
            if reference is None:
                ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
                columns["ref_chosen"].append(ref_chosen.float().cpu())
                columns["ref_rejected"].append(ref_rejected.float().cpu())
            if reference is None and trainer.state.global_step == 0:
                chosen, rejected = ref_chosen, ref_rejected
            else:
                chosen, rejected = pair_logps(model, batch)
            columns["chosen"].append(chosen.float().cpu())
            columns["rejected"].append(rejected.float().cpu())
    model.train(was_training)
    logps = {key: torch.cat(values) for key, values in columns.items() if values}
    if reference is not None:
        logps["ref_chosen"], logps["ref_rejected"] = reference["ref_chosen"], reference["ref_rejected"]
    return pair_metrics(trainer, examples, logps)


def pair_metrics(trainer: PairDPOTrainer, examples: list[dict], logps: dict) -> dict:
    """Accuracy, margins, log-probs and loss over all pairs at once (exact, not an average of batch averages)."""
    beta = trainer.beta

    def column(key, dtype=torch.float):
        return torch.tensor([example[key] for example in examples], dtype=dtype)

    ties = column("tie", torch.bool)
    chosen_rewards = beta * (logps["chosen"] - logps["ref_chosen"])
    rejected_rewards = beta * (logps["rejected"] - logps["ref_rejected"])
    margins = chosen_rewards - rejected_rewards
    decided = ~ties
    # A pair whose two rewards are equal (as before any training) counts half: the reward cannot rank it.
    won = (margins > 0).float() + 0.5 * (margins == 0).float()
    prefers_chosen = (logps["chosen"] > logps["rejected"]).float()
    loss, _ = dpo_loss(
        logps["chosen"],
        logps["rejected"],
        logps["ref_chosen"],
        logps["ref_rejected"],
        loss_type=trainer.loss_types[0],
        beta=beta,
        label_smoothing=trainer.label_smoothing,
        margins=column("margin") * trainer.args.margin_scale,
        ties=ties,
        weights=column("weight"),
        chosen_lengths=torch.tensor([len(example["chosen_ids"]) for example in examples], dtype=torch.float),
        rejected_lengths=torch.tensor([len(example["rejected_ids"]) for example in examples], dtype=torch.float),
    )
    nan = float("nan")
    return {
        "reward_accuracy": won[decided].mean().item() if decided.any() else nan,
        "reward_margin": margins[decided].mean().item() if decided.any() else nan,
        "reward_chosen": chosen_rewards.mean().item(),
        "reward_rejected": rejected_rewards.mean().item(),
        "logps_chosen": logps["chosen"].mean().item(),
        "logps_rejected": logps["rejected"].mean().item(),
        # Does the policy itself find the chosen reply likelier? Meaningful before training too.
        "logp_accuracy": prefers_chosen[decided].mean().item() if decided.any() else nan,
        "loss": loss.item(),
        "pairs": len(examples),
        "ties": int(ties.sum()),
        "margins": margins[decided].tolist(),
        "logps": logps,
    }


def freeze_reference(model) -> None:
    """The reference adapter never trains (TRL leaves it trainable until the first switch to it)."""
    for name, parameter in model.named_parameters():
        if ".ref." in name:
            parameter.requires_grad_(False)
