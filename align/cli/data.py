"""`align data`, `align runs`, `align models`, `align annotators`: the registry's datasets, runs, models and people."""

from __future__ import annotations

import json
import sys
import textwrap

from align.cli.common import open_registry, print_table
from align.cli.expand import add_from_review
from align.errors import AlignError

KIND_CHOICES = ("sft", "prompts", "candidates", "preference", "feedback")
FORMAT_CHOICES = ("auto", "trl", "alpaca", "self-instruct", "sharegpt", "hh")


def add_data(commands, common) -> None:
    data = commands.add_parser("data", help="import, inspect, split and export registry datasets")
    data_commands = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = data_commands.add_parser(
        "import",
        parents=[common],
        help="import a file as a new dataset version",
        description="Import JSONL/JSON/Parquet/CSV or a saved HF dataset folder. Every row is "
        "validated; nothing is registered unless all rows are valid.",
    )
    p.add_argument("path", help="file or saved-dataset folder")
    p.add_argument("--name", required=True, help="dataset name")
    p.add_argument("--kind", choices=KIND_CHOICES, help="kind to store (default: what the format holds)")
    p.add_argument("--format", dest="fmt", choices=FORMAT_CHOICES, default="auto", help="input format (default: auto)")
    p.add_argument("--max-rows", type=int, metavar="N", help="refuse a file of more rows (default: 5000000)")
    p.add_argument("--max-row-bytes", metavar="SIZE", help="refuse a longer line or record (default: 10MB)")
    p.add_argument("--max-bytes", metavar="SIZE", help="refuse more data, counted decompressed (default: 2GB)")
    p.set_defaults(handler=cmd_data_import)

    p = data_commands.add_parser("list", parents=[common], help="list every dataset version")
    p.set_defaults(handler=cmd_data_list)

    p = data_commands.add_parser("show", parents=[common], help="schema, row count, lineage and sample rows")
    p.add_argument("ref", metavar="NAME[@V]")
    p.add_argument("--samples", type=int, default=3, help="sample rows to print (default: 3)")
    p.set_defaults(handler=cmd_data_show)

    p = data_commands.add_parser("export", parents=[common], help="write a version to .jsonl or .parquet")
    p.add_argument("ref", metavar="NAME[@V]")
    p.add_argument("--to", required=True, metavar="FILE", help="FILE.jsonl or FILE.parquet")
    p.set_defaults(handler=cmd_data_export)

    p = data_commands.add_parser("split", parents=[common], help="seeded train/test split into two new versions")
    p.add_argument("ref", metavar="NAME[@V]")
    p.add_argument("--test-size", type=float, default=0.1, help="fraction (0-1) or row count (default: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-name", help="default: NAME-train")
    p.add_argument("--test-name", help="default: NAME-test")
    p.set_defaults(handler=cmd_data_split)

    p = data_commands.add_parser(
        "prompts-from",
        parents=[common],
        help="build a prompts version from sft, preference or candidates data",
    )
    p.add_argument("ref", metavar="NAME[@V]")
    p.add_argument("--name", required=True, help="name of the prompts dataset")
    p.set_defaults(handler=cmd_data_prompts_from)

    p = data_commands.add_parser(
        "from-labels",
        parents=[common],
        help="aggregate the votes on a candidates version into a preference (or feedback) version",
        description="Pairwise votes by majority; rankings expand into every pair. Each pair gets a margin and a "
        "weight from how strongly the annotators agreed. --kind feedback makes KTO's unpaired rows instead: thumbs "
        "up / down, and both-bad votes (every reply shown undesirable). Rubric scores are averaged per reply and "
        "attribute into the version's meta. Lineage: the candidates and a snapshot of the votes.",
    )
    p.add_argument("ref", metavar="CANDS[@V]")
    p.add_argument("--name", required=True, help="name of the preference dataset")
    p.add_argument(
        "--ties", choices=("drop", "keep"), default="drop", help="keep tied pairs with tie=true (default: drop)"
    )
    p.add_argument("--min-votes", type=int, default=1, help="pairs with fewer votes are left out (default: 1)")
    p.add_argument(
        "--kind",
        choices=("preference", "feedback"),
        default="preference",
        help="preference: pairs (default); feedback: single replies labelled desirable or not, for `align kto`",
    )
    p.add_argument(
        "--include-pairwise",
        action="store_true",
        help="with --kind feedback: pairwise votes too (the chosen reply desirable, the other undesirable)",
    )
    p.set_defaults(handler=cmd_data_from_labels)

    add_from_review(data_commands, common)


def add_runs(commands, common) -> None:
    runs = commands.add_parser("runs", help="list and inspect training and generation runs")
    run_commands = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    p = run_commands.add_parser("list", parents=[common], help="every run with its status")
    p.set_defaults(handler=cmd_runs_list)
    p = run_commands.add_parser("show", parents=[common], help="config, inputs, outputs and metrics of a run")
    p.add_argument("run_id", metavar="ID")
    p.set_defaults(handler=cmd_runs_show)


