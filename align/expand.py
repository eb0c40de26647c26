"""`align expand`: grow `sft` data with a model, by Self-Instruct or Evol-Instruct (align/expansion.py).

    align expand --from seed-tasks --method self-instruct --n 200 --model adapter:sft --name expanded
    align expand --from seed-tasks --method evol --operators deepen,constrain --n 100 --model adapter:sft --name evolved
    align expand --resume        # continue the last interrupted expand run; the replies it saved are kept

Then people review what the model made (`align review --data expanded`, ui/review_app.py) and
`align data from-review expanded --name expanded-clean` keeps what they accepted or edited (align/review.py).

The pool starts as the user turns of the `--from` version: the rows without an origin are the human seeds, those
with one (an expanded and reviewed version, say) the machine tasks. Each round's prompts are sampled batch by batch
with the KV cache (align/sampling.py); every batch of replies goes to runs/ID/replies.jsonl as soon as it is made,
so `--resume` replays what a killed run saved (the same rounds, filters and pool), samples only the rest, and
registers what an uninterrupted run would. The model is loaded only when something is left to sample.

The result is an `sft` version of the rows kept (at most --n), each with its origin (method, parent or neighbours,
filter scores), with lineage to the seeds, the model and the run; the run's report.md and metrics count what each
filter dropped. The embedded 135M model writes weak tasks, and many are dropped: a larger `--model` writes better
ones, and the review is there for what gets through.
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, fields, replace

from align.errors import AlignError
from align.expansion import FILTERS, ExpandSettings, Task, expand, origin_of
from align.models import load_model, resolve_model
from align.registry import Registry
from align.registry.registry import ARTIFACT_KINDS
from align.reports import write_metrics, write_report
from align.runs import failures_recorded, find_resumable
from align.sampling import ReplyJournal, SamplingSettings, batch_seed, merged_for_inference, sample

SAMPLING_KEYS = tuple(f.name for f in fields(SamplingSettings))
EXPAND_KEYS = tuple(f.name for f in fields(ExpandSettings))


def expand_data(
    registry: Registry,
    source: str,
    *,
    name: str,
    model: str,
    settings: ExpandSettings,
    sampling: SamplingSettings | None = None,
):
    """Expand, then register an `sft` version. Returns (version, run)."""
    job = plan(registry, source, name=name, model=model, settings=settings, sampling=sampling)
    run = registry.start_run("expand", config=job, inputs=[job["from"], job["model"]], seed=job["seed"])
    return _expand(registry, run, job), registry.get_run(run.id)


def resume_expansion(registry: Registry, run_id: str | bool = True):
    """Continue the last interrupted (or failed) expand run, or `run_id`, with the settings it started with.
    Returns (version, run)."""
    found = find_resumable(registry, "expand", None if run_id is True else run_id)
    run = registry.resume_run(found.id)
    print(f"resuming {run.id}: the replies it saved are kept")
    return _expand(registry, run, run.config), registry.get_run(run.id)


def plan(
    registry: Registry,
    source: str,
    *,
    name: str,
    model: str,
    settings: ExpandSettings,
    sampling: SamplingSettings | None,
) -> dict:
    """Check everything before any model loads; returns the run's config (references pinned to their version)."""
    from align.registry import check_name

    check_name(name)
    sampling = (sampling or SamplingSettings()).resolved()
    version = registry.resolve(source)
    if version.kind != "sft":
        raise AlignError(
            f"--from {version.ref} holds '{version.kind}' rows, but align expand grows 'sft' data (instructions "
            "and answers): import seed tasks with `align data import FILE --name NAME --kind sft`"
        )
    resolve_model(model, registry)  # fail before any generation
    if model.split(":", 1)[0] in ARTIFACT_KINDS:
        model = registry.resolve_artifact(model).ref  # pinned: the rows name exactly the model that wrote them
    expansion = asdict(replace(settings, seed=sampling.seed))
    expansion["operators"] = list(expansion["operators"])
    return {"from": version.ref, "model": model, "name": name, **expansion, **asdict(sampling)}


def seed_tasks(rows: list[dict]) -> list[Task]:
    """The pool a version starts: each distinct first user turn, a human seed unless its row has an origin."""
    tasks, seen = [], set()
    for row in rows:
        user = next((m["content"] for m in row["messages"] if m["role"] == "user"), None)
        if user is None or not user.strip() or user in seen:
            continue
        seen.add(user)
        origin = origin_of(row)
        tasks.append(Task(user, origin["method"] if origin else "seed", origin.get("depth", 1) if origin else 0))
    return tasks


