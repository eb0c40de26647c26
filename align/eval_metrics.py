"""The numbers behind `align eval`, knowing nothing of the registry: win rates, reference metrics, few-shot
prompts, the log-probabilities of the KL estimate, and the report's table and plots.

Each metric gets a 95% interval from the percentile bootstrap over prompts (align/stats.py; seeded, the resamples
shared by every row, so rows are compared on the same prompts):
  - win rate against the baseline row: per prompt 1 when the row's reward is higher, 0.5 when equal, 0 when
    lower; the mean.
  - length-controlled win rate (a simplified AlpacaEval 2): a logistic regression of that outcome on the length
    difference, P(win) = sigmoid(a + b * tanh(d / s)) with d the row's reply length minus the baseline's, in
    characters, and s the standard deviation of d; reported at d = 0, sigmoid(a): the win rate the row would
    have at the baseline's length. The slope b has a unit Gaussian prior (an L2 penalty of 1), so when the
    lengths barely vary the fit stays near the raw win rate instead of extrapolating. (AlpacaEval's GLM also
    has a per-instruction difficulty term and is fit over many models at once; ours is per pair of rows.)
  - per attribute, when the reward model has attribute heads (align rm --objectives): the head's mean predicted
    rubric score, on the 1-5 scale, and its win rate against the baseline row, computed as the win rate above
    but from that head's scores.
  - KL to a reference model: the mean over prompts of sum_t [log p_row(y_t) - log p_ref(y_t)] over the tokens
    of the row's own reply (re-tokenized from its text, prompt as the row generated it): a one-sample estimate
    of KL(row || reference) per prompt. Needs the same vocabulary (`same_vocabulary`).
  - against reference answers: ROUGE-1/2/L/Lsum (mean F1), corpus BLEU and METEOR. These are computed with the
    packages the Hugging Face `evaluate` metrics wrap (rouge-score, sacrebleu, NLTK), called directly:
    `evaluate.load("rouge")` fetches its script from the hub, which is not reachable offline. METEOR needs
    WordNet, which is not on PyPI: NLTK's data where someone downloaded it, else Debian's wordnet-base (`make
    wordnet`); without either METEOR is unavailable (MetricUnavailable, reported with the reason) and the other
    metrics are unaffected.
"""

from __future__ import annotations

import functools
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from align.errors import AlignError
from align.reports import new_figure, save_figure
from align.stats import bootstrap_ci, logistic_regression, mean_with_ci

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
LC_SLOPE_PENALTY = 1.0  # the L2 penalty on the length slope of the length-controlled win rate


# Win rates: pure functions over the per-prompt numbers (the intervals: align/stats.py), hand-checked in
# tests/unit/test_eval_metrics.py


def win_outcomes(rewards: Sequence[float], baseline: Sequence[float]) -> np.ndarray:
    """Per prompt: 1 when the row's reward beats the baseline's, 0.5 when equal, 0 when lower."""
    a, b = np.asarray(rewards, dtype=float), np.asarray(baseline, dtype=float)
    return np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))


def length_controlled_win_rate(
    outcomes: Sequence[float], length_differences: Sequence[float], *, slope_penalty: float = LC_SLOPE_PENALTY
) -> float:
    """sigmoid(a) of the fit P(win) = sigmoid(a + b * tanh(d / std(d))): the win rate at equal length. The slope
    has a unit Gaussian prior (`slope_penalty`), so where the lengths tell little (every reply shorter, say) the
    fit does not extrapolate to d = 0 but stays near the raw win rate; with many prompts the prior is negligible."""
    y = np.asarray(outcomes, dtype=float)
    d = np.asarray(length_differences, dtype=float)
    if not len(y):
        return math.nan
    if np.all(y == y[0]):  # all wins (or all losses, or all ties): no regression needed, nor possible
        return float(y[0])
    spread = d.std()
    x = np.tanh(d / spread) if spread > 0 else np.zeros_like(d)
    # The weak penalty on the intercept keeps the fit finite when wins are perfectly separated by length.
    a, _ = logistic_regression(np.column_stack([np.ones_like(x), x]), y, l2=[1e-3, slope_penalty])
    return float(1 / (1 + math.exp(-a)))


