"""`align rm eval` and `align rm score`: a reward model applied to any registry version, as a recorded run.

    align rm eval --rm rm:hh-rm --data hh-harmless-test          # accuracy, margin, ECE, length bias + report
    align rm eval --rm smollm2-135m --data hh-harmless-test      # the same base with an untrained head (seed 0)
    align rm eval --rm rm:multi --data seed-prefs-test           # + each attribute head (align rm --objectives)
    align rm score --rm rm:hh-rm --data seed-candidates --name seed-candidates-rm

Scoring writes a `preference` version labelled by the reward model: for each row, the reply it scores highest
is `chosen`, the lowest `rejected`, the gap is the `margin` (a tie when the scores are equal). Every score
(all completions of a candidates row; chosen and rejected of a preference row, in the source's order) is kept in
the version's meta under "scores", with the agreement between the model and the source's labels.

A multi-objective reward model (`align rm --objectives ...`) is evaluated head by head as well: each head's
accuracy on the pairs whose rubric scores for an attribute differ, beside the preference head's
(reward.metrics.head_metrics). Scoring uses its preference head.
"""

from __future__ import annotations

from align.reports import write_metrics, write_report
from reward.metrics import headline, heads_markdown, markdown, plot_length_bias, plot_reliability
from reward.model import RewardModel


def _lineage_ref(ref: str) -> str:
    return ref if ref.startswith(("rm:", "model:")) else f"base:{ref}"


def evaluate_rm(
    registry, rm_ref: str, data_ref: str, *, max_length: int | None = None, batch_size: int = 8, seed: int = 0
):
    """Evaluate on a preference version; returns (run, metrics). The run folder holds the report and plots."""
    version = registry.resolve(data_ref, kind="preference")
    config = {"rm": rm_ref, "data": version.ref, "max_length": max_length, "batch_size": batch_size, "seed": seed}
    run = registry.start_run("rm-eval", config=config, inputs=[rm_ref, version.ref], seed=seed)
    try:
        rm = RewardModel.load(rm_ref, registry, max_length=max_length, batch_size=batch_size, seed=seed)
        trained = rm_ref.startswith("rm:")
        what = rm.ref if trained else f"{rm.ref} (untrained head)"
        print(f"run {run.id}: {what} on {version.ref}, max_length {rm.max_length}")
        metrics, _ = rm.evaluate(registry.rows(version), progress=True)
        summary = headline(metrics) | {"truncated": metrics["truncation"]["truncated"]}
        summary["replies_cut"] = metrics["truncation"]["replies_cut"]
        plots = [
            plot_reliability(metrics, run.dir / "reliability.png", f"reliability of {rm.ref} on {version.ref}"),
            plot_length_bias(metrics, run.dir / "length_bias.png"),
        ]
        heads = {"heads": metrics["heads"]} if "heads" in metrics else {}
        write_metrics(run, summary | {"length_buckets": metrics["length_buckets"]} | heads)
        setup = (
            f"Reward model `{rm.ref}`{'' if trained else f' (base model with an untrained head, seed {seed})'} on "
            f"`{version.ref}` ({version.num_rows} rows), max_length {rm.max_length}: "
            f"{metrics['truncation']['truncated']} pairs had the prompt cut from the left, none dropped."
        )
        write_report(
            run,
            "Reward-model evaluation",
            summary=summary,
            sections=[("Setup", setup), ("Length bias and calibration", markdown(metrics))]
            + ([("Heads", heads_markdown(metrics))] if heads else []),
            plots=plots,
        )
        registry.finish_run(run, metrics=summary | heads)
        return run, summary | heads
    except BaseException as exc:
        registry.finish_run(run, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise


def score_dataset(
    registry,
    rm_ref: str,
    data_ref: str,
    name: str,
    *,
    max_length: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
):
    """Score a candidates or preference version; registers and returns the reward-model-labelled version."""
    from align.registry import check_name

    check_name(name)
    version = registry.resolve(data_ref, kind=("candidates", "preference"))
    config = {"rm": rm_ref, "data": version.ref, "name": name, "max_length": max_length, "batch_size": batch_size}
    run = registry.start_run("rm-score", config=config, inputs=[rm_ref, version.ref], seed=seed)
    try:
        rm = RewardModel.load(rm_ref, registry, max_length=max_length, batch_size=batch_size, seed=seed)
        rows = registry.rows(version)
        print(f"run {run.id}: scoring {version.ref} ({len(rows)} {version.kind} rows) with {rm.ref}")
        if version.kind == "preference":
            pairs = rm.score_pairs(rows, progress=True)
            scores = [[c, r] for c, r in zip(pairs.chosen, pairs.rejected)]
            replies = [[row["chosen"], row["rejected"]] for row in rows]
            truncation = pairs.stats.summary()
        else:
            flat = [(row["prompt"], completion) for row in rows for completion in row["completions"]]
            flat_scores = rm.score([p for p, _ in flat], [c for _, c in flat], progress=True)
            scores, start = [], 0
            for row in rows:
                scores.append(flat_scores[start : start + len(row["completions"])])
                start += len(row["completions"])
            replies = [row["completions"] for row in rows]
            truncation = rm.last_stats.summary()

        labelled = [_best_against_worst(row["prompt"], options, s) for row, options, s in zip(rows, replies, scores)]
        agreement = _agreement(version.kind, rows, scores)
        meta = {"scored_by": rm.ref, "source": version.ref, "scores": scores, "truncation": truncation}
        meta["agreement_with_source"] = agreement
        new = registry.register(
            labelled,
            name=name,
            kind="preference",
            parents=[(version, "scored"), (_lineage_ref(rm.ref), "reward-model")],
            run=run,
            meta=meta,
        )
        metrics = {"rows": len(labelled), "agreement_with_source": agreement, "truncated": truncation["truncated"]}
        write_metrics(run, metrics)
        write_report(
            run,
            "Reward-model scoring",
            summary=metrics,
            sections=[("Output", f"`{new.ref}`: preference pairs labelled by `{rm.ref}` from `{version.ref}`.")],
        )
        registry.finish_run(run, metrics=metrics, outputs=[new.ref])
        return new, agreement
    except BaseException as exc:
        registry.finish_run(run, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise


def _best_against_worst(prompt: list[dict], replies: list, scores: list[float]) -> dict:
    best = max(range(len(scores)), key=lambda i: scores[i])
    worst = min(range(len(scores)), key=lambda i: scores[i])
    if best == worst:  # all scores equal: keep the source order
        best, worst = 0, 1
    gap = scores[best] - scores[worst]
    row = {"prompt": prompt, "chosen": replies[best], "rejected": replies[worst], "margin": gap}
    if gap == 0:
        row["tie"] = True
    return row


def _agreement(kind: str, rows: list[dict], scores: list[list[float]]) -> float | None:
    """Preference rows: the share of decided pairs the model orders as labelled. Candidates: the share of rows
    with a `gold` completion where gold scores highest. None when the source has no labels to agree with."""
    if kind == "preference":
        decided = [s for row, s in zip(rows, scores) if not row.get("tie")]
        hits = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in decided]
    else:
        hits = [1.0 if max(s) == s[row["gold"]] else 0.0 for row, s in zip(rows, scores) if "gold" in row]
    return sum(hits) / len(hits) if hits else None
