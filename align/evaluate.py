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
same settings and seed (align/sampling.py).

With `--best-of N` (and --rm), one more row: the baseline's model samples N replies per prompt (at
--best-of-temperature) and the reward model keeps the one it scores highest. This is what plain reranking buys
without any training, the row every RLHF comparison needs beside DPO and PPO. The judge is the reranker, so the
row is an upper estimate by that judge: judge with another reward model for an unbiased one (run eval again with
--rm set to it, on this row's saved replies: they are in the registered candidates).

Metrics, each with a 95% interval from the percentile bootstrap over prompts (seeded, the resamples shared by
every row): mean reward by the reward model (--rm; a base model reference gives an untrained head, as in `align
rm`), which reads the prompt without the few-shot examples, so every row answers the same question; win rate and
length-controlled win rate against the baseline row (the first model, or --baseline); reply length in tokens of
the row's own tokenizer and in characters; KL to --kl-reference ("n/a" for a different vocabulary); and with
--references (the prompts carry reference answers) ROUGE, BLEU and METEOR (unavailable, with the reason, without
WordNet). When the reward model has attribute heads (`align rm --objectives`), each attribute gets its own numbers
per row: the head's mean predicted rubric score (1-5) and its win rate against the baseline row, with intervals
(the reward and the win rates above stay the preference head's). How each is computed: align/eval_metrics.py.

Outputs. A `candidates` version (--name, default eval-PROMPTS: every row's reply per prompt, sources = row
names, with lineage to the prompts, the models and the reward model), and the run: metrics.json, report.md with
PNG plots (reward distributions, win rates with intervals, reply lengths) under runs/ID/. Each batch of replies is
saved in runs/ID/generations/replies.jsonl as soon as it is made, and each row's generations as the row finishes,
so `--resume` samples only what a killed run had not, and reports what an uninterrupted run would.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

from align.errors import AlignError
from align.eval_metrics import (
    attribute_entries,
    choose_examples,
    example_pairs,
    few_shot_prompt,
    kl_terms,
    reference_metrics,
    same_vocabulary,
    win_rate_with_ci,
)
from align.eval_report import write_eval_report
from align.registry import Registry
from align.registry.registry import ARTIFACT_KINDS, check_name
from align.sampling import ReplyJournal, SamplingSettings, merged_for_inference, sample
from align.stats import mean_with_ci


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
    best_of: int = 0
    best_of_temperature: float = 0.8
    sampling: SamplingSettings = field(default_factory=SamplingSettings)


@dataclass
class Row:
    name: str  # as shown in the report and in the candidates' sources
    model: str  # the model reference that generates
    shots: int = 0
    best_of: int = 0  # N: sample N replies per prompt and keep the reward model's best


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
    if options.best_of:
        if options.best_of < 2 or rm is None:
            raise AlignError(f"--best-of N reranks N >= 2 samples with --rm (got N={options.best_of}, --rm {rm})")
        if options.best_of_temperature <= 0:
            raise AlignError(f"--best-of-temperature must be above 0 (got {options.best_of_temperature})")
        model = next(row["model"] for row in plan_rows if row["name"] == baseline)
        plan_rows.append(
            asdict(Row(name=f"{baseline} best-of-{options.best_of}", model=model, best_of=options.best_of))
        )
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
        "best_of_temperature": options.best_of_temperature,
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
    rewards, attributes = _rewards(registry, config, rows, prompts, generations) if config["rm"] else (None, {})
    if attributes:
        metrics["attributes"] = list(attributes)
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
        if attributes:  # each attribute head's mean score, and its win rate against the baseline row
            entry["attributes"] = attribute_entries(
                {name: values[index] for name, values in attributes.items()},
                None if index == base_index else {name: values[base_index] for name, values in attributes.items()},
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

    version = _register(registry, run, config, prompts_version, rows, prompts, generations, rewards, attributes)
    metrics["candidates"] = version.ref
    write_eval_report(run, config, metrics, rows, generations, rewards)
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
    """Each row's replies, token lengths and KL terms; saved per row, and the replies per batch as well, so a
    resumed run skips finished rows and, in the row it was in, the batches it had sampled."""
    from tqdm.auto import tqdm

    from align.models import load_model

    folder = run.dir / "generations"
    folder.mkdir(exist_ok=True)
    journal = ReplyJournal(folder / "replies.jsonl")
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
        n, row_settings = 1, settings
        if row.best_of:
            n, row_settings = row.best_of, replace(settings, temperature=config["best_of_temperature"])
        with tqdm(total=len(prompts), unit="prompt", desc=f"generating with {row.name}") as progress:
            options = sample(
                model,
                tokenizer,
                asked,
                n,
                row_settings,
                progress,
                done=journal.saved(row.name),
                on_batch=partial(journal.append, row.name),
            )
        made = {"name": row.name}
        if row.best_of:  # the reward model keeps each prompt's best sample
            made["samples"], made["sample_scores"] = options, _rerank(registry, config, prompts, options)
            options = [[o[max(range(n), key=scores.__getitem__)]] for o, scores in zip(options, made["sample_scores"])]
        replies = [r[0] for r in options]
        made |= {
            "replies": replies,
            "lengths": [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies],
        }
        if config["kl_reference"]:
            if reference is None:  # loaded once, for every row
                ref_model, ref_tokenizer = load_model(config["kl_reference"], registry, dtype=settings.dtype)
                reference = merged_for_inference(ref_model), ref_tokenizer
            ref_model, ref_tokenizer = reference
            if same_vocabulary(tokenizer, ref_tokenizer):
                made["kl"] = kl_terms(
                    model,
                    ref_model,
                    tokenizer,
                    asked,
                    replies,
                    batch_size=settings.batch_size,
                    progress=f"KL of {row.name}",
                )
            else:
                made["kl_error"] = f"n/a: {row.name} and {config['kl_reference']} have different vocabularies"
        _write_json(path, made)
        out.append(made)
        del model
    return out


def _rerank(registry, config, prompts, samples: list[list[str]]) -> list[list[float]]:
    """The reward model's score of every sample, per prompt."""
    flat = _judge(registry, config, [(p, o) for p, options in zip(prompts, samples) for o in options])
    n = len(samples[0])
    return [flat[i * n : (i + 1) * n] for i in range(len(samples))]


def _write_json(path: Path, value) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    os.replace(temporary, path)  # a killed run leaves a whole file or none


def _rewards(registry, config, rows, prompts, generations) -> tuple[list[list[float]], dict[str, list[list[float]]]]:
    """(the preference head's reward [row][prompt], each attribute head's score {attribute: [row][prompt]})."""
    pairs = [(p, reply) for made in generations for p, reply in zip(prompts, made["replies"])]
    heads = _judge_heads(registry, config, pairs)
    n = len(prompts)

    def by_row(flat: list[float]) -> list[list[float]]:
        return [flat[i * n : (i + 1) * n] for i in range(len(rows))]

    preference, *attributes = heads
    return by_row(heads[preference]), {name: by_row(heads[name]) for name in attributes}


def _judge(registry, config, pairs: list[tuple]) -> list[float]:
    """The reward model's (--rm) score of each (prompt, reply): its preference head's."""
    return next(iter(_judge_heads(registry, config, pairs).values()))


def _judge_heads(registry, config, pairs: list[tuple]) -> dict[str, list[float]]:
    """Every head's score of each (prompt, reply): {head: scores}, the preference head first."""
    from reward.model import RewardModel

    rm = RewardModel.load(config["rm"], registry, max_length=config["rm_max_length"], seed=config["sampling"]["seed"])
    return rm.score_heads([prompt for prompt, _ in pairs], [reply for _, reply in pairs], progress=True)


def _register(registry, run, config, prompts_version, rows, prompts, generations, rewards, attributes=None):
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
    if attributes:  # each attribute head's raw output, [prompt][row] as the rewards
        meta["attribute_rewards"] = {
            name: [[values[r][i] for r in range(len(rows))] for i in range(len(prompts))]
            for name, values in attributes.items()
        }
    return registry.register(out, name=config["name"], kind="candidates", parents=parents, run=run, meta=meta)
