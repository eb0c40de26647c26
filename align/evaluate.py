"""`align eval`: every model answers the same held-out prompts, and the answers are judged with intervals.

    align eval --models smollm2-135m,adapter:sft,adapter:dpo --prompts seed-prompts-test --rm rm:rm
    align eval --models smollm2-135m,adapter:sft --prompts qa-test --references --few-shot 3 \
        --kl-reference smollm2-135m --baseline smollm2-135m
    align eval --resume                   # continue the last interrupted eval run; finished models are kept

Rows. One per model of --models, in order, plus, with `--few-shot K`, a baseline row: the base model (the base of
the first adapter in --models, or --few-shot-model) prompted with K worked examples, because few-shot prompting
is what to try before fine-tuning. The examples are (question, answer) pairs from --few-shot-from (an sft
dataset, or prompts with references), the same K for every prompt; without it, the eval prompts' own reference
answers, K from the other prompts (never the prompt's own). Every row samples one reply per prompt with the
same settings and seed (align/generate.py).

Metrics, each with a 95% interval from the percentile bootstrap over prompts (seeded: the same run gives the same
intervals; the resamples are shared by every row, so rows are compared on the same prompts):
  - mean reward, by the reward model (--rm; a base model reference gives an untrained head, as in `align rm`).
    It reads the prompt without the few-shot examples: every row answers the same question.
  - win rate against the baseline row (the first model, or --baseline): per prompt 1 when the row's reward is
    higher, 0.5 when equal, 0 when lower; the mean.
  - length-controlled win rate (a simplified AlpacaEval 2): a logistic regression of that outcome on the length
    difference, P(win) = sigmoid(a + b * tanh(d / s)) with d the row's reply length minus the baseline's, in
    characters, and s the standard deviation of d; reported at d = 0, sigmoid(a): the win rate the row would
    have at the baseline's length. The slope b has a unit Gaussian prior (an L2 penalty of 1), so when the
    lengths barely vary the fit stays near the raw win rate instead of extrapolating. (AlpacaEval's GLM also
    has a per-instruction difficulty term and is fit over many models at once; ours is per pair of rows.)
  - response length, in tokens of the row's own tokenizer and in characters.
  - KL to a reference model (--kl-reference): the mean over prompts of sum_t [log p_row(y_t) - log p_ref(y_t)]
    over the tokens of the row's own reply (re-tokenized from its text, prompt as the row generated it): a
    one-sample estimate of KL(row || reference) per prompt. Needs the same vocabulary; else "n/a".
  - with --references (the prompts carry reference answers): ROUGE-1/2/L/Lsum (mean F1), corpus BLEU and
    METEOR. These are computed with the packages the Hugging Face `evaluate` metrics wrap (rouge-score,
    sacrebleu, NLTK), called directly: `evaluate.load("rouge")` fetches its script from the hub, which is not
    reachable offline. METEOR needs WordNet, which is not on PyPI: NLTK's data where someone downloaded it,
    else Debian's wordnet-base (`make wordnet`); without either METEOR is reported as unavailable, with the
    reason, and the other metrics are unaffected.

Outputs. A `candidates` version (--name, default eval-PROMPTS: every row's reply per prompt, sources = row
names, with lineage to the prompts, the models and the reward model), and the run: metrics.json, report.md with
PNG plots (reward distributions, win rates with intervals, reply lengths) under runs/ID/. Each row's generations
are saved in runs/ID/generations/ as it finishes, so `--resume` regenerates only what a killed run had not.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from align.errors import AlignError
from align.generate import SamplingSettings
from align.registry import Registry
from align.registry.registry import ARTIFACT_KINDS, check_name
from align.reports import new_figure, save_figure, write_metrics, write_report
from align.stats import bootstrap_ci, logistic_regression, mean_with_ci, verdict

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


def same_vocabulary(tokenizer, other) -> bool:
    return tokenizer.get_vocab() == other.get_vocab()


# The stage


@dataclass
class EvalOptions:
    models: list[str]
    prompts: str
    rm: str | None = None
    references: bool = False
    baseline: str | None = None
    kl_reference: str | None = None
    few_shot: int = 0
    few_shot_from: str | None = None
    few_shot_model: str | None = None
    limit: int | None = None
    name: str | None = None
    bootstrap: int = 1000
    rm_max_length: int | None = None
    sampling: SamplingSettings = field(default_factory=SamplingSettings)


@dataclass
class Row:
    name: str  # as shown in the report and in the candidates' sources
    model: str  # the model reference that generates
    shots: int = 0


@dataclass
class EvalResult:
    run: object
    version: object
    metrics: dict


def _pin(registry: Registry, ref: str) -> str:
    """Registry artifacts pinned to their version, so the report names exactly the model that answered."""
    return registry.resolve_artifact(ref).ref if ref.split(":", 1)[0] in ARTIFACT_KINDS else ref


def _lineage(ref: str) -> str:
    return ref if ref.split(":", 1)[0] in ARTIFACT_KINDS else f"base:{ref}"


def plan(registry: Registry, options: EvalOptions) -> dict:
    """Check everything before any model loads; returns the run's config (refs pinned, the rows decided)."""
    from align.models import resolve_model

    models = [m.strip() for m in options.models if m and m.strip()]
    if not models:
        raise AlignError("give the models to evaluate: --models REF_A,REF_B")
    if len(set(models)) != len(models):
        raise AlignError(f"a model is listed twice in --models: {','.join(models)}")
    if options.few_shot < 0:
        raise AlignError(f"--few-shot must be 0 or more (got {options.few_shot})")
    if options.limit is not None and options.limit < 1:
        raise AlignError(f"--limit must be at least 1 (got {options.limit})")
    if options.bootstrap < 1:
        raise AlignError(f"--bootstrap must be at least 1 round (got {options.bootstrap})")
    if options.few_shot == 0 and (options.few_shot_from or options.few_shot_model):
        raise AlignError("--few-shot-from and --few-shot-model need --few-shot K (the number of examples)")
    prompts = registry.resolve(options.prompts, kind="prompts")
    rows = registry.rows(prompts)[: options.limit]
    if options.references and not any(row.get("reference") for row in rows):
        raise AlignError(
            f"--references: the prompts of {prompts.ref} carry no reference answers (a 'reference' field); drop "
            "--references, or import prompts with references"
        )
    for ref in models:
        resolve_model(ref, registry)  # fail now, not after an hour of generation
    models = [_pin(registry, ref) for ref in models]
    plan_rows = [asdict(Row(name=ref, model=ref)) for ref in models]
    few_shot = None
    if options.few_shot:
        base = options.few_shot_model
        if base is None:
            adapters = [registry.resolve_artifact(m) for m in models if m.startswith("adapter:")]
            base = adapters[0].base_model if adapters else models[0]
        resolve_model(base, registry)
        base = _pin(registry, base)
        source = registry.resolve(options.few_shot_from, kind=("sft", "prompts")) if options.few_shot_from else None
        if source is None and not all(row.get("reference") for row in rows):
            raise AlignError(
                f"--few-shot {options.few_shot} takes its examples from the prompts' reference answers, but "
                f"{prompts.ref} lacks some: give --few-shot-from an sft dataset (or prompts with references)"
            )
        name = f"{base} ({options.few_shot}-shot)"
        plan_rows.append(asdict(Row(name=name, model=base, shots=options.few_shot)))
        few_shot = {"k": options.few_shot, "model": base, "from": source.ref if source else f"{prompts.ref} (own)"}
    if len(plan_rows) < 2:
        raise AlignError(
            "eval compares at least two rows: give two or more --models (or one and a --few-shot K baseline)"
        )
    baseline = options.baseline or plan_rows[0]["name"]
    names = [row["name"] for row in plan_rows]
    if baseline not in names:
        pinned = _pin(registry, baseline) if baseline.split(":", 1)[0] in ARTIFACT_KINDS else baseline
        if pinned not in names:
            raise AlignError(f"--baseline {baseline!r} is none of the rows: {', '.join(names)}")
        baseline = pinned
    rm = options.rm
    if rm is not None:
        if rm.startswith("adapter:"):
            raise AlignError(f"--rm {rm} is a policy adapter: give a reward model (rm:NAME) or a base model")
        resolve_model(rm, registry)
        rm = _pin(registry, rm)
    kl_reference = None
    if options.kl_reference:
        if options.kl_reference.startswith("rm:"):
            raise AlignError(f"--kl-reference {options.kl_reference} is a reward model: give a policy (a model)")
        resolve_model(options.kl_reference, registry)
        kl_reference = _pin(registry, options.kl_reference)
    name = check_name(options.name or f"eval-{prompts.name}")
    return {
        "rows": plan_rows,
        "prompts": prompts.ref,
        "limit": options.limit,
        "rm": rm,
        "rm_max_length": options.rm_max_length,
        "references": options.references,
        "baseline": baseline,
        "kl_reference": kl_reference,
        "few_shot": few_shot,
        "name": name,
        "bootstrap": options.bootstrap,
        "sampling": asdict(options.sampling.resolved()),
    }


