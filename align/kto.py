"""KTO stage: align a policy on a registry `feedback` dataset (single replies labelled desirable or undesirable) with
TRL's KTOTrainer.

    # LoRA from the SFT adapter (the default): the SFT adapter is the frozen reference
    align kto --config recipes/kto/smollm2-135m-lora.yaml
    # feedback from the labeling app: thumbs and both-bad votes (and pairwise votes, when asked)
    align label --candidates seed-candidates --mode thumbs
    align data from-labels seed-candidates --name seed-feedback --kind feedback --include-pairwise
    align kto --config recipes/kto/smollm2-135m-lora.yaml --dataset seed-feedback --max_steps 20
    # any config key can be overridden; --resume continues the last interrupted kto run
    align kto --config recipes/kto/smollm2-135m-lora.yaml --resume

One base model sits in memory, as in DPO. Starting from `adapter:NAME`, it carries two LoRA adapters: the
trainable policy ("default", initialised from the SFT weights) and the frozen reference ("ref", TRL's copy of the
SFT weights). Starting from a base model, the reference is that base with the adapter switched off.

KTO needs no pairs: each row is one reply with a label, and the loss pushes the implicit reward (beta times the
policy's log-ratio to the reference) of desirable replies above, and of undesirable ones below, an estimate of the
policy's KL divergence from the reference. `desirable_weight` / `undesirable_weight` even out unequal counts (the
KTO paper keeps weight x count within 1 to 4/3 of each other). KL is estimated within each batch from mismatched
prompt/reply pairs, so batches hold at least two rows and are read in order (train_sampling_strategy sequential):
the train rows are shuffled once, with the seed, before training. Held-out metrics (align/kto_metrics.py:
implicit-reward accuracy and margin, per-token log-probs of desirable and undesirable replies) run before and after
training and land in the run report with plots. The output is `adapter:NAME@V` with lineage to the starting
adapter, the feedback versions and the run.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

from trl import KTOConfig, KTOTrainer

from align.config import AdapterFields, StageFields, peft_config_for, quantization_config_for
from align.distributed import broadcast_from_main, gathered_state_dict, is_main_process, wait_for_everyone
from align.dpo_trainer import freeze_reference
from align.errors import AlignError
from align.kto_metrics import feedback_logps, feedback_metrics
from align.models import load_model, resolve_model
from align.registry import Registry
from align.reports import before_after_table, plot_histogram, plot_history, write_metrics, write_report
from align.runs import failures_recorded, last_checkpoint, live_metrics_callback, open_stage_run, run_recipe, stage_data

LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOStageConfig(StageFields, AdapterFields, KTOConfig):
    model: str = field(default="adapter:sft", metadata={"help": "adapter:NAME[@V] (the SFT adapter) or a base model"})
    output_name: str | None = field(default="kto", metadata={"help": "artifact name: adapter:NAME"})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard, none, ..."})
    eval_limit: int | None = field(default=None, metadata={"help": "evaluate on the first N rows of the eval split"})

    def __post_init__(self):
        self.check_stage_fields()
        self.check_adapter_fields()
        check_kto_fields(self)
        super().__post_init__()


def check_kto_fields(config: KTOStageConfig) -> None:
    """What KTO with a LoRA reference supports, checked at parse time rather than when the trainer is built."""
    if config.loss_type not in LOSS_TYPES:
        raise ValueError(f"config key 'loss_type' must be one of {', '.join(LOSS_TYPES)} (got {config.loss_type!r})")
    if config.peft != "lora":
        raise ValueError(
            f"config key 'peft': KTO trains a LoRA adapter, so the frozen start is the reference without a second "
            f"model copy (got {config.peft!r})"
        )
    if config.beta <= 0:
        raise ValueError(f"config key 'beta' must be above 0 (got {config.beta!r})")
    for key in ("desirable_weight", "undesirable_weight"):
        if getattr(config, key) <= 0:
            raise ValueError(f"config key '{key}' must be above 0 (got {getattr(config, key)!r})")
    if config.loss_type == "kto":
        if config.per_device_train_batch_size < 2:
            raise ValueError(
                "config key 'per_device_train_batch_size' must be at least 2 for loss_type kto: the KL term is "
                f"estimated from the other rows of each batch (got {config.per_device_train_batch_size!r})"
            )
        if config.train_sampling_strategy != "sequential":
            raise ValueError(
                "config key 'train_sampling_strategy' must be sequential for loss_type kto: the KL term pairs each "
                f"row with its neighbour in a fixed-order batch (got {config.train_sampling_strategy!r})"
            )
    if config.sync_ref_model:
        raise ValueError("config key 'sync_ref_model' is not supported: the reference is a frozen LoRA adapter")
    if config.eval_limit is not None and config.eval_limit < 1:
        raise ValueError(f"config key 'eval_limit' must be at least 1 (got {config.eval_limit!r})")


# The stage.


def run_kto(
    config: KTOStageConfig, registry: Registry, *, recipe: dict | None = None, resume: str | None = None, callbacks=()
):
    """Train, evaluate before and after on the held-out feedback, save and register. Returns the registered adapter
    artifact. `resume` is the ID of a run to continue from its last checkpoint."""
    import datasets

    # Everything that can be wrong with the inputs fails here, before anything is registered or loaded.
    data = stage_data(registry, config, kind="feedback")
    resolved = resolve_model(config.model, registry)  # a reference that does not resolve fails now
    start = None
    if config.model.startswith("rm:"):
        raise AlignError(f"KTO starts from an SFT adapter or a base model, not the reward model {config.model}")
    if resolved.adapter_path is not None:
        start = registry.resolve_artifact(config.model)
        peft_type = json.loads((resolved.adapter_path / "adapter_config.json").read_text()).get("peft_type")
        if peft_type != "LORA":
            raise AlignError(f"{config.model} is a {peft_type} adapter; KTO continues LoRA adapters only")
    base_model = start.base_model if start else config.model

    train_version, eval_version = data.split(registry)
    train_rows = registry.rows(train_version)
    random.Random(config.seed).shuffle(train_rows)  # read in order (see the docstring): mix the labels once
    eval_rows = registry.rows(eval_version)[: config.eval_limit]
    counts = {"train": _label_counts(train_rows), "eval": _label_counts(eval_rows)}
    for split, (desirable, undesirable) in counts.items():
        if not desirable or not undesirable:
            raise AlignError(
                f"the {split} rows hold {desirable} desirable and {undesirable} undesirable replies: KTO needs both"
            )
    inputs = [data.dataset.ref, train_version.ref, eval_version.ref, start.ref if start else config.model]
    run = open_stage_run(registry, "kto", config, inputs=inputs, recipe=recipe, resume=resume)
    print(
        f"run {run.id}: KTO ({config.loss_type}) of {config.model} on {train_version.ref} (eval on {eval_version.ref})"
    )
    with failures_recorded(registry, run):
        model, tokenizer = load_model(
            config.model,
            registry,
            dtype=config.torch_dtype,
            trainable_adapter=True,
            quantization_config=quantization_config_for(config),
        )
        if not getattr(tokenizer, "chat_template", None):
            raise AlignError(f"{config.model}'s tokenizer has no chat template, which conversational rows need")
        trainer = KTOTrainer(
            model=model,
            args=config,
            train_dataset=datasets.Dataset.from_list(train_rows),
            eval_dataset=datasets.Dataset.from_list(eval_rows),
            processing_class=tokenizer,
            peft_config=None if start else peft_config_for(config),
            callbacks=[live_metrics_callback(run), *callbacks],
        )
        freeze_reference(trainer.model)
        before = feedback_metrics(feedback_logps(trainer), config.beta)
        trainer.train(resume_from_checkpoint=last_checkpoint(run.dir / "checkpoints") if resume else None)
        after = feedback_metrics(feedback_logps(trainer), config.beta)

        # Under a launcher: a process that failed stops the main one here, before anything is registered; then
        # only the main process writes, and the others wait for the artifact it registers.
        weights = gathered_state_dict(trainer)
        wait_for_everyone()
        if not is_main_process():
            return broadcast_from_main(None)
        output_dir = run.dir / "adapter"
        trainer.model.save_pretrained(str(output_dir), selected_adapters=["default"], state_dict=weights)
        tokenizer.save_pretrained(str(output_dir))
        metrics = _metrics(before, after, counts, len(trainer.train_dataset), trainer)
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
                "stage": "kto",
                "loss_type": config.loss_type,
                "beta": config.beta,
                "reference": start.ref if start else base_model,
                "metrics": metrics,
            },
        )
        _report(run, config, trainer.state.log_history, metrics, before, after, artifact)
        registry.finish_run(run, metrics=metrics, outputs=[artifact.ref])
        print(
            f"held-out feedback on {eval_version.ref} ({after['rows']} replies): implicit-reward accuracy "
            f"{before['reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}, margin "
            f"{before['reward_margin']:+.4f} -> {after['reward_margin']:+.4f}; per-token log-prob margin "
            f"(desirable - undesirable) {before['logp_margin']:+.4f} -> {after['logp_margin']:+.4f}"
        )
        print(f"registered {artifact.ref}; report {run.dir / 'report.md'}")
        return broadcast_from_main(artifact)


def _label_counts(rows: list[dict]) -> tuple[int, int]:
    desirable = sum(row["label"] for row in rows)
    return desirable, len(rows) - desirable


def _metrics(before, after, counts, train_kept, trainer) -> dict:
    metrics = {}
    keys = ("reward_accuracy", "reward_margin", "reward_desirable", "reward_undesirable", "logp_margin")
    keys += ("logp_per_token_desirable", "logp_per_token_undesirable")
    for key in keys:
        metrics[f"eval_{key}_before"] = before[key]
        metrics[f"eval_{key}"] = after[key]
    train_desirable, train_undesirable = counts["train"]
    return metrics | {
        "eval_rows": after["rows"],
        "eval_desirable": after["desirable"],
        "eval_undesirable": after["undesirable"],
        "train_rows": train_desirable + train_undesirable,
        "train_desirable": train_desirable,
        "train_undesirable": train_undesirable,
        "train_rows_dropped": train_desirable + train_undesirable - train_kept,  # the prompt alone fills max_length
        "steps": trainer.state.global_step,
    }


def _report(run, config, log_history, metrics, before, after, artifact) -> None:
    trained = {
        "loss": ("KTO loss", {"train loss": "loss"}),
        "rewards": (
            "implicit rewards (train)",
            {"margin": "rewards/margins", "desirable": "rewards/chosen", "undesirable": "rewards/rejected"},
        ),
        "kl": ("KL estimate (train)", {"KL": "kl"}),
        "logps": ("reply log-probs (train)", {"desirable": "logps/chosen", "undesirable": "logps/rejected"}),
    }
    plots = [
        *plot_history(run.dir, log_history, trained),
        plot_histogram(
            run.dir / "eval_rewards_desirable.png",
            "eval implicit rewards of desirable replies after training",
            after["rewards_desirable"],
            xlabel="beta * (policy - reference log-prob)",
        ),
        plot_histogram(
            run.dir / "eval_rewards_undesirable.png",
            "eval implicit rewards of undesirable replies after training",
            after["rewards_undesirable"],
            xlabel="beta * (policy - reference log-prob)",
        ),
    ]
    write_metrics(run, metrics)
    rows = [
        ("implicit-reward accuracy (sign matches the label)", "reward_accuracy"),
        ("reward margin (desirable - undesirable)", "reward_margin"),
        ("mean reward of desirable replies", "reward_desirable"),
        ("mean reward of undesirable replies", "reward_undesirable"),
        ("per-token log-prob of desirable replies", "logp_per_token_desirable"),
        ("per-token log-prob of undesirable replies", "logp_per_token_undesirable"),
        ("log-prob margin (desirable - undesirable)", "logp_margin"),
    ]
    setup = (
        f"Model `{config.model}`, data `{config.dataset}`, loss `{config.loss_type}`, beta {config.beta}, desirable "
        f"weight {config.desirable_weight}, undesirable weight {config.undesirable_weight}, learning rate "
        f"{config.learning_rate}, {metrics['steps']} steps. Train rows: {metrics['train_desirable']} desirable, "
        f"{metrics['train_undesirable']} undesirable ({metrics['train_rows_dropped']} dropped: the prompt alone "
        f"fills max_length). Output `{artifact.ref}` in `{artifact.path}`."
    )
    held_out = (
        before_after_table(rows, before, after)
        + f"\n\n{after['rows']} held-out replies ({after['desirable']} desirable, "
        f"{after['undesirable']} undesirable). Before training the policy is the reference, so every implicit "
        "reward is 0 and the accuracy is 0.5 (a reward of 0 counts half)."
    )
    write_report(
        run, "KTO report", summary=metrics, sections=[("Setup", setup), ("Held-out feedback", held_out)], plots=plots
    )


def main(
    config_path: str | None, overrides: list[str], *, workspace: str | None = None, resume: str | bool | None = None
):
    """`align kto`: the recipe plus overrides, or on --resume the recipe the run started with."""
    return run_recipe("kto", KTOStageConfig, run_kto, config_path, overrides, workspace=workspace, resume=resume)
