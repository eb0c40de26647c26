"""DPO stage: align a policy on a registry `preference` dataset with TRL's DPOTrainer.

    # LoRA from the SFT adapter (the default): the SFT adapter is the frozen reference
    align dpo --config recipes/dpo/smollm2-135m-lora.yaml
    # any config key can be overridden; --resume continues the last interrupted dpo run
    align dpo --config recipes/dpo/smollm2-135m-lora.yaml --model adapter:sft@2 --dataset hh-harmless-train \
        --eval_dataset hh-harmless-test --loss_type robust --label_smoothing auto --max_steps 50
    align dpo --config recipes/dpo/smollm2-135m-lora.yaml --resume
    # from a base model: a fresh LoRA adapter, and the base (adapters disabled) is the reference
    align dpo --config recipes/dpo/smollm2-135m-lora.yaml --model smollm2-135m

One base model sits in memory. Starting from `adapter:NAME`, it carries two LoRA adapters: the trainable policy
("default", initialised from the SFT weights) and the frozen reference ("ref", TRL's copy of the SFT weights).
Starting from a base model, the reference is that base with the adapter switched off. Nothing is loaded twice.

Losses (`loss_type`): sigmoid (DPO; with `label_smoothing` it is conservative DPO), robust (rDPO: unbiased under
labels flipped with probability `label_smoothing`) and ipo. `label_smoothing: auto` derives the flip rate from the
annotator agreement recorded in the data's lineage. Optional row fields are used when present:
  weight   the pair's loss is multiplied by it (2 counts like two copies of the pair; 0 ignores it)
  margin   in implicit-reward units: sigmoid/robust ask beta * gap to exceed it, ipo moves its target up by it
  tie      "neither is better": the loss pulls the two implicit rewards together (a 50/50 Bradley-Terry label, or
           an IPO target of 0); ties are left out of the accuracy
Long pairs are cut from the left of the prompt (the replies and the latest context stay); a pair whose reply alone
does not fit is dropped and counted. The prompt is run once for both replies (`share_prompt`), only reply
tokens go through the LM head, and `torch_threads: auto` uses one CPU thread per idle core. Evaluation on a
held-out split (implicit-reward accuracy and margins, chosen and rejected log-probs) runs before and after
training and lands in the run report with plots. The output is
`adapter:NAME@V` with lineage to the starting adapter, the preference versions and the run.
"""

from __future__ import annotations

import contextlib
import math
import os
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from align.config import (
    AdapterFields,
    StageFields,
    build_config,
    config_to_dict,
    peft_config_for,
    quantization_config_for,
)
from align.errors import AlignError
from align.models import load_model, resolve_model
from align.registry import Registry
from align.runs import (
    history_series,
    last_checkpoint,
    live_metrics_callback,
    open_run,
    plot_series,
    recipe_for,
    write_metrics,
    write_report,
)

LOSS_TYPES = ("sigmoid", "robust", "ipo")
AUTO_SMOOTHING_CAP = 0.4  # rDPO divides by 1 - 2 * smoothing: past this, labels are close to coin flips


@dataclass
class DPOStageConfig(StageFields, AdapterFields, DPOConfig):
    model: str = field(default="adapter:sft", metadata={"help": "adapter:NAME[@V] (the SFT adapter) or a base model"})
    output_name: str | None = field(default="dpo", metadata={"help": "artifact name: adapter:NAME"})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard, none, ..."})
    label_smoothing: float | str = field(
        default=0.0,
        metadata={"help": "probability a label is flipped, in [0, 0.5), or 'auto' (from the recorded agreement)"},
    )
    share_prompt: bool = field(
        default=True,
        metadata={"help": "run the prompt once for both replies (false: two sequences per pair, TRL's layout)"},
    )
    min_prompt_length: int = field(
        default=16, metadata={"help": "a pair keeps at least this many prompt tokens, or it is dropped"}
    )
    margin_scale: float = field(default=1.0, metadata={"help": "multiplies the rows' margins (0 ignores them)"})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on the first N pairs of the eval split"})
    torch_threads: int | str | None = field(
        default=None,
        metadata={"help": "CPU threads: a number, auto (the idle cores, by the load average) or null (torch's)"},
    )

    def __post_init__(self):
        self.check_stage_fields()
        self.check_adapter_fields()
        check_dpo_fields(self)
        if self.report_to == "tensorboard" and not _tensorboard_installed():
            self.report_to = "none"
        super().__post_init__()


