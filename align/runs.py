"""What every stage does around its training loop: open or resume a run, record its recipe, and write its
metrics and a short report with plots into runs/ID/.

    runs/ID/recipe.yaml     the values the user gave (recipe plus overrides): what `--resume` rebuilds from
    runs/ID/live.jsonl      one line per logged step while the run trains: what `align serve` plots live
    runs/ID/metrics.json    the final numbers
    runs/ID/report.md       a short report, with PNG plots beside it
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from align.config import config_to_dict, parse_overrides, read_yaml
from align.errors import AlignError
from align.registry import DatasetVersion


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
        return registry.split(self.dataset, test_size=self.eval_split, seed=self.seed)


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
    """Open (or resume) the run of a stage, recording its config, inputs and seed. TensorBoard writes to
    runs/ID/logs (its writer would otherwise default to ./runs/ when the first evaluation logs before training)."""
    run = open_run(
        registry,
        stage,
        recipe=recipe or {},
        config_dict=config_to_dict(config),
        inputs=inputs,
        seed=config.seed,
        resume=resume,
    )
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.dir / "logs")
    return run


@contextlib.contextmanager
def failures_recorded(registry, run):
    """Around a stage's work: when it raises (an interrupt too), the run is marked failed with the error."""
    try:
        yield
    except BaseException as exc:
        registry.finish_run(run, status="failed", error=f"{type(exc).__name__}: {exc}")
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
    """The newest checkpoint-N folder under a trainer's output_dir, if any."""
    checkpoints = sorted(
        folder.glob("checkpoint-*"),
        key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
    )
    return str(checkpoints[-1]) if checkpoints else None


def write_metrics(run, metrics: dict) -> Path:
    path = run.dir / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, default=float) + "\n", encoding="utf-8")
    return path


def plot_series(
    path: Path, title: str, series: dict[str, list[tuple[float, float]]], xlabel: str = "step"
) -> Path | None:
    """One PNG line plot of several (x, y) series; nothing is written when there is nothing to draw."""
    series = {name: points for name, points in series.items() if points}
    if not series:
        return None
    figure, axis = _new_figure()
    for name, points in series.items():
        xs, ys = zip(*points)
        axis.plot(xs, ys, marker="o" if len(points) < 30 else None, label=name)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.grid(alpha=0.3)
    axis.legend()
    return _save_figure(figure, path)


def plot_histogram(path: Path, title: str, values: list[float], xlabel: str) -> Path | None:
    """One PNG histogram with a line at 0; nothing is written when there are no values."""
    if not values:
        return None
    figure, axis = _new_figure()
    axis.hist(values, bins=min(30, max(5, len(values) // 4)))
    axis.axvline(0, color="black", linewidth=1)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.grid(alpha=0.3)
    return _save_figure(figure, path)


def _new_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6, 3.5))


def _save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def history_series(log_history: list[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) pairs of one key in a Trainer's log history."""
    return [
        (entry["step"], entry[key])
        for entry in log_history
        if key in entry and "step" in entry and isinstance(entry[key], (int, float)) and math.isfinite(entry[key])
    ]


def write_report(
    run,
    title: str,
    *,
    summary: dict,
    sections: Sequence[tuple[str, str]] = (),
    plots: Sequence[Path | None] = (),
) -> Path:
    """report.md: a table of the headline numbers, free-form sections, then the plots."""
    lines = [
        f"# {title}",
        "",
        f"Run `{run.id}` (stage `{run.stage}`).",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    for key, value in summary.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key} | {shown} |")
    for heading, body in sections:
        lines += ["", f"## {heading}", "", body]
    drawn = [plot for plot in plots if plot]
    if drawn:
        lines += ["", "## Plots", ""]
        lines += [f"![{plot.stem}]({plot.name})" for plot in drawn]
    path = run.dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


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


def tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def checked_report_to(report_to: None | str | list[str]) -> None | str | list[str]:
    """`report_to` as a stage uses it: the default, tensorboard, becomes none where TensorBoard is not installed,
    and a name with no logging integration is refused at parse time."""
    if report_to == "tensorboard" and not tensorboard_installed():
        return "none"
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        get_reporting_integration_callbacks(report_to)
    except ValueError as exc:
        raise ValueError(f"config key 'report_to': {exc}") from None
    return report_to


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