def _expand(registry: Registry, run, job: dict):
    from tqdm.auto import tqdm

    settings = ExpandSettings(**{key: job[key] for key in EXPAND_KEYS})
    sampling = SamplingSettings(**{key: job[key] for key in SAMPLING_KEYS})
    source = registry.resolve(job["from"], kind="sft")
    seeds = seed_tasks(registry.rows(source))
    with failures_recorded(registry, run):
        journal = ReplyJournal(run.dir / "replies.jsonl")
        sampler = JournalSampler(registry, job["model"], sampling, journal)
        with tqdm(total=settings.n, unit="row", desc=f"{settings.method} with {job['model']}") as progress:
            found = expand(seeds, settings, sampler, progress)
        counts = {key: found.counts[key] for key in ("candidates", *FILTERS, "kept")}
        metrics = {**counts, "rounds": found.rounds, "seeds": len(seeds)}
        if not found.rows:
            raise AlignError(
                f"no task was kept after {found.rounds} rounds ({_counts_text(counts)}): a larger --model writes "
                "better tasks (the embedded 135M model writes weak ones); more --max-rounds, or looser filters "
                "(--min-words, --rouge-threshold), keep more"
            )
        meta = {"method": settings.method, "from": source.ref, "model": job["model"], "counts": counts}
        meta["rounds"] = found.rounds
        if found.by_operator:
            meta["by_operator"] = found.by_operator
        model_node = job["model"] if ":" in job["model"] else f"base:{job['model']}"
        version = registry.register(
            found.rows,
            name=job["name"],
            kind="sft",
            parents=[(source, "seeds"), (model_node, "model")],
            run=run,
            meta=meta,
        )
        _report(run, job, settings, found, counts, version)
        write_metrics(run, metrics)
        registry.finish_run(run, outputs=[version.ref], metrics=metrics)
        return version


class JournalSampler:
    """The sampler `expand` calls: replies a killed run saved come from the journal; the rest are sampled (the
    model loaded on first need), each batch saved as soon as it is made. Each journal key samples on a seed of its
    own, from the run's seed and the key."""

    def __init__(self, registry: Registry, model_ref: str, settings: SamplingSettings, journal: ReplyJournal):
        self.registry, self.model_ref, self.settings, self.journal = registry, model_ref, settings, journal
        self._loaded = None

    def __call__(self, key: str, number: int, prompts: list[str]) -> list[str]:
        done = self.journal.saved(key)
        if not all(index in done for index in range(len(prompts))):
            model, tokenizer = self._model()
            settings = replace(self.settings, seed=batch_seed(self.settings.seed, zlib.crc32(key.encode())))
            chats = [[{"role": "user", "content": prompt}] for prompt in prompts]
            on_batch = lambda made: self.journal.append(key, made)  # noqa: E731
            replies = sample(model, tokenizer, chats, 1, settings, done=done, on_batch=on_batch)
            done = dict(enumerate(replies))
        return [done[index][0] for index in range(len(prompts))]

    def _model(self):
        if self._loaded is None:
            model, tokenizer = load_model(self.model_ref, self.registry, dtype=self.settings.dtype)
            self._loaded = merged_for_inference(model), tokenizer
        return self._loaded


def _counts_text(counts: dict) -> str:
    dropped = ", ".join(f"{counts[key]} {key.replace('_', ' ')}" for key in FILTERS if counts.get(key))
    return f"{counts['candidates']} candidates, {counts['kept']} kept" + (f"; dropped: {dropped}" if dropped else "")


def _report(run, job: dict, settings: ExpandSettings, found, counts: dict, version) -> None:
    table = ["| filter | dropped |", "| --- | --- |"] + [f"| {key} | {counts[key]} |" for key in FILTERS]
    sections = [
        ("Setup", f"`{settings.method}` with `{job['model']}` from `{job['from']}`, seed {job['seed']}, "
                  f"{found.rounds} rounds of {settings.round_size} prompts. Output `{version.ref}`."),
        ("Filters", "\n".join(table)),
    ]  # fmt: skip
    if found.by_operator:
        operators = ["| operator | kept | dropped |", "| --- | --- | --- |"]
        for operator, tally in found.by_operator.items():
            dropped = ", ".join(f"{count} {key}" for key, count in tally.items() if key != "kept") or "-"
            operators.append(f"| {operator} | {tally.get('kept', 0)} | {dropped} |")
        sections.append(("Operators", "\n".join(operators)))
    summary = {"rows kept": counts["kept"], "asked for": settings.n, "candidates": counts["candidates"]}
    write_report(run, "Expansion report", summary=summary, sections=sections)


def print_summary(version, run) -> None:
    metrics = run.metrics
    print(f"{version.ref}  {version.num_rows} rows  kind=sft  ({version.meta['method']} from {version.meta['from']})")
    print(f"{metrics['rounds']} rounds: {_counts_text(metrics)}")
    for operator, tally in version.meta.get("by_operator", {}).items():
        dropped = ", ".join(f"{count} {key}" for key, count in tally.items() if key != "kept") or "none dropped"
        print(f"  {operator:11} {tally.get('kept', 0)} kept; {dropped}")
    print(f"report {run.dir / 'report.md'}; review with `align review --data {version.ref}`")