def check_dpo_fields(config: DPOStageConfig) -> None:
    """What our loss and data path support, checked at parse time."""
    if isinstance(config.loss_type, str):
        config.loss_type = [config.loss_type]
    if len(config.loss_type) != 1 or config.loss_type[0] not in LOSS_TYPES:
        raise ValueError(f"config key 'loss_type' must be one of {', '.join(LOSS_TYPES)} (got {config.loss_type!r})")
    if isinstance(config.label_smoothing, str):
        text = config.label_smoothing.strip().lower()
        if text != "auto":
            raise ValueError(f"config key 'label_smoothing' must be a number in [0, 0.5) or auto (got {text!r})")
        config.label_smoothing = "auto"
    elif not 0 <= config.label_smoothing < 0.5:
        raise ValueError(f"config key 'label_smoothing' must be in [0, 0.5) (got {config.label_smoothing!r})")
    if config.loss_type[0] == "ipo" and config.label_smoothing not in (0, 0.0):
        raise ValueError("config key 'label_smoothing' applies to the sigmoid and robust losses, not to ipo")
    if config.peft != "lora":
        raise ValueError(
            f"config key 'peft': DPO trains a LoRA adapter, so the frozen start is the reference without a second "
            f"model copy (got {config.peft!r})"
        )
    if config.max_length is not None and config.max_length <= config.min_prompt_length + 1:
        raise ValueError(f"config key 'max_length' must exceed min_prompt_length + 1 (got {config.max_length!r})")
    if config.min_prompt_length < 1:
        raise ValueError(f"config key 'min_prompt_length' must be at least 1 (got {config.min_prompt_length!r})")
    if config.eval_limit is not None and config.eval_limit < 1:
        raise ValueError(f"config key 'eval_limit' must be at least 1 (got {config.eval_limit!r})")
    if isinstance(config.torch_threads, str):
        if config.torch_threads.strip().lower() != "auto":
            raise ValueError(
                f"config key 'torch_threads' must be a number, auto or null (got {config.torch_threads!r})"
            )
        config.torch_threads = "auto"
    if isinstance(config.torch_threads, int) and config.torch_threads < 1:
        raise ValueError(f"config key 'torch_threads' must be at least 1 (got {config.torch_threads!r})")
    if config.margin_scale < 0:
        raise ValueError(f"config key 'margin_scale' must be at least 0 (got {config.margin_scale!r})")
    unsupported = {
        "ld_alpha": config.ld_alpha is not None,
        "f_divergence_type": config.f_divergence_type != "reverse_kl",
        "use_weighting": config.use_weighting,
        "sync_ref_model": config.sync_ref_model,
        "loss_weights": config.loss_weights is not None,
        "truncation_mode": config.truncation_mode != "keep_start",  # ours: the prompt is cut from the left
    }
    for key, is_set in unsupported.items():
        if is_set:
            raise ValueError(f"config key '{key}' is not supported by align dpo (its loss is sigmoid, robust or ipo)")


def _tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


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


def recorded_agreement(registry: Registry, version) -> tuple[dict, object] | None:
    """meta["agreement"] of the version, or of its nearest ancestor in the lineage that has one."""
    for node in registry.lineage(version, direction="up").nodes.values():  # nearest first
        agreement = (getattr(node, "meta", None) or {}).get("agreement")
        if isinstance(agreement, dict):
            return agreement, node
    return None


