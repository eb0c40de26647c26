"""Reward-model metrics on scored pairs: accuracy, margin, calibration, length bias; and their plots.

Calibration: the model's probability that the chosen reply wins is p = sigmoid(r_chosen - r_rejected). Its
prediction is the reply it scores higher, with confidence max(p, 1 - p). Pairs are binned by confidence over
[0.5, 1]; the expected calibration error is the pair-weighted mean over bins of |accuracy - mean confidence|
(Guo et al., 2017). A reward model that says 80% should be right 80% of the time.

Length bias: a reward model can learn "longer is better" instead of the preference. We report accuracy by
bucket of the length difference (chosen minus rejected, in tokens), how often the data and the model prefer
the longer reply, and the correlation between score and length.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from align.registry.schemas import read_scores
from align.stats import wilson_interval
from reward.objectives import PREFERENCE, scored_pairs, unscaled

LENGTH_EDGES = (-50, -10, 10, 50)  # token differences (chosen - rejected) that split the length buckets


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _correct(difference: float) -> float:
    """1 when the chosen reply scores higher, 0 when lower; an exact tie is a coin flip, half right."""
    return 1.0 if difference > 0 else 0.0 if difference < 0 else 0.5


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    if not chosen:
        return float("nan")
    return sum(_correct(c - r) for c, r in zip(chosen, rejected)) / len(chosen)


def mean_margin(chosen: Sequence[float], rejected: Sequence[float]) -> float:
    if not chosen:
        return float("nan")
    return sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)


@dataclass
class Bin:
    low: float
    high: float
    count: int
    confidence: float  # mean confidence of the pairs in the bin (nan when empty)
    accuracy: float  # share of those pairs the model gets right (nan when empty)


def reliability_bins(probabilities: Sequence[float], bins: int = 10) -> list[Bin]:
    """Bin the predictions by confidence max(p, 1 - p) over [0.5, 1]; p is P(chosen wins)."""
    width = 0.5 / bins
    members: list[list[tuple[float, float]]] = [[] for _ in range(bins)]
    for p in probabilities:
        confidence = max(p, 1 - p)
        index = min(int((confidence - 0.5) / width), bins - 1)
        members[index].append((confidence, _correct(p - 0.5)))
    out = []
    for index, items in enumerate(members):
        count = len(items)
        confidence = sum(c for c, _ in items) / count if count else float("nan")
        accuracy = sum(a for _, a in items) / count if count else float("nan")
        out.append(Bin(0.5 + index * width, 0.5 + (index + 1) * width, count, confidence, accuracy))
    return out


def expected_calibration_error(probabilities: Sequence[float], bins: int = 10) -> float:
    total = len(probabilities)
    if not total:
        return float("nan")
    return sum(
        b.count / total * abs(b.accuracy - b.confidence) for b in reliability_bins(probabilities, bins) if b.count
    )


def pearson(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Pearson correlation; nan when either side is constant or there are fewer than two points."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    syy = sum((y - mean_y) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return float("nan")
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def length_buckets(
    chosen: Sequence[float],
    rejected: Sequence[float],
    chosen_lengths: Sequence[int],
    rejected_lengths: Sequence[int],
    edges: Sequence[int] = LENGTH_EDGES,
) -> list[dict]:
    """Accuracy per bucket of length difference (chosen - rejected): bucket i holds edges[i-1] <= d < edges[i]."""
    bounds = [-math.inf, *edges, math.inf]
    out = []
    for low, high in zip(bounds, bounds[1:]):
        inside = [i for i, (lc, lr) in enumerate(zip(chosen_lengths, rejected_lengths)) if low <= lc - lr < high]
        label = _bucket_label(low, high)
        accuracy = pairwise_accuracy([chosen[i] for i in inside], [rejected[i] for i in inside])
        out.append({"bucket": label, "low": low, "high": high, "pairs": len(inside), "accuracy": accuracy})
    return out


def _bucket_label(low: float, high: float) -> str:
    if low == -math.inf:
        return f"< {high:g}"
    if high == math.inf:
        return f">= {low:g}"
    return f"[{low:g}, {high:g})"


def pair_metrics(
    chosen: Sequence[float],
    rejected: Sequence[float],
    chosen_lengths: Sequence[int],
    rejected_lengths: Sequence[int],
    tie: Sequence[bool] | None = None,
    bins: int = 10,
) -> dict:
    """Every metric of one evaluation. Tie rows have no winner: they count apart (their mean score gap)."""
    tie = list(tie) if tie is not None else [False] * len(chosen)
    decided = [i for i, is_tie in enumerate(tie) if not is_tie]
    ties = [i for i, is_tie in enumerate(tie) if is_tie]
    c = [chosen[i] for i in decided]
    r = [rejected[i] for i in decided]
    lc = [chosen_lengths[i] for i in decided]
    lr = [rejected_lengths[i] for i in decided]
    probabilities = [sigmoid(a - b) for a, b in zip(c, r)]
    unequal = [i for i in range(len(c)) if lc[i] != lr[i]]
    metrics = {
        "pairs": len(c),
        "accuracy": pairwise_accuracy(c, r),
        "mean_margin": mean_margin(c, r),
        "ece": expected_calibration_error(probabilities, bins),
        "mean_confidence": sum(max(p, 1 - p) for p in probabilities) / len(c) if c else float("nan"),
        # How often the longer reply is the chosen one (the data's own bias), and scored higher (the model's).
        "longer_is_chosen": _share(lc[i] > lr[i] for i in unequal),
        "longer_scores_higher": _share((lc[i] > lr[i]) == (c[i] > r[i]) for i in unequal),
        "score_length_correlation": pearson(c + r, [float(x) for x in lc + lr]),
        "margin_length_correlation": pearson([a - b for a, b in zip(c, r)], [float(a - b) for a, b in zip(lc, lr)]),
        "length_buckets": length_buckets(c, r, lc, lr),
        "reliability": [b.__dict__ for b in reliability_bins(probabilities, bins)],
    }
    if ties:
        metrics["ties"] = len(ties)
        metrics["tie_mean_abs_gap"] = sum(abs(chosen[i] - rejected[i]) for i in ties) / len(ties)
    return metrics


def head_metrics(rows: Sequence[dict], scores, objectives: Sequence[str]) -> dict:
    """Each head of a multi-objective reward model against each kind of label. `scores`: reward.model.PairScores.

    Per attribute, on the pairs whose two replies both carry its rubric score and different ones: the accuracy of
    every head (the preference head and each attribute head) at ordering the two replies as the scores do, with
    its 95% Wilson interval; and the attribute head's mean absolute error on the 1-5 scale over every reply that
    carries the score. On the decided preference pairs: every attribute head's accuracy at the preference label.
    Returns {"heads": {...}} plus flat numbers a table prints: accuracy_A and pairs_A (the head of A on A's pairs),
    preference_accuracy_A (the preference head on them), mae_A."""
    heads = {PREFERENCE: (scores.chosen, scores.rejected), **scores.attributes}
    found: dict = {"attributes": {}, "preference_labels": {}}
    flat: dict = {}
    for attribute in objectives:
        pairs = scored_pairs(rows, attribute)
        truth = [read_scores(rows[i])[attribute] for i in pairs]
        signs = [1.0 if t["chosen"] > t["rejected"] else -1.0 for t in truth]
        accuracy = {}
        for name, (chosen, rejected) in heads.items():
            hits = [_correct(sign * (chosen[i] - rejected[i])) for sign, i in zip(signs, pairs)]
            accuracy[name] = _rate(hits)
        chosen, rejected = heads[attribute]
        errors = []
        for index, row in enumerate(rows):
            sides = read_scores(row).get(attribute, {})
            for side, predicted in (("chosen", chosen[index]), ("rejected", rejected[index])):
                if sides.get(side) is not None:
                    errors.append(abs(unscaled(predicted) - sides[side]))
        mae = sum(errors) / len(errors) if errors else float("nan")
        found["attributes"][attribute] = {"pairs": len(pairs), "replies": len(errors), "mae": mae, "accuracy": accuracy}
        flat |= {f"accuracy_{attribute}": accuracy[attribute]["value"], f"pairs_{attribute}": len(pairs)}
        flat |= {f"preference_accuracy_{attribute}": accuracy[PREFERENCE]["value"], f"mae_{attribute}": mae}
    decided = [i for i, is_tie in enumerate(scores.tie) if not is_tie]
    for name, (chosen, rejected) in heads.items():
        found["preference_labels"][name] = _rate([_correct(chosen[i] - rejected[i]) for i in decided])
    return {"heads": found} | flat


def _rate(hits: list[float]) -> dict:
    """{"value", "low", "high", "n"}: a share of hits with its 95% Wilson interval (nan without any)."""
    if not hits:
        return {"value": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    low, high = wilson_interval(sum(hits), len(hits))
    return {"value": sum(hits) / len(hits), "low": low, "high": high, "n": len(hits)}


def heads_markdown(metrics: dict) -> str:
    """Every head's accuracy on each kind of label, as a Markdown table for a run's report."""
    heads = metrics["heads"]
    names = list(heads["preference_labels"])

    def cell(rate: dict, own: bool) -> str:
        if not rate["n"]:
            return "-"
        text = f"{rate['value']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}]"
        return f"**{text}**" if own else text

    lines = [
        "| labels | pairs | " + " | ".join(f"{name} head" for name in names) + " |",
        "| --- | --- |" + " --- |" * len(names),
    ]
    rates = heads["preference_labels"]
    cells = " | ".join(cell(rates[name], name == PREFERENCE) for name in names)
    lines.append(f"| preference (chosen over rejected) | {rates[PREFERENCE]['n']} | {cells} |")
    for attribute, entry in heads["attributes"].items():
        rates = entry["accuracy"]
        cells = " | ".join(cell(rates[name], name == attribute) for name in names)
        lines.append(f"| {attribute} scores differ | {entry['pairs']} | {cells} |")
    lines += [
        "",
        "Accuracy: the share of pairs a head orders as the labels do (95% Wilson interval); bold: each head on its "
        "own labels. Mean absolute error of each attribute head on the 1-5 scale: "
        + ", ".join(
            f"{attribute} {entry['mae']:.2f} on {entry['replies']} replies"
            for attribute, entry in heads["attributes"].items()
        )
        + ".",
    ]
    return "\n".join(lines)


def head_lines(metrics: dict) -> list[str]:
    """One line per attribute head (none without "heads"): its accuracy on the pairs whose scores for its attribute
    differ, and the preference head's on the same pairs, each with its interval and what it says against chance."""
    from align.stats import against_chance

    lines = []
    for attribute, entry in metrics.get("heads", {}).get("attributes", {}).items():
        if not entry["pairs"]:
            lines.append(
                f"{attribute} head: no pairs whose {attribute} scores differ ({entry['replies']} replies scored)"
            )
            continue
        own, preference = entry["accuracy"][attribute], entry["accuracy"][PREFERENCE]
        what = f"pairs whose {attribute} scores differ"
        lines.append(
            f"{attribute} head: accuracy {against_chance(own['value'], own['n'], what)} (the preference head on "
            f"them: {against_chance(preference['value'], preference['n'], 'pairs')}); mean absolute error "
            f"{entry['mae']:.2f} on the 1-5 scale over {entry['replies']} scored replies"
        )
    return lines


def _share(flags) -> float:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else float("nan")


def headline(metrics: dict) -> dict:
    """The scalar metrics (what a run records and a table prints), without the per-bucket lists."""
    return {key: value for key, value in metrics.items() if not isinstance(value, (list, dict))}


def plot_reliability(metrics: dict, path: Path, title: str = "reliability") -> Path | None:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration and the pair counts."""
    bins = [b for b in metrics["reliability"] if b["count"]]
    if not bins:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5, 4.5))
    width = bins[0]["high"] - bins[0]["low"]
    axis.bar(
        [b["low"] for b in bins],
        [b["accuracy"] for b in bins],
        width=width,
        align="edge",
        alpha=0.6,
        edgecolor="black",
        label="accuracy",
    )
    axis.plot(
        [b["confidence"] for b in bins],
        [b["accuracy"] for b in bins],
        "o",
        color="C1",
        label="bin: mean confidence, accuracy",
    )
    axis.plot([0.5, 1], [0.5, 1], "--", color="gray", label="perfect calibration")
    for b in bins:
        axis.annotate(str(b["count"]), (b["low"] + width / 2, b["accuracy"]), ha="center", va="bottom", fontsize=7)
    axis.set_xlim(0.5, 1)
    axis.set_ylim(0, 1.05)
    axis.set_xlabel("confidence max(p, 1 - p), p = sigmoid(r_chosen - r_rejected)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"{title} (ECE {metrics['ece']:.3f})")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_length_bias(metrics: dict, path: Path, title: str = "accuracy by length difference") -> Path | None:
    buckets = metrics["length_buckets"]
    if not any(b["pairs"] for b in buckets):
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 3.5))
    labels = [f"{b['bucket']}\n({b['pairs']})" for b in buckets]
    axis.bar(labels, [0 if math.isnan(b["accuracy"]) else b["accuracy"] for b in buckets], color="C0", alpha=0.7)
    axis.axhline(metrics["accuracy"], color="C1", linestyle="--", label=f"overall {metrics['accuracy']:.3f}")
    axis.axhline(0.5, color="gray", linestyle=":", label="chance")
    axis.set_ylim(0, 1)
    axis.set_xlabel("tokens(chosen) - tokens(rejected)  (pairs)")
    axis.set_ylabel("accuracy")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown(metrics: dict) -> str:
    """The length-bias table and the calibration bins as Markdown, for a run's report."""
    lines = ["| length difference (tokens) | pairs | accuracy |", "| --- | --- | --- |"]
    for b in metrics["length_buckets"]:
        accuracy = "-" if math.isnan(b["accuracy"]) else f"{b['accuracy']:.3f}"
        lines.append(f"| {b['bucket']} | {b['pairs']} | {accuracy} |")
    lines += [
        "",
        f"The longer reply is the chosen one in {_percent(metrics['longer_is_chosen'])} of the pairs (with unequal "
        f"lengths) and scores higher in {_percent(metrics['longer_scores_higher'])}; correlation between score and "
        f"reply length {metrics['score_length_correlation']:.3f}.",
        "",
        "| confidence | pairs | mean confidence | accuracy |",
        "| --- | --- | --- | --- |",
    ]
    for b in metrics["reliability"]:
        if b["count"]:
            lines.append(
                f"| {b['low']:.2f}-{b['high']:.2f} | {b['count']} | {b['confidence']:.3f} | {b['accuracy']:.3f} |"
            )
    return "\n".join(lines)


def _percent(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"
