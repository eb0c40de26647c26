"""Candidate generation: every model writes N completions per prompt, for people to compare.

    align generate --models adapter:sft,smollm2-135m --prompts seed-prompts --n 2 --name seed-cands
    align generate --resume        # continue the last interrupted generate run; the replies it saved are kept

Sampling is batched with the KV cache, prompts sorted by length so a batch pads little (align/sampling.py).
Under `--seed` the output is the same every time. Each batch's replies go to runs/ID/replies.jsonl as soon as
they are made, so `--resume` samples only what a killed run had not, and registers what an uninterrupted run
would. The result is a `candidates` version whose rows name the source of each completion and the sampling
settings, with lineage to the prompts and the models.
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields

from align.errors import AlignError
from align.models import load_model, resolve_model
from align.registry import Registry
from align.registry.registry import ARTIFACT_KINDS
from align.runs import failures_recorded, find_resumable
from align.sampling import ReplyJournal, SamplingSettings, merged_for_inference, sample

SETTINGS_KEYS = tuple(f.name for f in fields(SamplingSettings))


def generate_candidates(
    registry: Registry,
    models: list[str],
    prompts_ref: str,
    *,
    n: int,
    name: str,
    limit: int | None = None,
    settings: SamplingSettings | None = None,
):
    """Generate, then register a `candidates` version. Returns it."""
    job = plan(registry, models, prompts_ref, n=n, name=name, limit=limit, settings=settings)
    run = registry.start_run("generate", config=job, inputs=[job["prompts"], *job["models"]], seed=job["seed"])
    return _generate(registry, run, job)


def resume_generation(registry: Registry, run_id: str | bool = True):
    """Continue the last interrupted (or failed) generate run, or `run_id`, with the settings it started with:
    the replies it saved are kept, the rest are sampled. Returns the registered `candidates` version."""
    found = find_resumable(registry, "generate", None if run_id is True else run_id)
    if "name" not in found.config:
        raise AlignError(f"run {found.id} was started by a version of align that could not resume it: start anew")
    run = registry.resume_run(found.id)
    print(f"resuming {run.id}: the replies it saved are kept")
    return _generate(registry, run, run.config)


def plan(
    registry: Registry,
    models: list[str],
    prompts_ref: str,
    *,
    n: int,
    name: str,
    limit: int | None,
    settings: SamplingSettings | None,
) -> dict:
    """Check everything before any model loads; returns the run's config (references pinned to their version)."""
    settings = (settings or SamplingSettings()).resolved()
    if not models:
        raise AlignError("give at least one model: --models REF1[,REF2,...]")
    if n < 1:
        raise AlignError(f"--n must be at least 1 (got {n})")
    if n * len(models) < 2:
        raise AlignError("candidates need at least two completions per prompt: raise --n or add a model to --models")
    if len(set(models)) != len(models):
        raise AlignError(f"a model is listed twice in --models: {', '.join(models)}")
    if limit is not None and limit < 1:
        raise AlignError(f"--limit must be at least 1 (got {limit})")
    prompts_version = registry.resolve(prompts_ref, kind="prompts")
    for ref in models:
        resolve_model(ref, registry)  # fail before any generation
    # Pin registry artifacts to their version, so each completion names exactly the model that wrote it.
    models = [registry.resolve_artifact(ref).ref if ref.split(":", 1)[0] in ARTIFACT_KINDS else ref for ref in models]
    return {"models": models, "prompts": prompts_version.ref, "n": n, "limit": limit, "name": name, **asdict(settings)}


def _generate(registry: Registry, run, job: dict):
    from tqdm.auto import tqdm

    models, n = job["models"], job["n"]
    settings = SamplingSettings(**{key: job[key] for key in SETTINGS_KEYS})
    prompts_version = registry.resolve(job["prompts"], kind="prompts")
    prompts = [row["prompt"] for row in registry.rows(prompts_version)][: job["limit"]]
    with failures_recorded(registry, run):
        journal = ReplyJournal(run.dir / "replies.jsonl")
        with tqdm(total=len(prompts) * len(models), unit="prompt", desc="generating") as progress:
            per_model = [_replies(registry, ref, prompts, n, settings, journal, progress) for ref in models]
        generation = json.dumps({"n": n, **asdict(settings)}, sort_keys=True)
        rows = []
        for index, prompt in enumerate(prompts):
            completions, sources = [], []
            for ref, replies in zip(models, per_model):
                for reply in replies[index]:
                    completions.append([{"role": "assistant", "content": reply}])
                    sources.append(ref)
            rows.append({"prompt": prompt, "completions": completions, "sources": sources, "generation": generation})
        parents = [(prompts_version, "prompts")]
        for ref in models:
            parents.append((ref if ":" in ref else f"base:{ref}", "model"))
        version = registry.register(
            rows,
            name=job["name"],
            kind="candidates",
            parents=parents,
            run=run,
            meta={"models": models, "n": n, **asdict(settings)},
        )
        registry.finish_run(
            run,
            outputs=[version.ref],
            metrics={"prompts": len(prompts), "completions": len(prompts) * n * len(models)},
        )
        return version


def _replies(registry: Registry, ref: str, prompts, n: int, settings, journal: ReplyJournal, progress):
    """`ref`'s replies to every prompt: those the journal holds, the rest sampled and saved batch by batch."""
    done = journal.saved(ref)
    if all(index in done for index in range(len(prompts))):  # a resumed run, past this model
        progress.update(len(prompts))
        return [done[index] for index in range(len(prompts))]
    progress.set_description(f"generating with {ref}")
    model, tokenizer = load_model(ref, registry, dtype=settings.dtype)
    model = merged_for_inference(model)
    return sample(
        model, tokenizer, prompts, n, settings, progress, done=done, on_batch=lambda made: journal.append(ref, made)
    )