def resolve_label_smoothing(config: DPOStageConfig, registry: Registry, version) -> tuple[float, str]:
    """The smoothing to train with, and one line saying where it came from."""
    if config.label_smoothing != "auto":
        return float(config.label_smoothing), f"label_smoothing {config.label_smoothing}"
    found = recorded_agreement(registry, version)
    if found is None:
        return 0.0, f"label_smoothing auto: no annotator agreement recorded in the lineage of {version.ref}; using 0"
    agreement, source = found
    if agreement.get("pairwise_agreement") is None:
        return 0.0, (
            f"label_smoothing auto: the agreement recorded on {source.ref} has no pairwise figure (no pair was "
            "judged by two annotators); using 0"
        )
    value = smoothing_from_agreement(agreement["pairwise_agreement"])
    return value, (
        f"label_smoothing auto: pairwise agreement {agreement['pairwise_agreement']:.3f} recorded on {source.ref} "
        f"-> a per-vote flip rate of {value:.3f}"
    )


# Data: tokenized pairs, the prompt cut from the left, and a batch layout that runs the prompt once.


def tokenize_pairs(
    rows: list[dict], tokenizer, *, max_length: int | None, min_prompt_length: int
) -> tuple[list[dict], dict]:
    """Chat-template each pair into prompt / chosen / rejected token ids (TRL's way), cut long prompts from the left.

    Returns (examples, counts) where counts holds how many rows were truncated and dropped.
    """
    from trl.data_utils import common_prefix_length

    def ids(messages, **kwargs):
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])

    examples, truncated, dropped = [], 0, 0
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
                dropped += 1
                continue
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
    return examples, {"rows": len(rows), "truncated": truncated, "dropped": dropped, "kept": len(examples)}


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
    margins, ties) and log-probs from `pair_logps`. The reference, precomputing and logging are TRL's."""

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

    def _compute_loss(self, model, inputs, return_outputs):
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


# The stage.


