"""`align sweep`: search a stage's recipe keys with Optuna, choosing on validation pairs, never on the test split.

    align sweep --config recipes/sweep/rm-smollm2.yaml
    align sweep --config recipes/sweep/rm-smollm2.yaml --n-trials 4     # a second process may join the study

The sweep recipe names a stage, its recipe, the keys to search and their ranges:

    stage: rm
    recipe: recipes/rm/smollm2-135m-lora.yaml
    dataset: hh-harmless-train        # the training data; the validation split is carved from it
    test_dataset: hh-harmless-test    # read once, by the winner, after the search
    search:
      learning_rate: {low: 5.0e-5, high: 1.0e-3, log: true}
      lora_top_layers: {low: 2, high: 12}
      num_train_epochs: {choices: [1, 2, 3]}

How it stays honest: `dataset` is split (seeded) into `NAME-fit` and `NAME-val`; every trial trains on the fit
part and is scored on the val part (its stage's held-out evaluation, e.g. `eval_accuracy`), and Optuna sees
only that score. The test split is read once, after the search, by the best trial's output. Each trial is an
ordinary registered run with lineage (its inputs are the fit and val versions), so `align runs list` shows it.

The study lives in Optuna's RDB storage, a SQLite file in the workspace (`sweeps/STUDY.sqlite`): a second
process with the same recipe joins the same study, and an interrupted sweep resumes where it stopped. A trial
whose process died is noticed by its missing heartbeat and run again with the same values. Trials report
their validation score as they train (a stage that evaluates during training, e.g. per epoch), and the median
pruner stops those below the median of earlier trials at the same step.

The winner is written as a recipe (`runs/ID/best.yaml`; `--write-recipe PATH` also copies it), and the report
plots every trial.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from align.config import build_config, config_to_dict, read_yaml
from align.errors import AlignError
from align.registry import Registry
from align.reports import plot_series, write_metrics, write_report

STAGES = ("rm", "dpo", "sft")
DIRECTIONS = ("maximize", "minimize")
PRUNERS = ("median", "none")


@dataclass
class SweepConfig:
    stage: str = field(default="rm", metadata={"help": "the stage to tune: rm | dpo | sft"})
    recipe: str | None = field(default=None, metadata={"help": "the stage's recipe file the trials start from"})
    dataset: str | None = field(default=None, metadata={"help": "training data; the validation split is cut from it"})
    test_dataset: str | None = field(
        default=None, metadata={"help": "held-out data read once, by the winner, after the search (rm only)"}
    )
    study: str | None = field(default=None, metadata={"help": "study name (default: STAGE-sweep)"})
    n_trials: int = field(default=8, metadata={"help": "finished trials (completed or pruned) the study aims at"})
    metric: str = field(default="eval_accuracy", metadata={"help": "the run metric Optuna optimizes"})
    direction: str = field(default="maximize", metadata={"help": "maximize | minimize"})
    validation_split: float = field(default=0.15, metadata={"help": "share of `dataset` held out for selection"})
    seed: int = field(default=0, metadata={"help": "the validation split's and the sampler's seed"})
    pruner: str = field(default="median", metadata={"help": "median | none"})
    pruner_warmup_steps: int = field(default=0, metadata={"help": "reports before a trial may be pruned"})
    overrides: dict = field(default_factory=dict, metadata={"help": "fixed keys over the stage recipe"})
    search: dict = field(default_factory=dict, metadata={"help": "KEY: {low, high[, log, step]} or {choices}"})

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"config key 'stage' must be one of {', '.join(STAGES)} (got {self.stage!r})")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"config key 'direction' must be maximize or minimize (got {self.direction!r})")
        if self.pruner not in PRUNERS:
            raise ValueError(f"config key 'pruner' must be median or none (got {self.pruner!r})")
        if not 0 < self.validation_split < 1:
            raise ValueError(f"config key 'validation_split' must be between 0 and 1 (got {self.validation_split!r})")
        if self.n_trials < 1:
            raise ValueError(f"config key 'n_trials' must be at least 1 (got {self.n_trials!r})")
        if not self.dataset:
            raise ValueError("config key 'dataset' is required: the training data the validation split is cut from")
        if not self.search:
            raise ValueError("config key 'search' is empty: name at least one recipe key and its range")
        for key, space in self.search.items():
            check_space(key, space)
        self.study = self.study or f"{self.stage}-sweep"
        if self.test_dataset and self.stage != "rm":
            raise ValueError(
                "config key 'test_dataset' is supported for stage rm only (its winner is scored by rm eval)"
            )


def check_space(key: str, space) -> None:
    """A search space is {choices: [...]} or {low, high} with optional log (floats) or step (ints)."""
    where = f"config key 'search.{key}'"
    if not isinstance(space, dict):
        raise ValueError(f"{where} must be a mapping: {{low, high}} or {{choices: [...]}} (got {space!r})")
    unknown = set(space) - {"low", "high", "log", "step", "choices"}
    if unknown:
        raise ValueError(f"{where}: unknown field {sorted(unknown)[0]!r}; use low, high, log, step or choices")
    if "choices" in space:
        if not isinstance(space["choices"], list) or not space["choices"] or len(space) > 1:
            raise ValueError(f"{where}: choices must be a non-empty list, on its own (got {space!r})")
        return
    low, high = space.get("low"), space.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)) or not low < high:
        raise ValueError(f"{where}: low and high must be numbers with low < high (got {low!r}, {high!r})")
    if space.get("log") and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0 (got {low!r})")


def suggest(trial, key: str, space: dict):
    if "choices" in space:
        return trial.suggest_categorical(key, space["choices"])
    low, high = space["low"], space["high"]
    if isinstance(low, int) and isinstance(high, int) and not space.get("log"):
        return trial.suggest_int(key, low, high, step=space.get("step", 1))
    return trial.suggest_float(key, float(low), float(high), log=bool(space.get("log")), step=space.get("step"))


def stage_entry(stage: str):
    """(config class, run function) of a stage: the sweep runs stages in process, as the pipeline does."""
    if stage == "rm":
        from reward.train import RewardStageConfig, run_rm

        return RewardStageConfig, run_rm
    if stage == "dpo":
        from align.dpo import DPOStageConfig, run_dpo

        return DPOStageConfig, run_dpo
    from align.sft import SFTStageConfig, run_sft

    return SFTStageConfig, run_sft


def trial_recipe(config: SweepConfig, values: dict, fit_ref: str, val_ref: str, number: int) -> dict:
    """A trial's recipe: the stage recipe, the fixed overrides, the sampled values, the fit/val data."""
    recipe = read_yaml(config.recipe) if config.recipe else {}
    recipe |= config.overrides | values
    base_name = recipe.get("output_name") or config.stage
    return recipe | {
        "dataset": fit_ref,
        "eval_dataset": val_ref,
        "output_name": f"{base_name}-{config.study}-t{number}",
        "seed": recipe.get("seed", config.seed),
    }


