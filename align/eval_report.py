"""The report of `align eval` (runs/ID/report.md with plots) and its one-line-per-row summary on the terminal."""

from __future__ import annotations

from align.eval_metrics import attributes_table, eval_plots, format_interval, results_table
from align.reports import write_metrics, write_report
from align.stats import verdict


def write_eval_report(run, config, metrics, rows, generations, rewards) -> None:
    baseline = config["baseline"]
    notes = []
    if not config["rm"]:
        notes.append("No reward model (--rm): no rewards and no win rates.")
    if config["references"]:
        errors = {
            why["error"]
            for entry in metrics["rows"].values()
            for why in entry["references"].values()
            if isinstance(why, dict) and "error" in why
        }
        notes += sorted(errors)
        notes.append(
            f"Reference metrics on the {metrics['reference_answers']} prompts with a reference answer: ROUGE mean F1 "
            "(rouge-score), corpus BLEU 0-100 (sacrebleu), METEOR (NLTK)."
        )
    method = (
        "Intervals: 95% percentile bootstrap over prompts "
        f"({config['bootstrap']} resamples, seed {config['sampling']['seed']}, shared by every row). "
        "Win rate: reward above the baseline's = 1, equal = 0.5. LC win rate: logistic regression of the win on "
        "tanh(length difference / its standard deviation), in characters, read at equal length. "
        "KL: mean over prompts of the summed per-token log-ratio on the row's own reply."
    )
    if metrics.get("attributes"):
        method += (
            " Attributes: each attribute head of the reward model scores every reply (its predicted rubric score, "
            "1-5); its win rate is computed as the reward's, from that head's scores. Verdicts: whether the win "
            "rate's interval lies above 0.5 (better), below it (worse), or holds it (no detectable difference)."
        )
    sampling = config["sampling"]
    setup = (
        f"`{metrics['dataset']}`: {metrics['prompts']} prompts. Each row samples one reply per prompt "
        f"(max_new_tokens {sampling['max_new_tokens']}, temperature {sampling['temperature']}, top_p "
        f"{sampling['top_p']}, seed {sampling['seed']}, weights in {sampling.get('dtype') or 'fp32'}). Reward model: "
        f"{'`' + config['rm'] + '`' if config['rm'] else 'none'}. Generations: `{metrics['candidates']}`."
    )
    best_of = [row for row in rows if row.best_of]
    if best_of:
        setup += (
            f" `{best_of[0].name}`: {best_of[0].best_of} samples per prompt at temperature "
            f"{config['best_of_temperature']}, the reward model's best kept (judged by the same model: an upper "
            "estimate)."
        )
    if config["few_shot"]:
        few = config["few_shot"]
        setup += f" Few-shot baseline: `{few['model']}` with {few['k']} examples from `{few['from']}`."
    names = [row.name for row in rows]
    table = results_table(
        metrics, names, baseline, kl_reference=config["kl_reference"], references=config["references"]
    )
    plots = eval_plots(run.dir, names, [made["lengths"] for made in generations], rewards, metrics, baseline)
    write_metrics(run, metrics)
    summary = {"prompts": metrics["prompts"], "rows": len(rows), "baseline": baseline}
    for row in rows:
        entry = metrics["rows"][row.name]
        if "win_rate" in entry:
            summary[f"win rate of {row.name}"] = entry["win_rate"]["value"]
        for attribute, found in entry.get("attributes", {}).items():
            if "win_rate" in found:
                summary[f"{attribute} win rate of {row.name}"] = found["win_rate"]["value"]
    results = [("Results", table)]
    if metrics.get("attributes"):
        results.append(("Attributes", attributes_table(metrics, names, baseline)))
    write_report(
        run,
        "Evaluation",
        summary=summary,
        sections=[("Setup", setup), *results, ("Method", method)]
        + ([("Notes", "\n".join(f"- {note}" for note in notes))] if notes else []),
        plots=plots,
    )


def print_summary(result) -> None:
    """One line per row: mean reward, the win rate against the baseline with its 95% interval and what that
    interval says (better, worse or no detectable difference), the length-controlled win rate, length, KL; then,
    with attribute heads, a line per attribute: its mean score and its win rate, with the same verdict."""
    print(f"{result.version.ref}  {result.version.num_rows} rows  kind=candidates")
    baseline = result.metrics.get("baseline")
    for name, entry in result.metrics["rows"].items():
        parts = [f"reward {format_interval(entry['reward'])}"] if "reward" in entry else []
        if "win_rate" in entry:
            win, lc = entry["win_rate"], entry["lc_win_rate"]
            parts.append(
                f"win rate vs {baseline} {format_interval(win)}: {verdict(win['low'], win['high'])} "
                f"(length-controlled {format_interval(lc)}: {verdict(lc['low'], lc['high'])})"
            )
        parts.append(f"{entry['length_tokens']['value']:.1f} tokens")
        if "kl" in entry and "value" in entry["kl"]:
            parts.append(f"KL {entry['kl']['value']:.3f}")
        print(f"  {name}: " + ", ".join(parts))
        for attribute, found in entry.get("attributes", {}).items():
            line = f"{attribute} {format_interval(found['score'], 2)} (1-5)"
            if "win_rate" in found:
                win = found["win_rate"]
                line += (
                    f", {attribute} win rate vs {baseline} {format_interval(win)}: {verdict(win['low'], win['high'])}"
                )
            print(f"    {line}")
    print(f"report: {result.run.dir / 'report.md'}")