def run_dpo(
    config: DPOStageConfig,
    registry: Registry,
    *,
    recipe: dict | None = None,
    resume: str | bool | None = None,
    callbacks=(),
):
    """Train, evaluate, save and register. Returns the registered adapter artifact."""
    import datasets

    # Everything that can be wrong with the inputs fails here, before any model is loaded.
    dataset = registry.resolve(config.dataset, kind="preference")
    if config.eval_dataset:
        train_version, eval_version = dataset, registry.resolve(config.eval_dataset, kind="preference")
    else:
        if dataset.num_rows < 2:
            raise AlignError(f"{dataset.ref} has {dataset.num_rows} row: too few to hold some out for evaluation")
        train_version, eval_version = registry.split(dataset, test_size=config.eval_split, seed=config.seed)
    resolved = resolve_model(config.model, registry)  # a reference that does not resolve fails now
    start = None
    if config.model.startswith("rm:"):
        raise AlignError(f"DPO starts from an SFT adapter or a base model, not the reward model {config.model}")
    if resolved.adapter_path is not None:
        start = registry.resolve_artifact(config.model)
        _check_lora_adapter(resolved.adapter_path, config.model)
    base_model = start.base_model if start else config.model
    label_smoothing, smoothing_note = resolve_label_smoothing(config, registry, train_version)

    inputs = [dataset.ref, train_version.ref, eval_version.ref, start.ref if start else config.model]
    run = open_run(
        registry,
        "dpo",
        recipe=recipe or {},
        config_dict=config_to_dict(config),
        inputs=inputs,
        seed=config.seed,
        resume=resume,
    )
    config.output_dir = str(run.dir / "checkpoints")
    config.label_smoothing = label_smoothing
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.dir / "logs")
    print(
        f"run {run.id}: DPO ({config.loss_type[0]}) of {config.model} on {train_version.ref} "
        f"(eval on {eval_version.ref})"
    )
    print(smoothing_note)
    threads = cpu_threads(config.torch_threads)
    if threads:
        print(f"torch threads: {threads} (torch_threads {config.torch_threads})")
        torch.set_num_threads(threads)
    try:
        model, tokenizer = load_model(
            config.model,
            registry,
            dtype=config.torch_dtype,
            trainable_adapter=True,
            quantization_config=quantization_config_for(config),
        )
        if not getattr(tokenizer, "chat_template", None):
            raise AlignError(f"{config.model}'s tokenizer has no chat template, which conversational pairs need")
        train_examples, train_counts = tokenize_pairs(
            registry.rows(train_version),
            tokenizer,
            max_length=config.max_length,
            min_prompt_length=config.min_prompt_length,
        )
        eval_rows = registry.rows(eval_version)[: config.eval_limit]
        eval_examples, eval_counts = tokenize_pairs(
            eval_rows, tokenizer, max_length=config.max_length, min_prompt_length=config.min_prompt_length
        )
        for part, counts in (("train", train_counts), ("eval", eval_counts)):
            print(
                f"{part}: {counts['kept']} of {counts['rows']} pairs; {counts['truncated']} prompts cut from the left, "
                f"{counts['dropped']} pairs dropped (a reply longer than max_length - min_prompt_length)"
            )
        if not train_examples or not eval_examples:
            raise AlignError(
                f"no pair fits max_length {config.max_length} (each reply must leave room for "
                f"{config.min_prompt_length} prompt tokens): raise max_length"
            )
        add_pair_scoring(model.get_base_model() if start else model)
        # The trainer sees the eval split only when it evaluates during training (eval_strategy); the before and
        # after numbers come from evaluate_pairs.
        evaluates = str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "no"
        trainer = PairDPOTrainer(
            model=model,
            args=config,
            data_collator=PairCollator(tokenizer.pad_token_id, share_prompt=config.share_prompt),
            train_dataset=datasets.Dataset.from_list(train_examples),
            eval_dataset=datasets.Dataset.from_list(eval_examples) if evaluates else None,
            processing_class=tokenizer,
            peft_config=None if start else peft_config_for(config),
            callbacks=[live_metrics_callback(run), *callbacks],
        )
        freeze_reference(trainer.model)
        before = evaluate_pairs(trainer, eval_examples, desc="eval before")
        trainer.train(resume_from_checkpoint=last_checkpoint(run.dir / "checkpoints") if resume else None)
        after = evaluate_pairs(trainer, eval_examples, reference=before["logps"], desc="eval after")

        output_dir = run.dir / "adapter"
        trainer.model.save_pretrained(str(output_dir), selected_adapters=["default"])
        tokenizer.save_pretrained(str(output_dir))
        metrics = _metrics(before, after, train_counts, eval_counts, trainer, label_smoothing)
        parents = [(train_version, "train"), (eval_version, "eval")]
        if start:
            parents += [(start, "init"), (start, "reference")]
        artifact = registry.register_artifact(
            "adapter",
            config.output_name,
            output_dir,
            base_model=base_model,
            run=run,
            parents=parents,
            meta={
                "peft": "lora",
                "stage": "dpo",
                "loss_type": config.loss_type[0],
                "beta": config.beta,
                "label_smoothing": label_smoothing,
                "reference": start.ref if start else base_model,
                "metrics": metrics,
            },
        )
        _report(run, config, trainer.state.log_history, metrics, before, after, artifact, smoothing_note)
        registry.finish_run(run, metrics=metrics, outputs=[artifact.ref])
        print(
            f"held-out implicit-reward accuracy on {eval_version.ref} ({after['pairs'] - after['ties']} pairs): "
            f"before {metrics['eval_reward_accuracy_before']:.3f} (the policy is the reference: chance), "
            f"after {metrics['eval_reward_accuracy']:.3f} (mean margin {metrics['eval_reward_margin']:+.4f})"
        )
        print(f"registered {artifact.ref}; report {run.dir / 'report.md'}")
        return artifact
    except BaseException as exc:
        registry.finish_run(run, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _check_lora_adapter(path, ref: str) -> None:
    import json

    peft_type = json.loads((path / "adapter_config.json").read_text()).get("peft_type")
    if peft_type != "LORA":
        raise AlignError(f"{ref} is a {peft_type} adapter; DPO continues LoRA adapters only")


def freeze_reference(model) -> None:
    """The reference adapter never trains (TRL leaves it trainable until the first switch to it)."""
    for name, parameter in model.named_parameters():
        if ".ref." in name:
            parameter.requires_grad_(False)


def _metrics(before, after, train_counts, eval_counts, trainer, label_smoothing) -> dict:
    metrics = {}
    for key in ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected", "logp_accuracy", "loss"):
        metrics[f"eval_{key}_before"] = before[key]
        metrics[f"eval_{key}"] = after[key]
    metrics |= {
        "eval_reward_chosen": after["reward_chosen"],
        "eval_reward_rejected": after["reward_rejected"],
        "eval_pairs": after["pairs"],
        "eval_ties": after["ties"],
        "train_pairs": train_counts["kept"],
        "train_pairs_truncated": train_counts["truncated"],
        "train_pairs_dropped": train_counts["dropped"],
        "eval_pairs_truncated": eval_counts["truncated"],
        "eval_pairs_dropped": eval_counts["dropped"],
        "label_smoothing": label_smoothing,
        "steps": trainer.state.global_step,
    }
    return metrics


def _report(run, config, log_history, metrics, before, after, artifact, smoothing_note) -> None:
    plots = [
        plot_series(run.dir / "loss.png", "DPO loss", {"train loss": history_series(log_history, "loss")}),
        plot_series(
            run.dir / "reward_accuracy.png",
            "implicit-reward accuracy (train batches)",
            {"accuracy": history_series(log_history, "rewards/accuracies")},
        ),
        plot_series(
            run.dir / "rewards.png",
            "implicit rewards (train)",
            {
                "margin": history_series(log_history, "rewards/margins"),
                "chosen": history_series(log_history, "rewards/chosen"),
                "rejected": history_series(log_history, "rewards/rejected"),
            },
        ),
        plot_series(
            run.dir / "logps.png",
            "reply log-probs (train)",
            {
                "chosen": history_series(log_history, "logps/chosen"),
                "rejected": history_series(log_history, "logps/rejected"),
            },
        ),
        _histogram(run.dir / "eval_margins.png", "eval reward margins after training", after["margins"]),
    ]
    write_metrics(run, metrics)
    rows = [
        ("implicit-reward accuracy", "reward_accuracy"),
        ("reward margin (chosen - rejected)", "reward_margin"),
        ("log-prob of chosen", "logps_chosen"),
        ("log-prob of rejected", "logps_rejected"),
        ("policy prefers chosen (log-prob)", "logp_accuracy"),
        ("DPO loss", "loss"),
    ]
    table = ["| held-out metric | before | after |", "| --- | --- | --- |"]
    table += [f"| {label} | {before[key]:.4f} | {after[key]:.4f} |" for label, key in rows]
    setup = (
        f"Model `{config.model}`, data `{config.dataset}`, loss `{config.loss_type[0]}`, beta {config.beta}, "
        f"learning rate {config.learning_rate}, {metrics['steps']} steps. {smoothing_note}. "
        f"Train pairs: {metrics['train_pairs']} ({metrics['train_pairs_truncated']} prompts cut from the left, "
        f"{metrics['train_pairs_dropped']} dropped). Output `{artifact.ref}` in `{artifact.path}`."
    )
    held_out = (
        "\n".join(table) + f"\n\n{after['pairs']} held-out pairs ({after['ties']} ties, left out of accuracies). "
        "Before training the policy is the reference, so every implicit reward is 0 and the accuracy is chance "
        "(0.5: equal rewards count half)."
    )
    write_report(
        run, "DPO report", summary=metrics, sections=[("Setup", setup), ("Held-out pairs", held_out)], plots=plots
    )


def _histogram(path, title: str, values: list[float]):
    if not values:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.hist(values, bins=min(30, max(5, len(values) // 4)))
    axis.axvline(0, color="black", linewidth=1)
    axis.set_title(title)
    axis.set_xlabel("beta * (chosen log-ratio - rejected log-ratio)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def main(
    config_path: str | None,
    overrides: list[str],
    *,
    workspace: str | None = None,
    resume: str | bool | None = None,
):
    """`align dpo`: the recipe plus overrides, or on --resume the recipe the run started with."""
    registry = Registry(workspace)
    recipe, source, run_id = recipe_for(registry, "dpo", config_path, overrides, resume)
    config = build_config(DPOStageConfig, recipe, source=source)
    return run_dpo(config, registry, recipe=recipe, resume=run_id)
