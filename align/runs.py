"""What every stage does around its training loop: check its inputs, open or resume a run and record its recipe,
log its steps as they happen, and hand them to the `report_to` loggers. Its metrics and report: align/reports.py.

    runs/ID/recipe.yaml     the values the user gave (recipe plus overrides): what `--resume` rebuilds from
    runs/ID/live.jsonl      one line per logged step while the run trains: what `align serve` plots live

Under a launcher with several processes (`accelerate launch`, align/distributed.py) only the main process writes:
it resolves the recipe to resume, registers the data split, opens the run and marks it failed; the others read
what it wrote (the registry's versions and the run's folder) and train their share. A stage ends with
`wait_for_everyone()` before the main process registers anything, so a process that failed stops it there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from align import distributed
from align.config import build_config, config_to_dict, parse_overrides, read_yaml
from align.errors import AlignError
from align.registry import DatasetVersion, Registry


def recipe_for(registry, stage: str, config_path: str | None, overrides: list[str], resume: str | bool | None):
    """(recipe values, where they came from, run ID to resume or None).

    A new run takes the recipe file plus `--key value` overrides. `--resume` (the latest unfinished run of the
    stage, or `--resume ID`) takes the recipe that run started with, so it continues the same configuration.
    """
    import yaml

    if resume:
        run = find_resumable(registry, stage, None if resume is True else resume)
        if config_path or overrides:
            print(f"resuming {run.id} with the recipe it started with (the command line's config is ignored)")
        saved = run.dir / "recipe.yaml"
        return yaml.safe_load(saved.read_text(encoding="utf-8")) or {}, str(saved), run.id
    recipe = (read_yaml(config_path) if config_path else {}) | parse_overrides(overrides)
    return recipe, config_path or "command line", None


def run_recipe(
    stage: str, config_class, run_stage, config_path: str | None, overrides: list[str], *, workspace, resume
):
    """`align STAGE`: build `config_class` from the recipe plus overrides (on --resume, the recipe the run started
    with) and call `run_stage(config, registry, recipe=..., resume=RUN_ID or None)`. Returns what it returns."""
    distributed.start()  # under a launcher: join the other processes before a Trainer's config sets devices up
    registry = Registry(workspace)
    found = recipe_for(registry, stage, config_path, overrides, resume) if distributed.is_main_process() else None
    recipe, source, run_id = distributed.broadcast_from_main(found)  # the main process decides what resumes
    config = build_config(config_class, recipe, source=source)
    return run_stage(config, registry, recipe=recipe, resume=run_id)


def open_run(
    registry,
    stage: str,
    *,
    recipe: dict,
    config_dict: dict,
    inputs: Sequence[str],
    seed: int | None,
    resume: str | None = None,
):
    """Start a new run (saving its recipe), or mark the run `resume` names as running again."""
    import yaml

    if resume:
        return registry.resume_run(resume)
    run = registry.start_run(stage, config=config_dict, inputs=inputs, seed=seed)
    (run.dir / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return run


@dataclass(frozen=True)
class StageData:
    """A stage's data, resolved and checked: `dataset`, and `eval_dataset` when the config names one (else a
    seeded split of `dataset` is held out). Nothing is registered until `split`."""

    dataset: DatasetVersion
    eval_dataset: DatasetVersion | None
    eval_split: float
    seed: int

    def split(self, registry) -> tuple[DatasetVersion, DatasetVersion]:
        """(train version, eval version): `dataset` and `eval_dataset`, or the seeded split of `dataset`, registered
        here (the same rows and seed give the same versions again)."""
        if self.eval_dataset is not None:
            return self.dataset, self.eval_dataset
        refs = None
        if distributed.is_main_process():  # the others read the versions the main process registered
            refs = tuple(v.ref for v in registry.split(self.dataset, test_size=self.eval_split, seed=self.seed))
        train_ref, eval_ref = distributed.broadcast_from_main(refs)
        return registry.resolve(train_ref), registry.resolve(eval_ref)


def stage_data(registry, config, kind: str) -> StageData:
    """The data of a stage config. A reference that does not resolve, holds other rows than `kind`, or has too few
    rows to hold `eval_split` of them out, fails here; nothing is registered."""
    dataset = registry.resolve(config.dataset, kind=kind)
    eval_dataset = registry.resolve(config.eval_dataset, kind=kind) if config.eval_dataset else None
    if eval_dataset is None:
        if dataset.num_rows < 2:
            raise AlignError(f"{dataset.ref} has {dataset.num_rows} row: too few to hold some out for evaluation")
        held_out = round(dataset.num_rows * config.eval_split)
        if not 1 <= held_out < dataset.num_rows:
            raise AlignError(
                f"eval_split {config.eval_split} of the {dataset.num_rows} rows of {dataset.ref} holds out {held_out}: "
                "change eval_split, or name an eval_dataset"
            )
    return StageData(dataset, eval_dataset, config.eval_split, config.seed)


def open_stage_run(registry, stage: str, config, *, inputs: Sequence[str], recipe: dict | None, resume):
    """Open (or resume) the run of a stage, recording its config, inputs and seed. A Trainer's config gets
    runs/ID/checkpoints as its output_dir (what --resume continues from). TensorBoard writes to runs/ID/logs (its
    writer would otherwise default to ./runs/ when the first evaluation logs before training). Under a launcher
    the main process opens the run and the others take it from the registry: one launch, one run."""
    run_id = None
    if distributed.is_main_process():
        opened = open_run(
            registry,
            stage,
            recipe=recipe or {},
            config_dict=config_to_dict(config),
            inputs=inputs,
            seed=config.seed,
            resume=resume,
        )
        run_id = opened.id
        print(global_batch(config))
    run = registry.get_run(distributed.broadcast_from_main(run_id))
    if hasattr(config, "output_dir"):  # TrainingArguments (PPO's own loop writes there itself)
        config.output_dir = str(run.dir / "checkpoints")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.dir / "logs")
    return run


def global_batch(config) -> str:
    """One line on the batch a step (an update, for PPO) trains on, over every process of the launch."""
    processes = distributed.world_size()
    if hasattr(config, "per_device_train_batch_size"):
        per_device, steps = config.per_device_train_batch_size, config.gradient_accumulation_steps
        return (
            f"global batch {per_device * processes * steps} = {per_device} per device x {processes} "
            f"process{'es' if processes > 1 else ''} x {steps} accumulation step{'s' if steps > 1 else ''}"
        )
    share = config.batch_size // processes
    return f"global batch {config.batch_size} prompts per update = {share} per process x {processes}"


@contextlib.contextmanager
def failures_recorded(registry, run):
    """Around a stage's work: when it raises (an interrupt too), the run is marked failed with the error. Under a
    launcher the main process marks it: its own error, the backend's when a peer died in a collective, or
    LaunchStopped when the launcher stopped it because another process failed."""
    try:
        yield
    except BaseException as exc:
        if distributed.is_main_process():
            error = f"{type(exc).__name__}: {exc}"
            processes = distributed.world_size()
            if processes > 1:  # a peer's failure reaches the main process as a lost connection
                error += f" [process 0 of {processes}: another process's own error is in the launch's log]"
            registry.finish_run(run, status="failed", error=error)
        raise


def find_resumable(registry, stage: str, run_id: str | None):
    if run_id:
        run = registry.get_run(run_id)
        if run.stage != stage:
            raise AlignError(f"run {run_id} is a '{run.stage}' run, not '{stage}'")
    else:
        unfinished = [
            r for r in registry.list_runs() if r.stage == stage and r.shown_status in ("interrupted", "failed")
        ]
        if not unfinished:
            raise AlignError(f"no interrupted or failed '{stage}' run to resume (see `align runs list`)")
        run = unfinished[-1]
    if run.status == "completed":
        raise AlignError(f"run {run.id} already completed; start a new run instead of --resume")
    if run.shown_status == "running":
        raise AlignError(f"run {run.id} is still running (process {run.pid})")
    return run


def last_checkpoint(folder: Path) -> str | None:
    """The newest complete checkpoint-N folder under a trainer's output_dir, if any. A Trainer writes the
    checkpoint's trainer_state.json last: a folder without a whole one is a save that a kill cut short."""
    numbered = [p for p in Path(folder).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    for checkpoint in sorted(numbered, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        return str(checkpoint)
    return None


# Live metrics: each logged step is appended to runs/ID/live.jsonl as it happens, so a run can be watched while
# it trains (the Runs tab of `align serve`); a line is flushed at once and a half-written last line is skipped.

LIVE_FILE = "live.jsonl"


def append_live(run_dir: Path, step: float, values: dict) -> None:
    numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers = {k: v for k, v in numbers.items() if math.isfinite(v)}
    if not numbers:
        return
    with open(Path(run_dir) / LIVE_FILE, "a", encoding="utf-8") as out:
        out.write(json.dumps({"step": step, **numbers}) + "\n")


def read_live(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / LIVE_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the line being written right now
    return entries


def live_metrics_callback(run):
    """A Trainer callback that appends every log entry (loss, learning rate, ...) to the run's live.jsonl."""
    from transformers import TrainerCallback

    class LiveMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                append_live(run.dir, state.global_step, logs)

    return LiveMetrics()


# Loggers: `report_to` names transformers' logging integrations (tensorboard by default, wandb, mlflow, ...). The
# Trainer-based stages hand it to their Trainer; a loop of our own (PPO's) feeds the same integrations itself.


class LoopLoggers:
    """The `report_to` integrations for a training loop of our own, called as a Trainer calls them: `log` passes
    one step's numbers, as a Trainer passes its logs. `training_args` (TrainingArguments' fields, `report_to`
    among them) describe the run; TensorBoard records them as its "args" text and writes where
    TENSORBOARD_LOGGING_DIR points (see `open_stage_run`)."""

    def __init__(self, output_dir: str, *, model=None, **training_args):
        from transformers import TrainerControl, TrainerState, TrainingArguments
        from transformers.integrations import get_reporting_integration_callbacks

        self.args = TrainingArguments(output_dir=output_dir, **training_args)
        self.state, self.control = TrainerState(), TrainerControl()
        self.callbacks = [callback() for callback in get_reporting_integration_callbacks(self.args.report_to)]
        for callback in self.callbacks:
            callback.on_init_end(self.args, self.state, self.control)
            callback.on_train_begin(self.args, self.state, self.control, model=model)

    def log(self, step: int, values: dict) -> None:
        self.state.global_step = step
        for callback in self.callbacks:
            callback.on_log(self.args, self.state, self.control, logs=dict(values))

    def close(self) -> None:
        for callback in self.callbacks:
            callback.on_train_end(self.args, self.state, self.control)

    def __enter__(self) -> LoopLoggers:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