def add_models(commands, common) -> None:
    models = commands.add_parser("models", help="the embedded model and registered model artifacts")
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = model_commands.add_parser("list", parents=[common], help="the embedded alias and registered artifacts")
    p.set_defaults(handler=cmd_models_list)
    p = model_commands.add_parser(
        "prepare",
        parents=[common],
        help="resolve a model reference (converts the embedded model on first use)",
    )
    p.add_argument("ref", nargs="?", default="smollm2-135m", metavar="REF", help="default: smollm2-135m")
    p.set_defaults(handler=cmd_models_prepare)


def add_annotators(commands, common) -> None:
    annotators = commands.add_parser("annotators", help="the people who label (names, salted password hashes)")
    annotator_commands = annotators.add_subparsers(dest="annotators_command", metavar="ACTION", required=True)
    p = annotator_commands.add_parser(
        "add",
        parents=[common],
        help="add an annotator (asks for a password)",
        description="Adds an annotator; the password is asked for twice and stored salted and hashed (scrypt).",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--admin", action="store_true", help="may see the Quality tab of the ranking app")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin (for scripts)")
    p.set_defaults(handler=cmd_annotators_add)
    p = annotator_commands.add_parser("list", parents=[common], help="every annotator, with their vote count")
    p.set_defaults(handler=cmd_annotators_list)


# Handlers


def cmd_data_import(args) -> int:
    from align.registry.importers import Limits

    limits = Limits.parse(rows=args.max_rows, row_bytes=args.max_row_bytes, total_bytes=args.max_bytes)
    registry = open_registry(args)
    version, result = registry.import_file(args.path, name=args.name, kind=args.kind, fmt=args.fmt, limits=limits)
    print(f"{version.ref}  {version.num_rows} rows  kind={version.kind}  (format {result.format})")
    for line in result.summary():
        print(line)
    return 0


def cmd_data_list(args) -> int:
    registry = open_registry(args)
    versions = registry.list_datasets()
    if not versions:
        print(f"no datasets in {registry.root} yet: `align data import FILE --name NAME` adds one")
        return 0
    rows = [("DATASET", "KIND", "ROWS", "CREATED", "FROM")]
    for version in versions:
        parents = ", ".join(_node_label(parent) for _, parent in registry.parents(version)) or "-"
        rows.append((version.ref, version.kind, str(version.num_rows), version.created_at, parents))
    print_table(rows)
    return 0


def cmd_data_show(args) -> int:
    import pyarrow.parquet as pq

    registry = open_registry(args)
    version = registry.resolve(args.ref)
    print(f"{version.ref}  kind={version.kind}  rows={version.num_rows}")
    print(f"created {version.created_at}  content {version.content_hash[:16]}  file {version.path}")
    if version.meta:
        print("meta: " + json.dumps(version.meta, ensure_ascii=False))
    print("\nschema:")
    for column in pq.read_schema(version.path):
        print(f"  {column.name}: {column.type}")
    print("\nlineage:")
    _print_lineage(registry, version, depth=0)
    children = registry.children(version)
    if children:
        print("used by: " + ", ".join(f"{_node_label(child)} ({role})" for role, child in children))
    print(f"\nsample rows ({min(args.samples, version.num_rows)} of {version.num_rows}):")
    for row in registry.rows(version)[: args.samples]:
        print(textwrap.indent(_shorten_row(row), "  "))
    return 0


def cmd_data_export(args) -> int:
    registry = open_registry(args)
    version = registry.resolve(args.ref)
    target = registry.export(version, args.to)
    print(f"wrote {version.num_rows} rows of {version.ref} to {target}")
    return 0


def cmd_data_split(args) -> int:
    registry = open_registry(args)
    train, test = registry.split(
        args.ref,
        test_size=args.test_size,
        seed=args.seed,
        train_name=args.train_name,
        test_name=args.test_name,
    )
    print(f"{train.ref}  {train.num_rows} rows  kind={train.kind}")
    print(f"{test.ref}  {test.num_rows} rows  kind={test.kind}")
    return 0


def cmd_data_prompts_from(args) -> int:
    registry = open_registry(args)
    version = registry.convert(args.ref, name=args.name, kind="prompts")
    print(f"{version.ref}  {version.num_rows} rows  kind=prompts  (from {registry.resolve(args.ref).ref})")
    return 0


