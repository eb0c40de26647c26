"""What every stage does around its training loop: open or resume a run, record its recipe, and write its
metrics and a short report with plots into runs/ID/.

    runs/ID/recipe.yaml     the values the user gave (recipe plus overrides): what `--resume` rebuilds from
    runs/ID/live.jsonl      one line per logged step while the run trains: what `align serve` plots live
    runs/ID/metrics.json    the final numbers
    runs/ID/report.md       a short report, with PNG plots beside it
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from align.errors import AlignError


def recipe_for(registry, stage: str, config_path: str | None, overrides: list[str], resume: str | bool | None):
    """(recipe values, where they came from, run ID to resume or None).

    A new run takes the recipe file plus `--key value` overrides. `--resume` (the latest unfinished run of the
    stage, or `--resume ID`) takes the recipe that run started with, so it continues the same configuration.
    """
    import yaml

    from align.config import parse_overrides, read_yaml

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name, points in series.items():
        xs, ys = zip(*points)
        axis.plot(xs, ys, marker="o" if len(points) < 30 else None, label=name)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.grid(alpha=0.3)
    axis.legend()
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