def win_rate_with_ci(
    rewards: Sequence[float],
    baseline: Sequence[float],
    lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    *,
    rounds: int = 1000,
    seed: int = 0,
) -> dict:
    """{"win_rate": {value, low, high}, "lc_win_rate": {value, low, high}} against the baseline row."""
    y = win_outcomes(rewards, baseline)
    d = np.asarray(lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    win = mean_with_ci(y, rounds=rounds, seed=seed)
    low, high = bootstrap_ci(lambda idx: length_controlled_win_rate(y[idx], d[idx]), len(y), rounds=rounds, seed=seed)
    return {"win_rate": win, "lc_win_rate": {"value": length_controlled_win_rate(y, d), "low": low, "high": high}}


def attribute_entries(
    scores: dict[str, Sequence[float]],
    baseline: dict[str, Sequence[float]] | None,
    *,
    rounds: int = 1000,
    seed: int = 0,
) -> dict:
    """Per attribute head: {"score": the mean predicted rubric score (1-5) with its interval, "win_rate": the win
    rate against the baseline row's scores from the same head, with its interval (not for the baseline itself,
    `baseline` None)}. `scores`: attribute -> the head's raw output per prompt (reward/objectives.py's scale)."""
    from reward.objectives import unscaled

    out = {}
    for name, values in scores.items():
        entry = {"score": mean_with_ci([unscaled(v) for v in values], rounds=rounds, seed=seed)}
        if baseline is not None:
            entry["win_rate"] = mean_with_ci(win_outcomes(values, baseline[name]), rounds=rounds, seed=seed)
        out[name] = entry
    return out


# Reference-based metrics (the packages behind `evaluate`'s rouge, sacrebleu and meteor, called directly)


class MetricUnavailable(AlignError):
    """A metric whose package or data cannot be loaded here; the others still run."""


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, list[float]]:
    """Per-example F1 of ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum (lines are the summary-level units), as
    `evaluate`'s rouge computes them (rouge-score, no stemming)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise MetricUnavailable(f"ROUGE unavailable: the rouge-score package is missing ({exc})") from None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=False)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {key: [score[key].fmeasure for score in scores] for key in ROUGE_KEYS}


def corpus_bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's default 13a tokenizer, one reference per prediction."""
    try:
        import sacrebleu
    except ImportError as exc:
        raise MetricUnavailable(f"BLEU unavailable: the sacrebleu package is missing ({exc})") from None
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def _words(text: str) -> list[str]:
    import re

    return re.findall(r"\w+|[^\w\s]", text.lower())  # NLTK's word_tokenize needs 'punkt' data: not offline


# WordNet is not on PyPI. NLTK's own copy comes from `python -m nltk.downloader wordnet` (or a folder NLTK_DATA
# names); Debian's wordnet-base package ships the same WordNet 3.0 database (`make wordnet` installs it), read here
# with NLTK's reader. $WNSEARCHDIR, WordNet's own variable, names another folder holding that database.
DEBIAN_WORDNET = "/usr/share/wordnet"

# WordNet 3.0's lexicographer files, numbered from 00: the database's `lexnames` file (manual page lexnames(5WN)),
# which Debian's package leaves out and NLTK's reader needs to build a synset.
WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()


def load_wordnet():
    """A WordNet reader for METEOR, loaded now (NLTK's loads lazily, which would fail midway through the metric):
    NLTK's own data when it is installed, else the WordNet database folder ($WNSEARCHDIR or Debian's)."""
    try:
        import nltk
        from nltk.corpus import wordnet
    except ImportError as exc:
        raise MetricUnavailable(f"METEOR unavailable: the nltk package is missing ({exc})") from None
    try:  # looked up on every call: a reader loaded earlier does not hide data that is gone
        try:
            nltk.data.find("corpora/wordnet")
        except LookupError:
            nltk.data.find("corpora/wordnet.zip/wordnet/")
        wordnet.ensure_loaded()
        return wordnet
    except LookupError:
        pass
    folder = os.environ.get("WNSEARCHDIR") or DEBIAN_WORDNET
    if not Path(folder, "data.noun").is_file():
        raise MetricUnavailable(
            f"METEOR unavailable: WordNet is installed neither for NLTK nor in {folder}, and it is not on PyPI "
            "(`make wordnet` or `apt-get install wordnet-base` installs Debian's; `python -m nltk.downloader "
            "wordnet` NLTK's, where the network allows it); the other metrics are unaffected"
        )
    if folder not in nltk.data.path:
        nltk.data.path.append(folder)  # NLTK opens files only below its data paths
    return _folder_wordnet(folder)