def run_eval(registry: Registry, options: EvalOptions | None = None, *, resume: str | bool | None = None) -> EvalResult:
    """Plan, generate (or take what a resumed run saved), judge, report, register."""
    from align.runs import find_resumable

    if resume:
        run = find_resumable(registry, "eval", None if resume is True else resume)
        config = run.config
        run = registry.resume_run(run.id)
        print(f"resuming {run.id}: rows already generated are kept")
    else:
        if options is None:
            raise AlignError("give the models and prompts to evaluate (or --resume)")
        config = plan(registry, options)
        inputs = [config["prompts"], *(row["model"] for row in config["rows"])]
        inputs += [ref for ref in (config["rm"], config["kl_reference"]) if ref]
        run = registry.start_run("eval", config=config, inputs=inputs, seed=config["sampling"]["seed"])
    try:
        result = _evaluate(registry, run, config)
    except BaseException as exc:
        registry.finish_run(run, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    return result


def _evaluate(registry: Registry, run, config: dict) -> EvalResult:
    prompts_version = registry.resolve(config["prompts"], kind="prompts")
    source_rows = registry.rows(prompts_version)[: config["limit"]]
    prompts = [row["prompt"] for row in source_rows]
    references = [row.get("reference") for row in source_rows]
    rows = [Row(**row) for row in config["rows"]]
    settings = SamplingSettings(**config["sampling"])
    rounds, seed = config["bootstrap"], settings.seed
    print(f"run {run.id}: {len(rows)} rows on {len(prompts)} prompts of {prompts_version.ref}")

    shots = _few_shot_examples(registry, config, prompts, references, settings.seed)
    generations = _generate_all(registry, run, config, rows, prompts, shots, settings)

    metrics: dict = {
        "prompts": len(prompts),
        "dataset": prompts_version.ref,
        "baseline": config["baseline"],
        "rm": config["rm"],
        "kl_reference": config["kl_reference"],
        "few_shot": config["few_shot"],
        "bootstrap": {"rounds": rounds, "seed": seed, "confidence": 0.95},
        "rows": {},
    }
    rewards = _rewards(registry, config, rows, prompts, generations) if config["rm"] else None
    base_index = [row.name for row in rows].index(config["baseline"])
    for index, row in enumerate(rows):
        made = generations[index]
        entry: dict = {
            "model": row.model,
            "shots": row.shots,
            "length_tokens": mean_with_ci(made["lengths"], rounds=rounds, seed=seed),
            "length_chars": mean_with_ci([len(r) for r in made["replies"]], rounds=rounds, seed=seed),
        }
        if rewards is not None:
            entry["reward"] = mean_with_ci(rewards[index], rounds=rounds, seed=seed)
            if index != base_index:
                entry |= win_rate_with_ci(
                    rewards[index],
                    rewards[base_index],
                    [len(r) for r in made["replies"]],
                    [len(r) for r in generations[base_index]["replies"]],
                    rounds=rounds,
                    seed=seed,
                )
        if config["kl_reference"]:
            kl = made.get("kl")
            entry["kl"] = mean_with_ci(kl, rounds=rounds, seed=seed) if kl is not None else {"error": made["kl_error"]}
        if config["references"]:
            pairs = [(reply, ref) for reply, ref in zip(made["replies"], references) if ref]
            entry["references"] = reference_metrics(
                [p for p, _ in pairs], [r for _, r in pairs], rounds=rounds, seed=seed
            )
        metrics["rows"][row.name] = entry
    if config["references"]:
        metrics["reference_answers"] = sum(1 for ref in references if ref)

    version = _register(registry, run, config, prompts_version, rows, prompts, generations, rewards)
    metrics["candidates"] = version.ref
    _report(run, config, metrics, rows, generations, rewards)
    registry.finish_run(run, metrics=metrics, outputs=[version.ref])
    return EvalResult(run=registry.get_run(run.id), version=version, metrics=metrics)


def _few_shot_examples(registry, config, prompts, references, seed) -> list[list[tuple[str, str]]] | None:
    few_shot = config["few_shot"]
    if not few_shot:
        return None
    if few_shot["from"].endswith(" (own)"):
        pool = [(prompt[-1]["content"], reference) for prompt, reference in zip(prompts, references)]
        return choose_examples(pool, prompts, few_shot["k"], seed=seed, own=True)
    source = registry.resolve(few_shot["from"])
    pool = example_pairs(source.kind, registry.rows(source))
    return choose_examples(pool, prompts, few_shot["k"], seed=seed, own=False)


def _generate_all(registry, run, config, rows, prompts, shots, settings) -> list[dict]:
    """Each row's replies, token lengths and KL terms; saved per row, so a resumed run skips finished rows."""
    from tqdm.auto import tqdm

    from align.generate import merged_for_inference, sample
    from align.models import load_model

    folder = run.dir / "generations"
    folder.mkdir(exist_ok=True)
    reference = None
    out = []
    for index, row in enumerate(rows):
        path = folder / f"{index:02d}.json"
        if path.is_file():
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved["name"] == row.name and len(saved["replies"]) == len(prompts):
                out.append(saved)
                continue
        asked = [few_shot_prompt(p, shots[i]) for i, p in enumerate(prompts)] if row.shots else prompts
        model, tokenizer = load_model(row.model, registry, dtype=settings.dtype)
        model = merged_for_inference(model)
        with tqdm(total=len(prompts), unit="prompt", desc=f"generating with {row.name}") as progress:
            replies = [r[0] for r in sample(model, tokenizer, asked, 1, settings, progress)]
        made = {
            "name": row.name,
            "replies": replies,
            "lengths": [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies],
        }
        if config["kl_reference"]:
            if reference is None:  # loaded once, for every row
                ref_model, ref_tokenizer = load_model(config["kl_reference"], registry, dtype=settings.dtype)
                reference = merged_for_inference(ref_model), ref_tokenizer
            ref_model, ref_tokenizer = reference
            if same_vocabulary(tokenizer, ref_tokenizer):
                mine, theirs = reply_logprobs(
                    model,
                    tokenizer,
                    asked,
                    replies,
                    batch_size=settings.batch_size,
                    reference=ref_model,
                    progress=f"KL of {row.name}",
                )
                made["kl"] = [a - b for a, b in zip(mine, theirs)]
            else:
                made["kl_error"] = f"n/a: {row.name} and {config['kl_reference']} have different vocabularies"
        _write_json(path, made)
        out.append(made)
        del model
    return out


def _write_json(path: Path, value) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    os.replace(temporary, path)  # a killed run leaves a whole file or none


def _rewards(registry, config, rows, prompts, generations) -> list[list[float]]:
    from reward.model import RewardModel

    rm = RewardModel.load(config["rm"], registry, max_length=config["rm_max_length"], seed=config["sampling"]["seed"])
    flat_prompts = [prompt for _ in rows for prompt in prompts]
    flat_replies = [reply for made in generations for reply in made["replies"]]
    scores = rm.score(flat_prompts, flat_replies, progress=True)
    n = len(prompts)
    return [scores[i * n : (i + 1) * n] for i in range(len(rows))]


def _register(registry, run, config, prompts_version, rows, prompts, generations, rewards):
    generation = json.dumps({"n": 1, **config["sampling"]}, sort_keys=True)
    out = []
    for index, prompt in enumerate(prompts):
        out.append(
            {
                "prompt": prompt,
                "completions": [[{"role": "assistant", "content": made["replies"][index]}] for made in generations],
                "sources": [row.name for row in rows],
                "generation": generation,
            }
        )
    parents = [(prompts_version, "prompts")]
    parents += [(_lineage(ref), "model") for ref in dict.fromkeys(row.model for row in rows)]
    if config["rm"]:
        parents.append((_lineage(config["rm"]), "reward-model"))
    meta = {"eval_run": run.id, "rows": [row.name for row in rows], "few_shot": config["few_shot"]}
    if rewards is not None:
        meta["rewards"] = [[rewards[r][i] for r in range(len(rows))] for i in range(len(prompts))]
        meta["rm"] = config["rm"]
    return registry.register(out, name=config["name"], kind="candidates", parents=parents, run=run, meta=meta)


# The report


def _interval(entry: dict | None, digits: int = 3, scale: float = 1.0) -> str:
    if not entry:
        return "-"
    if "error" in entry:
        return "unavailable"
    value, low, high = (entry[key] * scale for key in ("value", "low", "high"))
    if not math.isfinite(value):
        return "-"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _report(run, config, metrics, rows, generations, rewards) -> None:
    baseline = config["baseline"]
    header = ["row", "mean reward", f"win rate vs {baseline}", "LC win rate", "tokens", "chars"]
    if config["kl_reference"]:
        header.append(f"KL to {config['kl_reference']}")
    if config["references"]:
        header += ["ROUGE-L", "BLEU", "METEOR"]
    table = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        entry = metrics["rows"][row.name]
        cells = [
            f"`{row.name}`" + (" (baseline)" if row.name == baseline else ""),
            _interval(entry.get("reward")),
            _interval(entry.get("win_rate")),
            _interval(entry.get("lc_win_rate")),
            f"{entry['length_tokens']['value']:.1f}",
            f"{entry['length_chars']['value']:.0f}",
        ]
        if config["kl_reference"]:
            kl = entry["kl"]
            cells.append(kl["error"] if "error" in kl else _interval(kl))
        if config["references"]:
            found = entry["references"]
            cells += [_interval(found.get("rougeL")), _interval(found.get("bleu"), 2), _interval(found.get("meteor"))]
        table.append("| " + " | ".join(cells) + " |")

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
    sampling = config["sampling"]
    setup = (
        f"`{metrics['dataset']}`: {metrics['prompts']} prompts. Each row samples one reply per prompt "
        f"(max_new_tokens {sampling['max_new_tokens']}, temperature {sampling['temperature']}, top_p "
        f"{sampling['top_p']}, seed {sampling['seed']}, weights in {sampling.get('dtype') or 'fp32'}). Reward model: "
        f"{'`' + config['rm'] + '`' if config['rm'] else 'none'}. Generations: `{metrics['candidates']}`."
    )
    if config["few_shot"]:
        few = config["few_shot"]
        setup += f" Few-shot baseline: `{few['model']}` with {few['k']} examples from `{few['from']}`."
    lengths = [made["lengths"] for made in generations]
    plots = [_plot_boxes(run.dir / "lengths.png", rows, lengths, xlabel="reply length (tokens)", title="reply lengths")]
    if rewards is not None:
        plots += [
            _plot_boxes(
                run.dir / "rewards.png",
                rows,
                rewards,
                xlabel="reward",
                title="reward distributions (box: quartiles, triangle: mean)",
            ),
            _plot_win_rates(run.dir / "win_rates.png", rows, metrics, baseline),
        ]
    write_metrics(run, metrics)
    summary = {"prompts": metrics["prompts"], "rows": len(rows), "baseline": baseline}
    for row in rows:
        entry = metrics["rows"][row.name]
        if "win_rate" in entry:
            summary[f"win rate of {row.name}"] = entry["win_rate"]["value"]
    write_report(
        run,
        "Evaluation",
        summary=summary,
        sections=[("Setup", setup), ("Results", "\n".join(table)), ("Method", method)]
        + ([("Notes", "\n".join(f"- {note}" for note in notes))] if notes else []),
        plots=plots,
    )


def _labels(rows: list[Row]) -> list[str]:
    return [row.name if len(row.name) <= 32 else "..." + row.name[-29:] for row in rows]


def _plot_boxes(path: Path, rows, values: list[list[float]], *, xlabel: str, title: str) -> Path:
    """One horizontal box plot per row (box: quartiles, triangle: mean), the rows top to bottom."""
    figure, axis = new_figure(figsize=(7, 0.6 * len(rows) + 1.8))
    axis.boxplot(values, showmeans=True, orientation="horizontal")
    axis.set_yticks(range(1, len(rows) + 1), _labels(rows))
    axis.invert_yaxis()
    axis.set_xlabel(xlabel)
    axis.set_title(title)
    axis.grid(alpha=0.3, axis="x")
    return save_figure(figure, path)


def _plot_win_rates(path: Path, rows, metrics, baseline) -> Path:
    others = [row for row in rows if row.name != baseline]
    figure, axis = new_figure(figsize=(7, 0.8 * len(others) + 2.0))
    for offset, key, label in ((-0.15, "win_rate", "win rate"), (0.15, "lc_win_rate", "length-controlled")):
        values = [metrics["rows"][row.name][key] for row in others]
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


def print_summary(result: EvalResult) -> None:
    """One line per row: mean reward, the win rate against the baseline with its 95% interval and what that
    interval says (better, worse or no detectable difference), the length-controlled win rate, length, KL."""
    print(f"{result.version.ref}  {result.version.num_rows} rows  kind=candidates")
    baseline = result.metrics.get("baseline")
    for name, entry in result.metrics["rows"].items():
        parts = [f"reward {_interval(entry['reward'])}"] if "reward" in entry else []
        if "win_rate" in entry:
            win, lc = entry["win_rate"], entry["lc_win_rate"]
            parts.append(
                f"win rate vs {baseline} {_interval(win)}: {verdict(win['low'], win['high'])} "
                f"(length-controlled {_interval(lc)}: {verdict(lc['low'], lc['high'])})"
            )
        parts.append(f"{entry['length_tokens']['value']:.1f} tokens")
        if "kl" in entry and "value" in entry["kl"]:
            parts.append(f"KL {entry['kl']['value']:.3f}")
        print(f"  {name}: " + ", ".join(parts))
    print(f"report: {result.run.dir / 'report.md'}")
