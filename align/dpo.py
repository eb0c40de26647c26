"""DPO stage: align a policy on a registry `preference` dataset with TRL's DPOTrainer.

    # LoRA from the SFT adapter (the default): the SFT adapter is the frozen reference
    align dpo --config recipes/dpo/smollm2-135m-lora.yaml
    # any config key can be overridden; --resume continues the last interrupted dpo run
    align dpo --config recipes/dpo/smollm2-135m-lora.yaml --model adapter:sft@2 --dataset hh-harmless-train \
        --eval_dataset hh-harmless-test --loss_type robust --label_smoothing auto --max_steps 50
    align dpo --config recipes/dpo/smollm2-135m-lora.yaml --resume
    # several processes or GPUs, one run and one artifact (recipes/accelerate/, README "Scaling out")
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m align dpo --config recipes/dpo/smollm2-135m-lora.yaml
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

from dataclasses import dataclass, field

import torch
from trl import DPOConfig

from align.config import AdapterFields, StageFields, peft_config_for, quantization_config_for
from align.distributed import broadcast_from_main, gathered_state_dict, is_main_process, wait_for_everyone
from align.dpo_trainer import (
    LOSS_TYPES,
    PairCollator,
    PairDPOTrainer,
    add_pair_scoring,
    cpu_threads,
    evaluate_pairs,
    freeze_reference,
    smoothing_from_agreement,
    tokenize_pairs,
)
from align.errors import AlignError
from align.models import load_model, resolve_model
from align.registry import Registry
from align.reports import before_after_table, plot_histogram, plot_history, write_metrics, write_report
from align.runs import failures_recorded, last_checkpoint, live_metrics_callback, open_stage_run, run_recipe, stage_data
from align.stats import against_chance


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


# The stage.


def run_dpo(
    config: DPOStageConfig, registry: Registry, *, recipe: dict | None = None, resume: str | None = None, callbacks=()
):
    """Train, evaluate before and after on the held-out pairs, save and register. Returns the registered adapter
    artifact. `resume` is the ID of a run to continue from its last checkpoint."""
    import datasets

    # Everything that can be wrong with the inputs fails here, before anything is registered or loaded.
    data = stage_data(registry, config, kind="preference")
    resolved = resolve_model(config.model, registry)  # a reference that does not resolve fails now
    start = None
    if config.model.startswith("rm:"):
        raise AlignError(f"DPO starts from an SFT adapter or a base model, not the reward model {config.model}")
    if resolved.adapter_path is not None:
        start = registry.resolve_artifact(config.model)
        _check_lora_adapter(resolved.adapter_path, config.model)
    base_model = start.base_model if start else config.model

    train_version, eval_version = data.split(registry)
    label_smoothing, smoothing_note = resolve_label_smoothing(config, registry, train_version)
    inputs = [data.dataset.ref, train_version.ref, eval_version.ref, start.ref if start else config.model]
    run = open_stage_run(registry, "dpo", config, inputs=inputs, recipe=recipe, resume=resume)
    config.label_smoothing = label_smoothing
    print(
        f"run {run.id}: DPO ({config.loss_type[0]}) of {config.model} on {train_version.ref} "
        f"(eval on {eval_version.ref})"
    )
    print(smoothing_note)
    threads = cpu_threads(config.torch_threads)
    if threads:
        print(f"torch threads: {threads} (torch_threads {config.torch_threads})")
        torch.set_num_threads(threads)
    with failures_recorded(registry, run):
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
        eval_examples, eval_counts = tokenize_pairs(  # every held-out pair is measured: long replies are cut
            eval_rows,
            tokenizer,
            max_length=config.max_length,
            min_prompt_length=config.min_prompt_length,
            overflow="cut",
        )
        print(
            f"train: {train_counts['kept']} of {train_counts['rows']} pairs; {train_counts['truncated']} prompts cut "
            f"from the left, {train_counts['dropped']} pairs dropped (a reply longer than max_length - "
            f"min_prompt_length)\neval: all {eval_counts['rows']} pairs; {eval_counts['truncated']} prompts cut from "
            f"the left, {eval_counts['replies_cut']} with the replies cut to max_length - min_prompt_length"
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

        # Under a launcher: a process that failed stops the main one here, before anything is registered; then
        # only the main process writes, and the others wait for the artifact it registers.
        weights = gathered_state_dict(trainer)
        wait_for_everyone()
        if not is_main_process():
            return broadcast_from_main(None)
        output_dir = run.dir / "adapter"
        trainer.model.save_pretrained(str(output_dir), selected_adapters=["default"], state_dict=weights)
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
            f"held-out implicit-reward accuracy on {eval_version.ref}: before "
            f"{metrics['eval_reward_accuracy_before']:.3f} (the policy is the reference: chance), after "
            f"{against_chance(metrics['eval_reward_accuracy'], after['pairs'] - after['ties'])} "
            f"(mean margin {metrics['eval_reward_margin']:+.4f})"
        )
        print(f"registered {artifact.ref}; report {run.dir / 'report.md'}")
        return broadcast_from_main(artifact)


def _check_lora_adapter(path, ref: str) -> None:
    import json

    peft_type = json.loads((path / "adapter_config.json").read_text()).get("peft_type")
    if peft_type != "LORA":
        raise AlignError(f"{ref} is a {peft_type} adapter; DPO continues LoRA adapters only")


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
        "eval_pairs_replies_cut": eval_counts["replies_cut"],
        "label_smoothing": label_smoothing,
        "steps": trainer.state.global_step,
    }
    return metrics


def _report(run, config, log_history, metrics, before, after, artifact, smoothing_note) -> None:
    trained = {
        "loss": ("DPO loss", {"train loss": "loss"}),
        "reward_accuracy": ("implicit-reward accuracy (train batches)", {"accuracy": "rewards/accuracies"}),
        "rewards": (
            "implicit rewards (train)",
            {"margin": "rewards/margins", "chosen": "rewards/chosen", "rejected": "rewards/rejected"},
        ),
        "logps": ("reply log-probs (train)", {"chosen": "logps/chosen", "rejected": "logps/rejected"}),
    }
    plots = [
        *plot_history(run.dir, log_history, trained),
        plot_histogram(
            run.dir / "eval_margins.png",
            "eval reward margins after training",
            after["margins"],
            xlabel="beta * (chosen log-ratio - rejected log-ratio)",
        ),
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
    setup = (
        f"Model `{config.model}`, data `{config.dataset}`, loss `{config.loss_type[0]}`, beta {config.beta}, "
        f"learning rate {config.learning_rate}, {metrics['steps']} steps. {smoothing_note}. "
        f"Train pairs: {metrics['train_pairs']} ({metrics['train_pairs_truncated']} prompts cut from the left, "
        f"{metrics['train_pairs_dropped']} dropped). Output `{artifact.ref}` in `{artifact.path}`."
    )
    held_out = (
        before_after_table(rows, before, after)
        + f"\n\n{after['pairs']} held-out pairs ({after['ties']} ties, left out of accuracies). "
        "Before training the policy is the reference, so every implicit reward is 0 and the accuracy is chance "
        "(0.5: equal rewards count half)."
    )
    write_report(
        run, "DPO report", summary=metrics, sections=[("Setup", setup), ("Held-out pairs", held_out)], plots=plots
    )


def main(
    config_path: str | None, overrides: list[str], *, workspace: str | None = None, resume: str | bool | None = None
):
    """`align dpo`: the recipe plus overrides, or on --resume the recipe the run started with."""
    return run_recipe("dpo", DPOStageConfig, run_dpo, config_path, overrides, workspace=workspace, resume=resume)