@functools.cache
def _folder_wordnet(folder: str):
    """NLTK's WordNetCorpusReader on a bare WordNet 3.0 database folder (data.*, index.*, *.exc)."""
    import io
    import warnings

    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    categories = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
    lexnames = "".join(
        f"{number:02d}\t{name}\t{categories[name.partition('.')[0]]}\n" for number, name in enumerate(WORDNET_LEXNAMES)
    )

    class FolderWordNet(WordNetCorpusReader):
        def open(self, file):
            return io.StringIO(lexnames) if file == "lexnames" else super().open(file)

        def map_wn(self, version="wordnet"):
            return None  # the folder holds WordNet 3.0, the version NLTK's "wordnet" is: nothing to map

    with warnings.catch_warnings():  # METEOR reads English lemmas only: no Open Multilingual WordNet needed
        warnings.filterwarnings("ignore", message="The multilingual functions are not available")
        return FolderWordNet(folder, None)


def meteor_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """Per-example METEOR (NLTK's, with WordNet synonyms)."""
    wordnet = load_wordnet()
    from nltk.translate.meteor_score import meteor_score

    return [
        float(meteor_score([_words(reference)], _words(prediction), wordnet=wordnet))
        for prediction, reference in zip(predictions, references)
    ]


def reference_metrics(
    predictions: Sequence[str], references: Sequence[str], *, rounds: int = 1000, seed: int = 0
) -> dict:
    """ROUGE, BLEU and METEOR with intervals; a metric that cannot load gives {"error": why} instead."""
    out: dict = {}
    try:
        for key, values in rouge_scores(predictions, references).items():
            out[key] = mean_with_ci(values, rounds=rounds, seed=seed)
    except MetricUnavailable as exc:
        out["rouge"] = {"error": str(exc)}
    try:
        preds, refs = list(predictions), list(references)
        low, high = bootstrap_ci(
            lambda idx: corpus_bleu([preds[i] for i in idx], [refs[i] for i in idx]),
            len(preds),
            rounds=rounds,
            seed=seed,
        )
        out["bleu"] = {"value": corpus_bleu(preds, refs), "low": low, "high": high}
    except MetricUnavailable as exc:
        out["bleu"] = {"error": str(exc)}
    try:
        out["meteor"] = mean_with_ci(meteor_scores(predictions, references), rounds=rounds, seed=seed)
    except MetricUnavailable as exc:
        out["meteor"] = {"error": str(exc)}
    return out


# Few-shot prompts


def example_pairs(kind: str, rows: list[dict]) -> list[tuple[str, str]]:
    """(question, answer) pairs: an sft row's first user turn and the reply after it; a prompts row's last user
    turn and its reference answer."""
    if kind not in ("sft", "prompts"):
        raise AlignError(f"few-shot examples come from an sft or prompts dataset, not '{kind}' rows")
    pairs = []
    for row in rows:
        if kind == "sft":
            messages = row["messages"]
            for first, second in zip(messages, messages[1:]):
                if first["role"] == "user" and second["role"] == "assistant":
                    pairs.append((first["content"], second["content"]))
                    break
        elif row.get("reference"):
            pairs.append((row["prompt"][-1]["content"], row["reference"]))
    return pairs


def few_shot_prompt(prompt: list[dict], examples: Sequence[tuple[str, str]]) -> list[dict]:
    """The prompt with the worked examples as earlier turns, after any leading system message."""
    start = 0
    while start < len(prompt) and prompt[start]["role"] == "system":
        start += 1
    turns = []
    for question, answer in examples:
        turns += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return prompt[:start] + turns + prompt[start:]


def choose_examples(
    pool: list[tuple[str, str]], prompts: list[list[dict]], k: int, *, seed: int, own: bool
) -> list[list[tuple[str, str]]]:
    """K examples per prompt from a seeded shuffle of the pool. `own`: the pool is the eval prompts' own
    references (pool[i] belongs to prompt i), so a prompt never gets its own answer; otherwise the same K for
    every prompt, skipping any example whose question is the prompt's."""
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    chosen = []
    for index, prompt in enumerate(prompts):
        question = prompt[-1]["content"]
        picked = [pool[i] for i in order if (not own or i != index) and pool[i][0] != question][:k]
        if len(picked) < k:
            raise AlignError(f"--few-shot {k} needs {k} examples besides the prompt itself; only {len(picked)} found")
        chosen.append(picked)
    return chosen


# Log-probabilities for the KL estimate