def cmd_data_from_labels(args) -> int:
    from align.labels import from_labels

    version, result, numbers = from_labels(
        open_registry(args),
        args.ref,
        name=args.name,
        ties=args.ties,
        min_votes=args.min_votes,
        kind=args.kind,
        include_pairwise=args.include_pairwise,
    )
    alpha = numbers["krippendorff_alpha"]
    raw = numbers["pairwise_agreement"]
    people = f"{numbers['votes']} votes by {numbers['annotators']} annotator{'' if numbers['annotators'] == 1 else 's'}"
    print(f"{version.ref}  {version.num_rows} rows  kind={version.kind}  (from {version.meta['candidates']})")
    if version.kind == "feedback":
        sources = ", ".join(f"{count} {source}" for source, count in sorted(result.sources.items()))
        print(
            f"{people}; labels on {result.completions} replies ({sources}): {result.desirable} desirable, "
            f"{result.undesirable} undesirable, {result.split} split evenly (dropped), {result.too_few} below "
            "--min-votes"
        )
    else:
        print(
            f"{people} on {result.pairs} pairs: "
            f"{result.kept} kept, {result.ties_kept} ties kept, {result.ties_dropped} ties dropped, "
            f"{result.both_bad} both bad, {result.too_few} below --min-votes"
        )
    for attribute, summary in version.meta.get("rubric", {}).get("attributes", {}).items():
        within = summary["within_one"]
        print(
            f"rubric {attribute}: {summary['scores']} scores on {summary['completions']} replies, mean "
            f"{summary['mean']:.2f}, annotators within one point: " + ("-" if within is None else f"{within:.0%}")
        )
    scored = sum("scores" in row for row in result.rows) if version.kind == "preference" else 0
    if scored:
        print(f"{scored} of {len(result.rows)} pairs carry rubric scores (what `align rm --objectives` trains on)")
    print(
        "agreement: Krippendorff's alpha "
        + ("-" if alpha is None else f"{alpha:.3f}")
        + ", raw "
        + ("-" if raw is None else f"{raw:.0%}")
    )
    return 0


def cmd_runs_list(args) -> int:
    registry = open_registry(args)
    runs = registry.list_runs()
    if not runs:
        print(f"no runs in {registry.root} yet")
        return 0
    rows = [("RUN", "STAGE", "STATUS", "STARTED", "OUTPUTS")]
    rows += [(run.id, run.stage, run.shown_status, run.created_at, ", ".join(run.outputs) or "-") for run in runs]
    print_table(rows)
    return 0


def cmd_runs_show(args) -> int:
    registry = open_registry(args)
    run = registry.get_run(args.run_id)
    print(f"{run.id}  stage={run.stage}  status={run.shown_status}  seed={run.seed}")
    print(f"started {run.created_at}  finished {run.finished_at or '-'}  folder {run.dir}")
    if run.error:
        print(f"error: {run.error}")
    print("inputs: " + (", ".join(run.inputs) or "-"))
    print("outputs: " + (", ".join(run.outputs) or "-"))
    print("config:\n" + textwrap.indent(json.dumps(run.config, indent=2, ensure_ascii=False), "  "))
    if run.metrics:
        print("metrics:\n" + textwrap.indent(json.dumps(run.metrics, indent=2), "  "))
    print("libraries: " + ", ".join(f"{name} {version}" for name, version in run.library_versions.items()))
    return 0


def cmd_models_list(args) -> int:
    from align.models import EMBEDDED_ALIAS, embedded_status

    print(f"{EMBEDDED_ALIAS}  embedded SmolLM2-135M-Instruct  ({embedded_status()})")
    registry = open_registry(args)
    for artifact in registry.list_artifacts():
        print(f"{artifact.ref}  base={artifact.base_model}  {artifact.path}")
    return 0


def cmd_models_prepare(args) -> int:
    from align.models import resolve_model

    resolved = resolve_model(args.ref, registry=open_registry(args) if ":" in args.ref else None)
    print(resolved.describe())
    return 0


def cmd_annotators_add(args) -> int:
    import getpass

    from align.labels import add_annotator

    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise AlignError("the two passwords differ: nothing was added")
    add_annotator(open_registry(args), args.name, password, admin=args.admin)
    print(f"added annotator {args.name}" + (" (admin)" if args.admin else ""))
    return 0


def cmd_annotators_list(args) -> int:
    from align.labels import list_annotators

    registry = open_registry(args)
    found = list_annotators(registry)
    if not found:
        print(f"no annotators in {registry.root} yet: `align annotators add NAME` adds one")
        return 0
    rows = [("ANNOTATOR", "ADMIN", "VOTES", "ADDED")]
    rows += [(a["name"], "yes" if a["admin"] else "-", str(a["votes"]), a["created_at"]) for a in found]
    print_table(rows)
    return 0


# Printing helpers


def _node_label(node) -> str:
    if isinstance(node, str):
        return node
    if hasattr(node, "ref"):
        return node.ref
    return f"run {node.id}"


def _print_lineage(registry, node, depth: int) -> None:
    walked = registry.lineage(node, depth=9 - depth)  # nine generations of ancestors at most

    def show(key: str, level: int) -> None:
        for role, parent in walked.parents(key):
            print("  " * (level + 1) + f"<- {_node_label(walked.nodes[parent])} ({role})")
            if not isinstance(walked.nodes[parent], str) and level < 8:
                show(parent, level + 1)

    if not walked.edges and depth == 0:
        print("  (imported; no parents)")
    show(walked.start, depth)


def _shorten_row(row: dict, limit: int = 160) -> str:
    def shorten(value):
        if isinstance(value, str):
            return value if len(value) <= limit else value[:limit] + "..."
        if isinstance(value, list):
            return [shorten(item) for item in value]
        if isinstance(value, dict):
            return {key: shorten(item) for key, item in value.items()}
        return value

    return json.dumps(shorten(row), ensure_ascii=False)
