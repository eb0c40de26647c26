"""What a run leaves for people to read: its final numbers and a short report with plots, in runs/ID/.

runs/ID/metrics.json    the final numbers
runs/ID/report.md       a short report, with PNG plots beside it
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path


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
    figure, axis = new_figure()
    for name, points in series.items():
        xs, ys = zip(*points)
        axis.plot(xs, ys, marker="o" if len(points) < 30 else None, label=name)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.grid(alpha=0.3)
    axis.legend()
    return save_figure(figure, path)


def plot_history(folder: Path, log_history: list[dict], plots: dict[str, tuple[str, dict[str, str]]]) -> list:
    """Line plots of a Trainer's log history, `plots` as {file stem: (title, {series label: logged key})}: one
    PNG each in `folder`, or None for a plot with nothing logged."""
    return [
        plot_series(
            folder / f"{stem}.png", title, {label: history_series(log_history, key) for label, key in keys.items()}
        )
        for stem, (title, keys) in plots.items()
    ]


def plot_histogram(path: Path, title: str, values: list[float], xlabel: str) -> Path | None:
    """One PNG histogram with a line at 0; nothing is written when there are no values."""
    if not values:
        return None
    figure, axis = new_figure()
    axis.hist(values, bins=min(30, max(5, len(values) // 4)))
    axis.axvline(0, color="black", linewidth=1)
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.grid(alpha=0.3)
    return save_figure(figure, path)


def new_figure(figsize: tuple[float, float] = (6, 3.5)):
    """(figure, axis) of a new matplotlib figure, drawn off screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)


def save_figure(figure, path: Path) -> Path:
    """Write the figure as a PNG and free it."""
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


def before_after_table(rows: list[tuple[str, str]], before: dict, after: dict) -> str:
    """A markdown table of held-out metrics before and after training: rows are (label, key in both dicts)."""
    table = ["| held-out metric | before | after |", "| --- | --- | --- |"]
    table += [f"| {label} | {before[key]:.4f} | {after[key]:.4f} |" for label, key in rows]
    return "\n".join(table)


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