def reply_logprobs(
    model,
    tokenizer,
    prompts: list[list[dict]],
    replies: list[str],
    *,
    batch_size: int = 8,
    reference=None,
    progress: str | None = None,
) -> tuple[list[float], list[float] | None]:
    """Summed log-probabilities of each reply's tokens after its prompt, under `model` (and `reference`, on the
    same token ids). Replies are re-tokenized from their text; the prompt is the chat template's."""
    import torch
    from tqdm.auto import tqdm

    sequences = []
    for prompt, reply in zip(prompts, replies):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        sequences.append((prompt_ids, reply_ids))
    order = sorted(range(len(sequences)), key=lambda i: -sum(map(len, sequences[i])))
    totals = {"model": [0.0] * len(sequences), "reference": [0.0] * len(sequences)}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc=progress or "log-probs", unit="batch", disable=progress is None):
        width = max(len(sequences[i][0]) + len(sequences[i][1]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        scored = torch.zeros((len(batch), width), dtype=torch.bool)  # positions holding reply tokens
        for row, index in enumerate(batch):
            prompt_ids, reply_ids = sequences[index]
            full = prompt_ids + reply_ids
            ids[row, : len(full)] = torch.tensor(full)
            attention[row, : len(full)] = 1
            scored[row, len(prompt_ids) : len(full)] = True
        for name, scorer in (("model", model), ("reference", reference)):
            if scorer is None:
                continue
            device = next(scorer.parameters()).device
            with torch.inference_mode():
                logits = scorer(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float().cpu()
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
            sums = (logp * scored[:, 1:]).sum(dim=1)
            for row, index in enumerate(batch):
                totals[name][index] = float(sums[row])
    return totals["model"], totals["reference"] if reference is not None else None


def kl_terms(
    model, reference, tokenizer, prompts: list[list[dict]], replies: list[str], *, batch_size: int = 8, progress=None
) -> list[float]:
    """Per prompt, sum_t [log p_model(y_t) - log p_reference(y_t)] over the reply's tokens: the one-sample KL
    estimate. The reference reads the same token ids, so it must share the vocabulary (`same_vocabulary`)."""
    mine, theirs = reply_logprobs(
        model, tokenizer, prompts, replies, batch_size=batch_size, reference=reference, progress=progress
    )
    return [a - b for a, b in zip(mine, theirs)]


def same_vocabulary(tokenizer, other) -> bool:
    return tokenizer.get_vocab() == other.get_vocab()


# The report's pieces: a metric with its interval, the results table, the plots (align/reports.py draws them)


def format_interval(entry: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    """A metric's "value [low, high]"; "-" when absent or not finite, "unavailable" for {"error": why}."""
    if not entry:
        return "-"
    if "error" in entry:
        return "unavailable"
    value, low, high = (entry[key] * scale for key in ("value", "low", "high"))
    if not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def results_table(
    metrics: dict, names: Sequence[str], baseline: str, *, kl_reference: str | None, references: bool
) -> str:
    """The report's Markdown table: one line per row, each metric with its interval."""
    header = ["row", "mean reward", f"win rate vs {baseline}", "LC win rate", "tokens", "chars"]
    if kl_reference:
        header.append(f"KL to {kl_reference}")
    if references:
        header += ["ROUGE-L", "BLEU", "METEOR"]
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in names:
        entry = metrics["rows"][name]
        cells = [
            f"`{name}`" + (" (baseline)" if name == baseline else ""),
            format_interval(entry.get("reward")),
            format_interval(entry.get("win_rate")),
            format_interval(entry.get("lc_win_rate")),
            f"{entry['length_tokens']['value']:.1f}",
            f"{entry['length_chars']['value']:.0f}",
        ]
        if kl_reference:
            kl = entry["kl"]
            cells.append(kl["error"] if "error" in kl else format_interval(kl))
        if references:
            found = entry["references"]
            cells += [
                format_interval(found.get("rougeL")),
                format_interval(found.get("bleu"), 2),
                format_interval(found.get("meteor")),
            ]
        table.append("| " + " | ".join(cells) + " |")
    return "\n".join(table)


def attributes_table(metrics: dict, names: Sequence[str], baseline: str) -> str:
    """The report's Markdown table of the attribute heads: per row, each attribute's mean score (1-5) and win rate
    against the baseline, with intervals and the verdict of the win rate's interval."""
    from align.stats import verdict

    attributes = metrics["attributes"]
    header = ["row"]
    for name in attributes:
        header += [f"{name} score (1-5)", f"{name} win rate vs {baseline}"]
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in names:
        found = metrics["rows"][row]["attributes"]
        cells = [f"`{row}`" + (" (baseline)" if row == baseline else "")]
        for name in attributes:
            win = found[name].get("win_rate")
            verdict_text = f": {verdict(win['low'], win['high'])}" if win else ""
            cells += [format_interval(found[name]["score"], 2), format_interval(win) + verdict_text]
        table.append("| " + " | ".join(cells) + " |")
    return "\n".join(table)


def eval_plots(
    folder: Path,
    names: Sequence[str],
    lengths: list[list[float]],
    rewards: list[list[float]] | None,
    metrics: dict,
    baseline: str,
) -> list[Path]:
    """The report's plots in `folder`: reply lengths, and with rewards their distributions and the win rates."""
    plots = [plot_boxes(folder / "lengths.png", names, lengths, xlabel="reply length (tokens)", title="reply lengths")]
    if rewards is not None:
        plots += [
            plot_boxes(
                folder / "rewards.png",
                names,
                rewards,
                xlabel="reward",
                title="reward distributions (box: quartiles, triangle: mean)",
            ),
            plot_win_rates(folder / "win_rates.png", names, metrics, baseline),
        ]
        if metrics.get("attributes"):
            plots.append(plot_attribute_win_rates(folder / "attribute_win_rates.png", names, metrics, baseline))
    return plots


def _labels(names: Sequence[str]) -> list[str]:
    return [name if len(name) <= 32 else "..." + name[-29:] for name in names]


def plot_boxes(path: Path, names: Sequence[str], values: list[list[float]], *, xlabel: str, title: str) -> Path:
    """One horizontal box plot per row (box: quartiles, triangle: mean), the rows top to bottom."""
    figure, axis = new_figure(figsize=(7, 0.6 * len(names) + 1.8))
    axis.boxplot(values, showmeans=True, orientation="horizontal")
    axis.set_yticks(range(1, len(names) + 1), _labels(names))
    axis.invert_yaxis()
    axis.set_xlabel(xlabel)
    axis.set_title(title)
    axis.grid(alpha=0.3, axis="x")
    return save_figure(figure, path)


def plot_win_rates(path: Path, names: Sequence[str], metrics: dict, baseline: str) -> Path:
    """Each row's win rate and length-controlled win rate against the baseline, with their intervals."""
    others = [name for name in names if name != baseline]
    figure, axis = new_figure(figsize=(7, 0.8 * len(others) + 2.0))
    for offset, key, label in ((-0.15, "win_rate", "win rate"), (0.15, "lc_win_rate", "length-controlled")):
        values = [metrics["rows"][name][key] for name in others]
        ys = [i + offset for i in range(len(others))]
        xs = [v["value"] for v in values]
        errors = [[v["value"] - v["low"] for v in values], [v["high"] - v["value"] for v in values]]
        axis.errorbar(xs, ys, xerr=errors, fmt="o", capsize=4, label=label)
    axis.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    axis.set_yticks(range(len(others)), _labels(others))
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel(f"win rate against {baseline} (95% bootstrap interval)")
    axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    axis.grid(alpha=0.3, axis="x")
    return save_figure(figure, path)


def plot_attribute_win_rates(path: Path, names: Sequence[str], metrics: dict, baseline: str) -> Path:
    """Each row's win rate against the baseline by each attribute head, with their intervals."""
    others = [name for name in names if name != baseline]
    attributes = metrics["attributes"]
    figure, axis = new_figure(figsize=(7, 0.4 * len(others) * len(attributes) + 2.0))
    step = 0.6 / max(len(attributes), 1)
    for number, attribute in enumerate(attributes):
        offset = -0.3 + step * (number + 0.5)
        values = [metrics["rows"][name]["attributes"][attribute]["win_rate"] for name in others]
        xs = [v["value"] for v in values]
        errors = [[v["value"] - v["low"] for v in values], [v["high"] - v["value"] for v in values]]
        axis.errorbar(xs, [i + offset for i in range(len(others))], xerr=errors, fmt="o", capsize=4, label=attribute)
    axis.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    axis.set_yticks(range(len(others)), _labels(others))
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel(f"win rate against {baseline} by each attribute head (95% bootstrap interval)")
    axis.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=min(len(attributes), 4), frameon=False)
    axis.grid(alpha=0.3, axis="x")
    return save_figure(figure, path)
