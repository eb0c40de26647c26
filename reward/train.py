"""Reward-model stage: train a scorer on a registry `preference` dataset with TRL's RewardTrainer and LoRA.

    # LoRA on the embedded SmolLM2 (the default recipe)
    align rm --config recipes/rm/smollm2-135m-lora.yaml
    # any config key can be overridden; --resume continues the last interrupted rm run
    align rm --config recipes/rm/smollm2-135m-lora.yaml --dataset hh-harmless-train --max_steps 30
    align rm --config recipes/rm/smollm2-135m-lora.yaml --resume
    # one head per rubric attribute beside the preference head (rows with rubric `scores`, reward/objectives.py)
    align rm --config recipes/rm/smollm2-135m-lora.yaml --dataset seed-prefs --objectives helpfulness,harmlessness
    # several processes or GPUs, one run and one artifact (recipes/accelerate/, README "Scaling out")
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m align rm --config recipes/rm/smollm2-135m-lora.yaml
    # then: the same metrics on any preference version, and scores for any rows
    align rm eval --rm rm:rm --data hh-harmless-test
    align rm score --rm rm:rm --data seed-candidates --name seed-candidates-rm

The model is the base with a one-output score head (AutoModelForSequenceClassification); LoRA trains the base,
and the head is saved with the adapter (PEFT modules_to_save), so the registered artifact reloads to identical
scores. Pairs are tokenized here, not by TRL: a pair longer than `max_length` keeps its replies and loses the
oldest part of its prompt (align/truncation.py) where TRL would drop it; a pair whose reply alone is too long is
dropped and counted. The loss is Bradley-Terry with the labels' margins and weights when present, and a
tie-aware term for ties (reward/loss.py). After training the model is evaluated on a held-out split: pairwise
accuracy, mean margin, calibration (ECE and a reliability diagram) and length bias, all in the run's report.
The output is registered as `rm:NAME@V` with lineage to the data, the base model and the run.

With `objectives`, the score head has one more output per attribute, each trained by regression on the rows'
rubric scores (reward/objectives.py says how and why), and the report has every head's accuracy on each kind of
label; the artifact's meta names the heads, so every scorer loads them.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

from transformers import set_seed
from trl import RewardConfig

from align.config import AdapterFields, StageFields, peft_config_for
from align.distributed import broadcast_from_main, is_main_process, wait_for_everyone
from align.errors import AlignError
from align.models import resolve_model
from align.registry import Registry
from align.registry.schemas import read_scores
from align.reports import plot_history, write_metrics, write_report
from align.runs import failures_recorded, last_checkpoint, live_metrics_callback, open_stage_run, run_recipe, stage_data
from align.stats import against_chance
from align.truncation import encode_rows
from reward.features import POOLINGS, frozen_states, keep_layers, top_layers_only
from reward.metrics import headline, heads_markdown, markdown, plot_length_bias, plot_reliability
from reward.model import DEFAULT_MAX_LENGTH, RewardModel, load_saved_scorer, load_scorer
from reward.objectives import check_objectives
from reward.trainer import (
    CachedStateCollator,
    PairCollator,
    PreferenceRewardTrainer,
    layer_linear_names,
    top_layers,
    training_examples,
)

TIE_MODES = ("together", "drop")
RM_PEFT = ("lora", "ia3")


@dataclass
class RewardStageConfig(StageFields, AdapterFields, RewardConfig):
    output_name: str | None = field(default="rm", metadata={"help": "artifact name: rm:NAME"})
    max_length: int | None = field(
        default=DEFAULT_MAX_LENGTH,
        metadata={"help": "tokens per prompt + reply; longer pairs lose the oldest prompt tokens, not the pair"},
    )
    eval_max_length: int | None = field(
        default=None, metadata={"help": "max_length for the held-out evaluation (default: max_length)"}
    )
    ties: str = field(
        default="together", metadata={"help": "together: the tie-aware loss pulls tied scores together | drop"}
    )
    use_margins: bool = field(default=True, metadata={"help": "use the rows' `margin` labels when present"})
    use_weights: bool = field(default=True, metadata={"help": "use the rows' `weight` labels when present"})
    lora_top_layers: int | None = field(
        default=None,
        metadata={"help": "LoRA on the top N transformer layers only: backward stops below them; null = all"},
    )
    num_layers: int | None = field(
        default=None,
        metadata={
            "help": "keep the base's bottom N transformer layers (then its final norm): the head reads layer N's "
            "states, which a middle layer may separate better than the last; null = all"
        },
    )
    pooling: str = field(
        default="last",
        metadata={
            "help": "what the head reads: last (the last token, as transformers does) | reply_mean (the mean "
            "of the reply's tokens)"
        },
    )
    cache_frozen_layers: bool = field(
        default=False,
        metadata={
            "help": "with lora_top_layers: run the frozen layers below once per pair and train the top layers on "
            "their cached states (same result, each epoch costs only the top layers; memory: pairs x 2 x tokens x "
            "hidden x 4 bytes)"
        },
    )
    objectives: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "rubric attributes, each with a head of its own beside the preference head (a list, or "
            "helpfulness,harmlessness on the command line): trained on the rows' rubric `scores`; null = none"
        },
    )
    report_to: None | str | list[str] = field(default="tensorboard", metadata={"help": "tensorboard, none, ..."})

    def __post_init__(self):
        self.check_stage_fields()
        self.objectives = check_objectives(self.objectives)
        self.check_adapter_fields()
        if self.peft not in RM_PEFT:
            raise ValueError(
                f"config key 'peft' must be {' or '.join(RM_PEFT)} for a reward model (got {self.peft!r}): "
                "an rm: artifact is an adapter with its score head"
            )
        if self.load_in_4bit:
            raise ValueError("config key 'load_in_4bit' is not supported for reward models yet")
        if self.ties not in TIE_MODES:
            raise ValueError(f"config key 'ties' must be one of {', '.join(TIE_MODES)} (got {self.ties!r})")
        if self.pooling not in POOLINGS:
            raise ValueError(f"config key 'pooling' must be one of {', '.join(POOLINGS)} (got {self.pooling!r})")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"config key 'num_layers' must be at least 1 (got {self.num_layers!r})")
        if self.num_layers and self.lora_top_layers and self.lora_top_layers > self.num_layers:
            raise ValueError(
                f"config key 'lora_top_layers' ({self.lora_top_layers}) must not exceed num_layers ({self.num_layers})"
            )
        if self.lora_top_layers is not None and self.lora_top_layers < 1:
            raise ValueError(f"config key 'lora_top_layers' must be at least 1 (got {self.lora_top_layers!r})")
        for key in ("max_length", "eval_max_length"):
            value = getattr(self, key)
            if (value is not None and value < 16) or (key == "max_length" and value is None):
                raise ValueError(f"config key '{key}' must be a token count of at least 16 (got {value!r})")
        if self.cache_frozen_layers and not self.lora_top_layers:
            raise ValueError("config key 'cache_frozen_layers' needs lora_top_layers: the layers below them are cached")
        if self.cache_frozen_layers and self.peft != "lora":
            raise ValueError(f"config key 'cache_frozen_layers' needs peft: lora (got {self.peft!r})")
        super().__post_init__()


def run_rm(
    config: RewardStageConfig,
    registry: Registry,
    *,
    recipe: dict | None = None,
    resume: str | None = None,
    callbacks=(),
):
    """Train, evaluate on the held-out pairs, save and register. Returns the registered rm: artifact. `resume` is
    the ID of a run to continue from its last checkpoint."""
    import datasets

    # Everything that can be wrong with the inputs fails here, before anything is registered or loaded.
    data = stage_data(registry, config, kind="preference")
    if config.model.startswith(("adapter:", "rm:")):
        raise AlignError(f"reward training starts from a base model, not {config.model}: name its base instead")
    resolve_model(config.model, registry)  # a reference that does not resolve fails now

    train_version, eval_version = data.split(registry)
    train_rows = registry.rows(train_version)
    check_scores(train_rows, config.objectives, train_version.ref)
    inputs = [data.dataset.ref, train_version.ref, eval_version.ref, config.model]
    run = open_stage_run(registry, "rm", config, inputs=inputs, recipe=recipe, resume=resume)
    print(f"run {run.id}: reward model on {config.model} from {train_version.ref} (eval on {eval_version.ref})")
    with failures_recorded(registry, run):
        model, tokenizer, _ = load_scorer(
            config.model, registry, seed=config.seed, dtype=config.torch_dtype, objectives=config.objectives
        )
        if config.num_layers:
            keep_layers(model, config.num_layers)
        encoded, train_stats = encode_rows(tokenizer, train_rows, config.max_length, progress=True)
        examples, ties_dropped = training_examples(
            train_rows,
            encoded,
            use_margins=config.use_margins,
            use_weights=config.use_weights,
            ties=config.ties,
            objectives=config.objectives,
        )
        if not examples:
            raise AlignError(f"no pair of {train_version.ref} fits max_length {config.max_length}: raise it")
        print(
            f"train: {train_stats.describe()}" + (f"; {ties_dropped} ties dropped (ties: drop)" if ties_dropped else "")
        )

        peft_config = peft_config_for(config, "SEQ_CLS")
        peft_config.modules_to_save = ["score"]  # the head is trained and saved with the adapter
        if config.lora_top_layers:
            # PEFT filters layers only for a list of module names, so 'all-linear' is spelled out first.
            peft_config.target_modules = layer_linear_names(model, config.lora_target_modules)
            peft_config.layers_to_transform = top_layers(model, config.lora_top_layers)
            peft_config.layers_pattern = "layers"
        eval_examples = None
        if config.eval_strategy != "no":  # validation during training (what `align sweep` prunes on)
            eval_rows = registry.rows(eval_version)
            eval_encoded, _ = encode_rows(tokenizer, eval_rows, config.max_length, overflow="cut")
            eval_examples, _ = training_examples(
                eval_rows, eval_encoded, use_margins=False, use_weights=False, ties="drop", objectives=config.objectives
            )
        reply_starts = config.pooling == "reply_mean"
        collator = PairCollator(pad_token_id=tokenizer.pad_token_id, reply_starts=reply_starts)
        layers = nullcontext()
        set_seed(config.seed)  # LoRA's initial weights: the same whether PEFT is applied here or by TRL
        if config.cache_frozen_layers:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
            peft_config = None  # applied already: the frozen layers run before the trainer exists
            cut = model.config.num_hidden_layers - config.lora_top_layers
            cached = examples + (eval_examples or [])
            collator = CachedStateCollator(cache_states(model, cached, cut, tokenizer, config), reply_starts)
            for index, example in enumerate(cached):
                example["index"] = index
            layers = top_layers_only(model, cut)
        trainer = PreferenceRewardTrainer(
            model=model,
            args=config,
            data_collator=collator,
            train_dataset=datasets.Dataset.from_list(examples),
            eval_dataset=datasets.Dataset.from_list(eval_examples) if eval_examples else None,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[live_metrics_callback(run), *callbacks],
        )
        if len(trainer.train_dataset) != len(examples):  # TRL filters by max_length: ours all fit already
            raise AlignError(f"TRL dropped {len(examples) - len(trainer.train_dataset)} pairs that should fit (a bug)")
        with layers:
            trainer.train(resume_from_checkpoint=last_checkpoint(run.dir / "checkpoints") if resume else None)

        output_dir = run.dir / "rm"
        trainer.save_model(str(output_dir))  # every process takes part (FSDP and ZeRO-3 gather the weights)
        # Under a launcher: a process that failed stops the main one here, before anything is registered; then
        # only the main process evaluates and writes, and the others wait for the artifact it registers.
        wait_for_everyone()
        if not is_main_process():
            return broadcast_from_main(None)
        tokenizer.save_pretrained(str(output_dir))

        eval_length = config.eval_max_length or config.max_length
        # Scored as `align rm eval` scores the registered artifact: reloaded from disk in the same precision and
        # batches, so the two report the same accuracy (the trainer's model runs under its autocast wrapper).
        saved, _ = load_saved_scorer(
            config.model,
            output_dir,
            registry,
            dtype=config.torch_dtype,
            num_layers=config.num_layers,
            objectives=config.objectives,
        )
        scorer = RewardModel(
            saved, tokenizer, max_length=eval_length, pooling=config.pooling, objectives=config.objectives
        )
        evaluation, _ = scorer.evaluate(registry.rows(eval_version), progress=True)
        metrics = {
            **{f"eval_{key}": value for key, value in headline(evaluation).items()},
            "train_pairs": len(examples),
            "train_truncated": train_stats.truncated,
            "train_dropped": train_stats.dropped,
            "train_ties_dropped": ties_dropped,
            "eval_truncated": evaluation["truncation"]["truncated"],
            "eval_replies_cut": evaluation["truncation"]["replies_cut"],
            "steps": trainer.state.global_step,
            "train_runtime_s": _train_runtime(trainer.state.log_history),
        }
        artifact = registry.register_artifact(
            "rm",
            config.output_name,
            output_dir,
            base_model=config.model,
            run=run,
            parents=[(train_version, "train"), (eval_version, "eval")],
            meta={
                "peft": config.peft,
                "max_length": eval_length,  # what scoring cuts pairs to (align rm eval / score, RewardModel.load)
                "train_max_length": config.max_length,
                "num_layers": config.num_layers,  # every scorer keeps these layers and pools this way
                "pooling": config.pooling,
                "objectives": config.objectives,  # the attribute heads, after the preference head
                "metrics": metrics,
                "truncation": train_stats.summary(),
            },
        )
        _report(run, config, trainer.state.log_history, metrics, evaluation, train_stats, artifact)
        registry.finish_run(run, metrics=metrics, outputs=[artifact.ref])
        print(
            f"registered {artifact.ref}: held-out accuracy "
            f"{against_chance(metrics['eval_accuracy'], metrics['eval_pairs'])}, "
            f"mean margin {metrics['eval_mean_margin']:.3f}, "
            f"ECE {metrics['eval_ece']:.3f}; report {run.dir / 'report.md'}"
        )
        for attribute in config.objectives:
            pairs = metrics[f"eval_pairs_{attribute}"]
            found = against_chance(metrics[f"eval_accuracy_{attribute}"], pairs) if pairs else "no held-out pairs"
            print(f"  {attribute} head on the pairs whose {attribute} scores differ: {found}")
        return broadcast_from_main(artifact)


def check_scores(rows: list[dict], objectives: list[str], ref: str) -> None:
    """Each objective has rubric scores in the training rows; else an AlignError naming the ones it has."""
    present = {attribute for row in rows for attribute in read_scores(row)}
    missing = [attribute for attribute in objectives if attribute not in present]
    if missing:
        has = f"its rows score {', '.join(sorted(present))}" if present else "its rows carry no rubric scores"
        raise AlignError(
            f"config key 'objectives': {', '.join(missing)} has no rubric score in {ref} ({has}); rubric scores come "
            "from `align label --rubric ...` votes, through `align data from-labels`"
        )


def cache_states(model, examples: list[dict], cut: int, tokenizer, config) -> list[tuple]:
    """(chosen, rejected) hidden states entering layer `cut`, per example: the frozen layers run once here."""
    from tqdm.auto import tqdm

    sequences = [ids for example in examples for ids in (example["chosen_ids"], example["rejected_ids"])]
    tokens = sum(len(ids) for ids in sequences)
    hidden = model.config.hidden_size
    print(f"caching the states of {len(sequences)} sequences below layer {cut} ({tokens * hidden * 4 / 1e9:.2f} GB)")
    bar = tqdm(total=len(sequences), desc=f"frozen layers 0-{cut - 1}", unit="seq")

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    flat = frozen_states(
        model,
        sequences,
        cut,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=config.per_device_eval_batch_size,
        progress=progress,
    )
    bar.close()
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(len(examples))]


def _train_runtime(log_history: list[dict]) -> float | None:
    return next((entry["train_runtime"] for entry in reversed(log_history) if "train_runtime" in entry), None)


def _report(run, config, log_history, metrics, evaluation, train_stats, artifact) -> None:
    trained = {
        "loss": ("reward-model loss", {"train loss": "loss"}),
        "train_accuracy": ("pairwise accuracy on training batches", {"train accuracy": "accuracy"}),
    }
    plots = [
        *plot_history(run.dir, log_history, trained),
        plot_reliability(evaluation, run.dir / "reliability.png", "reliability on the held-out pairs"),
        plot_length_bias(evaluation, run.dir / "length_bias.png"),
    ]
    heads = {"eval_heads": evaluation["heads"]} if "heads" in evaluation else {}
    write_metrics(run, metrics | {"eval_length_buckets": evaluation["length_buckets"]} | heads)
    pairs_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    layers_text = f" (its bottom {config.num_layers} layers)" if config.num_layers else ""
    pooling_text = "the mean of the reply's tokens" if config.pooling == "reply_mean" else "the last token"
    heads_text = (
        "a one-output score head"
        if not config.objectives
        else (
            f"a score head of {1 + len(config.objectives)} outputs (the preference head, then one per attribute: "
            f"{', '.join(config.objectives)}; each attribute head regresses the rubric scores)"
        )
    )
    setup = (
        f"Base `{config.model}`{layers_text} with {heads_text} reading {pooling_text}, "
        f"PEFT `{config.peft}` (r={config.lora_r}), data `{config.dataset}`, "
        f"learning rate {config.learning_rate}, {metrics['steps']} steps of "
        f"{pairs_per_step} pairs, max_length {config.max_length}, ties `{config.ties}`. "
        f"Output `{artifact.ref}` in `{artifact.path}`."
    )
    data = (
        f"Training: {train_stats.describe()}. Evaluation: {evaluation['truncation']['rows']} pairs, "
        f"{evaluation['truncation']['truncated']} with the prompt cut from the left, none dropped."
    )
    write_report(
        run,
        "Reward-model report",
        summary=metrics,
        sections=[
            ("Setup", setup),
            ("Data and truncation", data),
            ("Length bias and calibration", markdown(evaluation)),
        ]
        + ([("Heads", heads_markdown(evaluation))] if config.objectives else []),
        plots=plots,
    )


def main(
    config_path: str | None, overrides: list[str], *, workspace: str | None = None, resume: str | bool | None = None
):
    """`align rm`: the recipe plus overrides, or on --resume the recipe the run started with."""
    return run_recipe("rm", RewardStageConfig, run_rm, config_path, overrides, workspace=workspace, resume=resume)
