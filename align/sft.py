"""SFT stage: specialise a model on a registry `sft` dataset with TRL's SFTTrainer.

    # LoRA (the default): a small adapter on a frozen base
    align sft --config recipes/sft/smollm2-135m-lora.yaml
    # full fine-tuning
    align sft --config recipes/sft/smollm2-135m-full.yaml
    # any config key can be overridden; --resume continues the last interrupted sft run
    align sft --config recipes/sft/smollm2-135m-lora.yaml --dataset seed-tasks@1 --max_steps 20
    align sft --config recipes/sft/smollm2-135m-lora.yaml --resume
    # several processes or GPUs, one run and one artifact (recipes/accelerate/, README "Scaling out")
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m align sft --config recipes/sft/smollm2-135m-lora.yaml

The loss is on assistant tokens only: each assistant turn becomes a conversational prompt/completion row
(the conversation before it is the prompt), which TRL trains on the completion alone, under the model's own
chat template. Eval loss and perplexity are measured before and after training on a split from the registry.
The output is registered as `adapter:NAME@V` (or `model:NAME@V` for full fine-tuning) with lineage to the
dataset, the base model and the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trl import SFTConfig, SFTTrainer

from align.config import AdapterFields, StageFields, peft_config_for, quantization_config_for
from align.distributed import broadcast_from_main, evaluate_before_training, is_main_process, wait_for_everyone
from align.errors import AlignError
from align.models import load_model, resolve_model
from align.registry import Registry
from align.reports import plot_history, write_metrics, write_report
from align.runs import failures_recorded, last_checkpoint, live_metrics_callback, open_stage_run, run_recipe, stage_data


@dataclass
class SFTStageConfig(StageFields, AdapterFields, SFTConfig):
    output_name: str | None = field(default="sft", metadata={"help": "artifact name: adapter:NAME"})
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard, none, ..."})

    def __post_init__(self):
        self.check_stage_fields()
        self.check_adapter_fields()
        super().__post_init__()


def to_prompt_completion(rows: list[dict]) -> list[dict]:
    """One row per assistant turn: the conversation before it is the prompt, the turn is the completion."""
    out = []
    for row in rows:
        messages = row["messages"]
        for index, message in enumerate(messages):
            if message["role"] == "assistant" and index > 0:
                out.append({"prompt": messages[:index], "completion": [message]})
    return out


def run_sft(
    config: SFTStageConfig, registry: Registry, *, recipe: dict | None = None, resume: str | None = None, callbacks=()
):
    """Train, evaluate, save and register. Returns the registered artifact. `resume` is the ID of a run to
    continue from its last checkpoint."""
    import datasets

    # Everything that can be wrong with the inputs fails here, before anything is registered or loaded.
    data = stage_data(registry, config, kind="sft")
    resolve_model(config.model, registry)  # a reference that does not resolve fails now
    if config.model.startswith(("adapter:", "rm:")):
        raise AlignError(f"SFT starts from a base model, not {config.model}: name its base instead")

    train_version, eval_version = data.split(registry)
    inputs = [data.dataset.ref, train_version.ref, eval_version.ref, config.model]
    run = open_stage_run(registry, "sft", config, inputs=inputs, recipe=recipe, resume=resume)
    print(f"run {run.id}: SFT of {config.model} on {train_version.ref} (eval on {eval_version.ref})")
    with failures_recorded(registry, run):
        train_rows = to_prompt_completion(registry.rows(train_version))
        eval_rows = to_prompt_completion(registry.rows(eval_version))
        model, tokenizer = load_model(
            config.model, registry, dtype=config.torch_dtype, quantization_config=quantization_config_for(config)
        )
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=datasets.Dataset.from_list(train_rows),
            eval_dataset=datasets.Dataset.from_list(eval_rows),
            processing_class=tokenizer,
            peft_config=peft_config_for(config),
            callbacks=[live_metrics_callback(run), *callbacks],
        )
        before = evaluate_before_training(trainer, metric_key_prefix="before")
        trainer.train(resume_from_checkpoint=last_checkpoint(run.dir / "checkpoints") if resume else None)
        after = trainer.evaluate()

        kind = "model" if config.peft == "none" else "adapter"
        output_dir = run.dir / kind
        trainer.save_model(str(output_dir))  # every process takes part (FSDP and ZeRO-3 gather the weights)
        # Under a launcher: a process that failed stops the main one here, before anything is registered; then
        # only the main process writes, and the others wait for the artifact it registers.
        wait_for_everyone()
        if not is_main_process():
            return broadcast_from_main(None)
        tokenizer.save_pretrained(str(output_dir))
        metrics = {
            "eval_loss_before": before["before_loss"],
            "eval_perplexity_before": _perplexity(before["before_loss"]),
            "eval_loss": after["eval_loss"],
            "eval_perplexity": _perplexity(after["eval_loss"]),
            "train_rows": len(train_rows),
            "eval_rows": len(eval_rows),
            "steps": trainer.state.global_step,
        }
        artifact = registry.register_artifact(
            kind,
            config.output_name,
            output_dir,
            base_model=config.model,
            run=run,
            parents=[(train_version, "train"), (eval_version, "eval")],
            meta={"peft": config.peft, "metrics": metrics},
        )
        _report(run, config, trainer.state.log_history, metrics, artifact)
        registry.finish_run(run, metrics=metrics, outputs=[artifact.ref])
        print(
            f"registered {artifact.ref}: eval loss {metrics['eval_loss_before']:.3f} -> {metrics['eval_loss']:.3f} "
            f"(perplexity {metrics['eval_perplexity']:.2f}); report {run.dir / 'report.md'}"
        )
        return broadcast_from_main(artifact)


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


def _report(run, config, log_history, metrics, artifact) -> None:
    plots = plot_history(
        run.dir,
        log_history,
        {
            "loss": ("SFT loss", {"train loss": "loss", "eval loss": "eval_loss"}),
            "learning_rate": ("learning rate", {"learning rate": "learning_rate"}),
        },
    )
    write_metrics(run, metrics)
    setup = (
        f"Model `{config.model}`, data `{config.dataset}`, PEFT `{config.peft}`, learning rate "
        f"{config.learning_rate}, {metrics['steps']} steps. Output `{artifact.ref}` in `{artifact.path}`."
    )
    write_report(run, "SFT report", summary=metrics, sections=[("Setup", setup)], plots=plots)


def main(
    config_path: str | None, overrides: list[str], *, workspace: str | None = None, resume: str | bool | None = None
):
    """`align sft`: the recipe plus overrides, or on --resume the recipe the run started with."""
    return run_recipe("sft", SFTStageConfig, run_sft, config_path, overrides, workspace=workspace, resume=resume)