def pruning_callback(trial, metric: str):
    """A transformers callback reporting the stage's logged validation metric to Optuna, pruning on request."""
    import optuna
    from transformers import TrainerCallback

    class ReportToOptuna(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and metric in logs and isinstance(logs[metric], (int, float)):
                trial.report(float(logs[metric]), step=state.global_step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"{metric} {logs[metric]:.4f} at step {state.global_step}")

    return ReportToOptuna()


def open_study(config: SweepConfig, registry: Registry):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    folder = registry.root / "sweeps"
    folder.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats
    storage = RDBStorage(
        f"sqlite:///{(folder / f'{config.study}.sqlite').resolve()}",
        heartbeat_interval=30,
        grace_period=90,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=config.pruner_warmup_steps)
        if config.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    return optuna.create_study(
        study_name=config.study,
        storage=storage,
        direction=config.direction,
        sampler=optuna.samplers.TPESampler(seed=config.seed),
        pruner=pruner,
        load_if_exists=True,
    )


def run_sweep(config: SweepConfig, registry: Registry, *, n_trials: int | None = None, write_recipe: str | None = None):
    """Run (or join, or resume) the study; returns a dict with the best trial, its output and its test score."""
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    stage_config, run_stage = stage_entry(config.stage)
    # Everything that can be wrong fails now, before any trial: the data, the recipe, every search key.
    source = registry.resolve(config.dataset)
    test = registry.resolve(config.test_dataset) if config.test_dataset else None
    if test is not None and test.content_hash == source.content_hash:
        raise AlignError(f"test_dataset {test.ref} is the training data itself: name a held-out split")
    fit, val = registry.split(
        source,
        test_size=config.validation_split,
        seed=config.seed,
        train_name=f"{source.name}-fit",
        test_name=f"{source.name}-val",
    )
    probe = trial_recipe(config, {}, fit.ref, val.ref, 0)
    known = {f.name for f in dataclasses.fields(stage_config)}
    for key in config.search:
        if key not in known:
            raise AlignError(f"config key 'search.{key}' is not a key of the {config.stage} recipe")
    build_config(stage_config, probe, source=f"sweep recipe ({config.recipe})")

    run = registry.start_run(
        "sweep", config=config_to_dict(config), inputs=[source.ref, fit.ref, val.ref], seed=config.seed
    )
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = open_study(config, registry)

        def objective(trial):
            values = {key: suggest(trial, key, space) for key, space in config.search.items()}
            recipe = trial_recipe(config, values, fit.ref, val.ref, trial.number)
            print(f"trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)
            stage_cfg = build_config(stage_config, recipe, source=f"sweep trial {trial.number}")
            artifact = run_stage(stage_cfg, registry, recipe=recipe, callbacks=[pruning_callback(trial, config.metric)])
            metrics = registry.get_run(artifact.run_id).metrics
            if config.metric not in metrics:
                raise AlignError(
                    f"the {config.stage} run has no metric {config.metric!r}; it has {', '.join(sorted(metrics))}"
                )
            trial.set_user_attr("artifact", artifact.ref)
            trial.set_user_attr("run", artifact.run_id)
            print(f"trial {trial.number}: {config.metric} {metrics[config.metric]:.4f} ({artifact.ref})", flush=True)
            return float(metrics[config.metric])

        target = n_trials or config.n_trials
        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        done = len(study.get_trials(deepcopy=False, states=finished))
        if done < target:
            study.optimize(
                objective,
                callbacks=[MaxTrialsCallback(target, states=finished)],
                catch=(AlignError,),
                gc_after_trial=True,
            )
        result = _finish(config, registry, run, study, fit, val, test, write_recipe)
        registry.finish_run(run, metrics=result["metrics"], outputs=result["outputs"])
        return result
    except BaseException as exc:
        registry.finish_run(run, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _finish(config, registry, run, study, fit, val, test, write_recipe) -> dict:
    import yaml
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if not complete:
        raise AlignError(f"study {config.study} has no completed trial (see the runs of stage {config.stage})")
    best = study.best_trial
    metrics = {
        "trials_complete": len(complete),
        "trials_pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "trials_failed": sum(t.state == TrialState.FAIL for t in trials),
        "best_trial": best.number,
        f"best_val_{config.metric}": best.value,
        "best_params": dict(best.params),
        "validation_pairs": val.num_rows,
    }
    winner = read_yaml(config.recipe) if config.recipe else {}
    winner |= config.overrides | dict(best.params) | {"dataset": config.dataset}
    (run.dir / "best.yaml").write_text(
        f"# The winner of study {config.study} (trial {best.number}, validation {config.metric} "
        f"{best.value:.4f} on {val.ref}); made by:\n#   align sweep --config ... (run {run.id})\n"
        + yaml.safe_dump(winner, sort_keys=False),
        encoding="utf-8",
    )
    if write_recipe:
        Path(write_recipe).write_text((run.dir / "best.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    artifact = best.user_attrs.get("artifact")
    test_line = "no test_dataset given: the winner was not scored on held-out test data"
    if test is not None and artifact:
        # The one read of the test split: the chosen model, after the search is over.
        from align.stats import interval_text
        from reward.score import evaluate_rm

        eval_run, summary = evaluate_rm(registry, artifact, test.ref)
        metrics |= {"test_accuracy": summary["accuracy"], "test_pairs": summary["pairs"], "test_run": eval_run.id}
        test_line = f"test accuracy of {artifact} on {test.ref}: {interval_text(summary['accuracy'], summary['pairs'])}"
    _report(config, run, trials, metrics, artifact, test_line)
    write_metrics(run, metrics)
    print(
        f"best trial {best.number}: validation {config.metric} {best.value:.4f} with "
        + ", ".join(f"{k}={v}" for k, v in best.params.items())
        + f"\n{test_line}\nwinning recipe: {run.dir / 'best.yaml'}"
        + (f" (also {write_recipe})" if write_recipe else "")
    )
    return {"metrics": metrics, "outputs": [artifact] if artifact else [], "best_recipe": run.dir / "best.yaml"}


def _report(config, run, trials, metrics, artifact, test_line) -> None:
    from optuna.trial import TrialState

    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    series = {
        f"trial {t.number} ({t.state.name.lower()})": [
            (step, value) for step, value in sorted(t.intermediate_values.items())
        ]
        for t in finished
        if t.intermediate_values
    }
    plots = []
    if series:
        plots.append(plot_series(run.dir / "trials.png", f"validation {config.metric} while training", series))
    values = [(t.number, t.value) for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if values:
        plots.append(
            plot_series(run.dir / "final.png", f"final validation {config.metric} per trial", {"trial": values})
        )
    lines = [
        "| trial | state | " + " | ".join(config.search) + f" | val {config.metric} |",
        "|---" * (len(config.search) + 3) + "|",
    ]
    for t in trials:
        value = "" if t.value is None or math.isnan(t.value) else f"{t.value:.4f}"
        params = " | ".join(str(t.params.get(key, "")) for key in config.search)
        lines.append(f"| {t.number} | {t.state.name.lower()} | {params} | {value} |")
    write_report(
        run,
        f"Sweep {config.study}",
        summary={k: v for k, v in metrics.items() if not isinstance(v, dict)},
        sections=[
            (
                "Setup",
                f"Stage `{config.stage}`, recipe `{config.recipe}`, selection on `{config.metric}` of the "
                f"validation split ({metrics['validation_pairs']} rows); winner `{artifact}`.",
            ),
            ("Trials", "\n".join(lines)),
            ("Held-out test", test_line),
        ],
        plots=plots,
    )


def main(config_path: str, overrides: dict, *, workspace: str | None = None, n_trials=None, write_recipe=None):
    from align.config import load_config

    config = load_config(SweepConfig, config_path, overrides)
    return run_sweep(config, Registry(workspace), n_trials=n_trials, write_recipe=write_recipe)
