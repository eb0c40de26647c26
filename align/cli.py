"""The `align` command line.

Each subcommand's handler imports what it needs when it runs, so `align --help` stays fast.
Problems a user can fix (AlignError) print one clear message and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from align.errors import AlignError
from align.models import DTYPE_NAMES

KIND_CHOICES = ("sft", "prompts", "candidates", "preference")
FORMAT_CHOICES = ("auto", "trl", "alpaca", "self-instruct", "sharegpt", "hh")
DTYPE_HELP = "the weights' dtype while generating (default: bf16 on a CPU with native bf16, else fp32; on a GPU, auto)"


def build_parser() -> argparse.ArgumentParser:
    # --workspace is accepted before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--workspace",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="registry workspace (default: $ALIGN_WORKSPACE or ./align-workspace)",
    )

    parser = argparse.ArgumentParser(
        prog="align",
        description="RLHF and preference alignment in one loop: SFT, a ranking UI, reward models, DPO and PPO "
        "over one dataset registry.",
    )
    parser.add_argument(
        "--workspace",
        default=None,
        metavar="DIR",
        help="registry workspace (default: $ALIGN_WORKSPACE or ./align-workspace)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # align data ...
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

    # align runs ...
    runs = commands.add_parser("runs", help="list and inspect training and generation runs")
    run_commands = runs.add_subparsers(dest="runs_command", metavar="ACTION", required=True)
    p = run_commands.add_parser("list", parents=[common], help="every run with its status")
    p.set_defaults(handler=cmd_runs_list)
    p = run_commands.add_parser("show", parents=[common], help="config, inputs, outputs and metrics of a run")
    p.add_argument("run_id", metavar="ID")
    p.set_defaults(handler=cmd_runs_show)

    # align models ...
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

    # align sft
    p = commands.add_parser(
        "sft",
        parents=[common],
        allow_abbrev=False,
        help="supervised fine-tuning (LoRA by default) on an sft dataset",
        description="Train TRL's SFTTrainer from a recipe. Any config key can be overridden as "
        "--key value (e.g. --max_steps 20 --dataset seed-tasks@1).",
    )
    p.add_argument("--config", metavar="RECIPE.yaml", help="recipe, e.g. recipes/sft/smollm2-135m-lora.yaml")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_ID",
        help="continue the last interrupted sft run (or RUN_ID) from its last checkpoint",
    )
    p.set_defaults(handler=cmd_sft, accepts_overrides=True)

    # align generate
    p = commands.add_parser(
        "generate",
        parents=[common],
        help="sample candidates from one or more models",
        description="N completions per prompt from each model, registered as a candidates version for the ranking UI.",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="REF",
        help="model reference; repeat to compare models (e.g. an adapter and its base)",
    )
    p.add_argument("--prompts", required=True, metavar="DATASET[@V]", help="a prompts dataset")
    p.add_argument("--n", type=int, default=2, help="completions per prompt per model (default: 2)")
    p.add_argument("--name", required=True, help="name of the candidates dataset")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=DTYPE_HELP)
    p.set_defaults(handler=cmd_generate)

    # align rm: `align rm --config X` trains; `align rm eval ...` and `align rm score ...` use a reward model
    p = commands.add_parser(
        "rm",
        parents=[common],
        allow_abbrev=False,
        help="reward models: train one, evaluate it on preference data, score rows with it",
        description="Without an action: train a reward model (TRL's RewardTrainer, LoRA) from a recipe; any config "
        "key can be overridden as --key value (e.g. --dataset hh-harmless-train --max_steps 30). "
        "`align rm eval` and `align rm score` apply a reward model to a registry version.",
    )
    p.add_argument("--config", metavar="RECIPE.yaml", help="recipe, e.g. recipes/rm/smollm2-135m-lora.yaml")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_ID",
        help="continue the last interrupted rm run (or RUN_ID) from its last checkpoint",
    )
    p.set_defaults(handler=cmd_rm, accepts_overrides=True)
    rm_actions = p.add_subparsers(dest="rm_action", metavar="[ACTION]", action=_TrainOrActions)
    for action, helptext in (
        ("eval", "pairwise accuracy, margin, calibration and length bias on a preference version"),
        ("score", "score a candidates or preference version; registers the pairs it labels"),
    ):
        description = helptext[0].upper() + helptext[1:] + "."
        q = rm_actions.add_parser(action, parents=[common], help=helptext, description=description)
        if action == "eval":
            q.add_argument(
                "--rm",
                action="append",
                required=True,
                metavar="REF",
                help="rm:NAME[@V]; a base model means an untrained head; repeat to compare side by side",
            )
        else:
            q.add_argument("--rm", required=True, metavar="REF", help="rm:NAME[@V]; a base model: an untrained head")
        q.add_argument("--data", required=True, metavar="DATASET[@V]")
        if action == "score":
            q.add_argument("--name", required=True, help="name of the scored (preference) dataset")
        q.add_argument("--max-length", type=int, help="tokens per pair (default: the model's training max_length)")
        q.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
        q.add_argument("--seed", type=int, default=0, help="seed of an untrained head (default: 0)")
        q.set_defaults(handler=cmd_rm_eval if action == "eval" else cmd_rm_score, accepts_overrides=False)

    # align label, align annotators add|list, align data from-labels (the human votes)
    p = commands.add_parser(
        "label",
        parents=[common],
        help="the ranking app: people compare candidates, every vote goes to the registry",
        description="A Gradio app (and a JSON API under /label-api/) on a candidates version. Login is required "
        "whenever an annotator exists (`align annotators add`); --open runs with one local user instead.",
    )
    p.add_argument("--candidates", required=True, metavar="CANDS[@V]", help="a candidates dataset")
    p.add_argument(
        "--mode",
        choices=("pairwise", "rank"),
        default="pairwise",
        help="pairwise: A vs B (one pair per row); rank: order all completions, ties allowed (default: pairwise)",
    )
    p.add_argument(
        "--overlap", type=int, help="distinct annotators per item (default: 2; 1 with --open, its single user)"
    )
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=7860, help="default: 7860")
    p.add_argument("--open", action="store_true", help="no login: a single local user ('local', an admin)")
    p.add_argument(
        "--lease-minutes",
        type=float,
        default=10.0,
        help="how long an item stays reserved for the annotator it was shown to (default: 10)",
    )
    p.set_defaults(handler=cmd_label)

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

    p = data_commands.add_parser(
        "from-labels",
        parents=[common],
        help="aggregate the votes on a candidates version into a preference version",
        description="Pairwise votes by majority; rankings expand into every pair. Each pair gets a margin and a "
        "weight from how strongly the annotators agreed. Lineage: the candidates and a snapshot of the votes.",
    )
    p.add_argument("ref", metavar="CANDS[@V]")
    p.add_argument("--name", required=True, help="name of the preference dataset")
    p.add_argument(
        "--ties", choices=("drop", "keep"), default="drop", help="keep tied pairs with tie=true (default: drop)"
    )
    p.add_argument("--min-votes", type=int, default=1, help="pairs with fewer votes are left out (default: 1)")
    p.set_defaults(handler=cmd_data_from_labels)

    # align ppo
    p = commands.add_parser(
        "ppo",
        parents=[common],
        allow_abbrev=False,
        help="PPO (or RLOO / GRPO) of an SFT adapter against a reward model",
        description="Our PPO loop with policy, reference and value as LoRA adapters on one base model, or TRL's "
        "RLOO / GRPO with `algo: rloo|grpo`. Any config key can be overridden as --key value.",
    )
    p.add_argument("--config", metavar="RECIPE.yaml", help="recipe, e.g. recipes/ppo/smollm2-135m-lora.yaml")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_ID",
        help="continue the last interrupted ppo run (or RUN_ID) from its last checkpoint",
    )
    p.set_defaults(handler=cmd_ppo, accepts_overrides=True)

    # align dpo, align merge
    p = commands.add_parser(
        "dpo",
        parents=[common],
        allow_abbrev=False,
        help="DPO of an SFT adapter (or a base model) on a preference dataset",
        description="Train TRL's DPOTrainer from a recipe: the SFT adapter is the frozen reference, the policy a "
        "LoRA copy of it on the same base. Any config key can be overridden as --key value (e.g. --max_steps 20 "
        "--loss_type robust --label_smoothing auto).",
    )
    p.add_argument("--config", metavar="RECIPE.yaml", help="recipe, e.g. recipes/dpo/smollm2-135m-lora.yaml")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_ID",
        help="continue the last interrupted dpo run (or RUN_ID) from its last checkpoint",
    )
    p.set_defaults(handler=cmd_dpo, accepts_overrides=True)

    p = commands.add_parser(
        "merge",
        parents=[common],
        help="merge a LoRA adapter into full safetensors weights",
        description="Write the base model with the adapter merged in (loads with plain transformers) and register "
        "it as model:NAME-merged. The adapter itself is left as it is.",
    )
    p.add_argument("ref", metavar="adapter:NAME[@V]")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the merged model")
    p.add_argument("--name", help="artifact name (default: NAME-merged)")
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="auto",
        help="weights' dtype (default: the base checkpoint's)",
    )
    p.set_defaults(handler=cmd_merge)

    # align pipeline
    p = commands.add_parser(
        "pipeline",
        parents=[common],
        help="the whole loop: import, SFT, candidates, preferences, RM, DPO, PPO, eval",
        description="Runs the steps in order; a step whose output already exists for the same inputs and "
        "settings is reused, so a rerun is cheap and continues after a failure.",
    )
    p.add_argument("--config", required=True, metavar="RECIPE.yaml", help="e.g. recipes/pipeline/smollm2-135m.yaml")
    p.add_argument("--from", dest="start", metavar="STEP", help="rerun from this step (and everything after it)")
    p.add_argument("--until", metavar="STEP", help="stop after this step")
    p.set_defaults(handler=cmd_pipeline)

    # align compare (side-by-side chat, battles, leaderboard) and align eval
    p = commands.add_parser(
        "compare",
        parents=[common],
        help="side-by-side chat, blind battles whose votes go to the registry, and the arena leaderboard",
        description="A Gradio app: two models answer side by side, streaming; battle mode hides the names until "
        "the vote; the leaderboard shows Bradley-Terry ratings with bootstrap intervals, Elo and win rates. "
        "Login is required whenever an annotator exists; --open runs with one local user instead. With "
        "--leaderboard, print the arena's leaderboard and exit. `align data from-labels arena:NAME` turns the "
        "votes into preference data.",
    )
    p.add_argument("--models", metavar="REF1,REF2[,...]", help="two or more model references, comma-separated")
    p.add_argument("--arena", default="default", metavar="NAME", help="the arena the votes go to (default: default)")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=7860, help="default: 7860")
    p.add_argument("--open", action="store_true", help="no login: a single local user ('local')")
    p.add_argument("--system", default="", help="the default system prompt (editable in the app)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default: 256 (editable in the app)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default: 0.7, editable in the app)")
    p.add_argument("--top-p", type=float, default=0.9, help="default: 0.9 (editable in the app)")
    p.add_argument("--leaderboard", action="store_true", help="print the arena's leaderboard and exit")
    p.add_argument("--plot", metavar="FILE.png", help="with --leaderboard: also write the win-rate heatmap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.set_defaults(handler=cmd_compare)

    # align serve: every app in one, on the workspace
    p = commands.add_parser(
        "serve",
        parents=[common],
        help="one app for the loop: Label, Compare / Arena, Leaderboard, Datasets (with lineage), Runs",
        description="A Gradio app with every tab on one workspace. It binds to 127.0.0.1; --expose makes a "
        "non-loopback --host possible and then requires login (annotators from `align annotators add`). On "
        "loopback, login is required whenever an annotator exists, and otherwise one local user is served.",
    )
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=7860, help="default: 7860")
    p.add_argument("--expose", action="store_true", help="allow a non-loopback --host (login required)")
    p.add_argument(
        "--models",
        metavar="REF1,REF2[,...]",
        help="the Compare / Arena models (default: the base models and the newest adapters, at most 6)",
    )
    p.add_argument(
        "--candidates", metavar="CANDS[@V]", help="the candidates the Label tab opens on (default: the newest)"
    )
    p.add_argument("--mode", choices=("pairwise", "rank"), default="pairwise", help="labeling mode (default: pairwise)")
    p.add_argument("--overlap", type=int, help="distinct annotators per item (default: 2 with login, else 1)")
    p.add_argument("--arena", default="default", metavar="NAME", help="the arena battle votes go to (default: default)")
    p.add_argument("--lease-minutes", type=float, default=10.0, help="how long an item is held for its annotator")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default: 256 (editable in the app)")
    p.add_argument("--temperature", type=float, default=0.7, help="default: 0.7 (editable in the app)")
    p.set_defaults(handler=cmd_serve)

    p = commands.add_parser(
        "eval",
        parents=[common],
        help="every model answers held-out prompts; rewards, win rates, KL and reference metrics with intervals",
        description="Generates on the prompts with every model (plus an optional few-shot base-model baseline), "
        "then reports with 95% bootstrap intervals: mean reward and win rate against the baseline by the reward "
        "model, a length-controlled win rate, reply length, KL to a reference model, and ROUGE/BLEU/METEOR "
        "against reference answers. Writes runs/ID/report.md with plots and registers the generations.",
    )
    p.add_argument("--models", metavar="REF_A,REF_B[,...]", help="model references, comma-separated (the first is "
                   "the baseline unless --baseline)")  # fmt: skip
    p.add_argument("--prompts", metavar="DATASET[@V]", help="a prompts dataset (held out from training)")
    p.add_argument("--rm", metavar="REF", help="reward model: rm:NAME[@V] (a base model: an untrained head)")
    p.add_argument("--references", action="store_true", help="ROUGE, BLEU and METEOR against the prompts' references")
    p.add_argument("--baseline", metavar="REF", help="the row win rates are measured against (default: the first)")
    p.add_argument("--kl-reference", metavar="REF", help="report KL(model || REF) on each model's own replies")
    p.add_argument("--few-shot", type=int, default=0, metavar="K", help="add the base model prompted with K examples")
    p.add_argument("--few-shot-from", metavar="DATASET[@V]", help="sft (or prompts with references) to take the "
                   "examples from (default: the other prompts' reference answers)")  # fmt: skip
    p.add_argument("--few-shot-model", metavar="REF", help="the few-shot model (default: the first adapter's base)")
    p.add_argument("--name", help="name of the generations (candidates) dataset (default: eval-PROMPTS)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=DTYPE_HELP)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default: 1000)")
    p.add_argument("--rm-max-length", type=int, help="tokens per scored reply (default: the reward model's own)")
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_ID",
                   help="continue the last interrupted eval run (or RUN_ID); finished models are kept")  # fmt: skip
    p.set_defaults(handler=cmd_eval)

    # align chat
    p = commands.add_parser(
        "chat",
        parents=[common],
        help="terminal chat with any model reference",
        description="Streams replies token by token. Without --prompt it is an interactive, "
        "multi-turn chat: /reset clears the history, /exit (or Ctrl-D) quits.",
    )
    p.add_argument(
        "--model",
        default="smollm2-135m",
        metavar="REF",
        help="smollm2-135m, a HF id or folder, adapter:NAME[@V] (default: smollm2-135m)",
    )
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int)
    p.set_defaults(handler=cmd_chat)

    return parser


def subcommand_parsers(parser: argparse.ArgumentParser | None = None, prefix: tuple = ()) -> dict:
    """Every (sub)command path -> its parser; the --help test walks this."""
    parser = parser or build_parser()
    found = {prefix: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.update(subcommand_parsers(child, prefix + (name,)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return args.handler(args) or 0
    except AlignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _registry(args):
    from align.registry import Registry

    return Registry(args.workspace)


# Handlers


def cmd_data_import(args) -> int:
    from align.registry.importers import Limits

    limits = Limits.parse(rows=args.max_rows, row_bytes=args.max_row_bytes, total_bytes=args.max_bytes)
    registry = _registry(args)
    version, result = registry.import_file(args.path, name=args.name, kind=args.kind, fmt=args.fmt, limits=limits)
    print(f"{version.ref}  {version.num_rows} rows  kind={version.kind}  (format {result.format})")
    for line in result.summary():
        print(line)
    return 0


def cmd_data_list(args) -> int:
    registry = _registry(args)
    versions = registry.list_datasets()
    if not versions:
        print(f"no datasets in {registry.root} yet: `align data import FILE --name NAME` adds one")
        return 0
    rows = [("DATASET", "KIND", "ROWS", "CREATED", "FROM")]
    for version in versions:
        parents = ", ".join(_node_label(parent) for _, parent in registry.parents(version)) or "-"
        rows.append((version.ref, version.kind, str(version.num_rows), version.created_at, parents))
    _print_table(rows)
    return 0


def cmd_data_show(args) -> int:
    import pyarrow.parquet as pq

    registry = _registry(args)
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
    registry = _registry(args)
    version = registry.resolve(args.ref)
    target = registry.export(version, args.to)
    print(f"wrote {version.num_rows} rows of {version.ref} to {target}")
    return 0


def cmd_data_split(args) -> int:
    registry = _registry(args)
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
    registry = _registry(args)
    version = registry.convert(args.ref, name=args.name, kind="prompts")
    print(f"{version.ref}  {version.num_rows} rows  kind=prompts  (from {registry.resolve(args.ref).ref})")
    return 0


def cmd_runs_list(args) -> int:
    registry = _registry(args)
    runs = registry.list_runs()
    if not runs:
        print(f"no runs in {registry.root} yet")
        return 0
    rows = [("RUN", "STAGE", "STATUS", "STARTED", "OUTPUTS")]
    rows += [(run.id, run.stage, run.shown_status, run.created_at, ", ".join(run.outputs) or "-") for run in runs]
    _print_table(rows)
    return 0


def cmd_runs_show(args) -> int:
    registry = _registry(args)
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
    registry = _registry(args)
    for artifact in registry.list_artifacts():
        print(f"{artifact.ref}  base={artifact.base_model}  {artifact.path}")
    return 0


def cmd_models_prepare(args) -> int:
    from align.models import resolve_model

    resolved = resolve_model(args.ref, registry=_registry(args) if ":" in args.ref else None)
    print(resolved.describe())
    return 0


def cmd_sft(args) -> int:
    from align.sft import main as sft_main

    sft_main(args.config, args.overrides, workspace=args.workspace, resume=args.resume)
    return 0


def cmd_generate(args) -> int:
    from align.generate import SamplingSettings, generate_candidates

    settings = SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=args.dtype,
    )
    version = generate_candidates(
        _registry(args),
        args.model,
        args.prompts,
        n=args.n,
        name=args.name,
        limit=args.limit,
        settings=settings,
    )
    print(f"{version.ref}  {version.num_rows} rows  kind=candidates")
    return 0


class _TrainOrActions(argparse._SubParsersAction):
    """Optional actions after `align rm`. A word that names no action is the value of a `--key value` override
    (`align rm --dataset hh --max_steps 5`): it goes back to the overrides, and the rest parses as usual."""

    class _OpenChoices:
        """The actions (for help and the --help walk); `in` is true for any word, because argparse checks a word
        against the choices before it calls the action, which decides."""

        def __init__(self, parsers: dict):
            self.parsers = parsers

        def __contains__(self, name) -> bool:
            return True

        def __iter__(self):
            return iter(self.parsers)

        def __getitem__(self, name):
            return self.parsers[name]

        def items(self):
            return self.parsers.items()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.choices = self._OpenChoices(self._name_parser_map)

    def __call__(self, parser, namespace, values, option_string=None):
        if values[0] in self._name_parser_map:
            return super().__call__(parser, namespace, values, option_string)
        _, rest = parser.parse_known_args(values[1:], namespace)
        setattr(namespace, argparse._UNRECOGNIZED_ARGS_ATTR, [values[0], *rest])


def cmd_rm(args) -> int:
    from reward.train import main as rm_main

    rm_main(args.config, args.overrides, workspace=args.workspace, resume=args.resume)
    return 0


def cmd_rm_eval(args) -> int:
    from reward.metrics import headline
    from reward.score import evaluate_rm

    registry = _registry(args)
    results = [
        evaluate_rm(registry, ref, args.data, max_length=args.max_length, batch_size=args.batch_size, seed=args.seed)
        for ref in args.rm
    ]
    rows = [("METRIC", *(ref if ref.startswith("rm:") else f"{ref} (untrained)" for ref in args.rm))]
    for key in headline(results[0][1]):
        values = [metrics.get(key) for _, metrics in results]
        rows.append((key, *(f"{v:.4f}" if isinstance(v, float) else str(v) for v in values)))
    _print_table(rows)
    for ref, (run, _) in zip(args.rm, results):
        print(f"report of {ref}: {run.dir / 'report.md'}")
    return 0


def cmd_rm_score(args) -> int:
    from reward.score import score_dataset

    version, agreement = score_dataset(
        _registry(args),
        args.rm,
        args.data,
        args.name,
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    agrees = "" if agreement is None else f"  (agrees with the source's labels on {100 * agreement:.1f}%)"
    print(f"{version.ref}  {version.num_rows} rows  kind=preference{agrees}")
    return 0


def cmd_label(args) -> int:
    from ui.label_app import run_label

    run_label(
        args.workspace,
        args.candidates,
        mode=args.mode,
        overlap=args.overlap if args.overlap is not None else 1 if args.open else 2,
        host=args.host,
        port=args.port,
        open_access=args.open,
        lease_minutes=args.lease_minutes,
    )
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
    add_annotator(_registry(args), args.name, password, admin=args.admin)
    print(f"added annotator {args.name}" + (" (admin)" if args.admin else ""))
    return 0


def cmd_annotators_list(args) -> int:
    from align.labels import list_annotators

    registry = _registry(args)
    found = list_annotators(registry)
    if not found:
        print(f"no annotators in {registry.root} yet: `align annotators add NAME` adds one")
        return 0
    rows = [("ANNOTATOR", "ADMIN", "VOTES", "ADDED")]
    rows += [(a["name"], "yes" if a["admin"] else "-", str(a["votes"]), a["created_at"]) for a in found]
    _print_table(rows)
    return 0


def cmd_data_from_labels(args) -> int:
    from align.labels import from_labels

    version, result, numbers = from_labels(
        _registry(args), args.ref, name=args.name, ties=args.ties, min_votes=args.min_votes
    )
    alpha = numbers["krippendorff_alpha"]
    raw = numbers["pairwise_agreement"]
    print(f"{version.ref}  {version.num_rows} rows  kind=preference  (from {version.meta['candidates']})")
    print(
        f"{numbers['votes']} votes by {numbers['annotators']} annotator{'' if numbers['annotators'] == 1 else 's'} "
        f"on {result.pairs} pairs: "
        f"{result.kept} kept, {result.ties_kept} ties kept, {result.ties_dropped} ties dropped, "
        f"{result.both_bad} both bad, {result.too_few} below --min-votes"
    )
    print(
        "agreement: Krippendorff's alpha "
        + ("-" if alpha is None else f"{alpha:.3f}")
        + ", raw "
        + ("-" if raw is None else f"{raw:.0%}")
    )
    return 0


def cmd_ppo(args) -> int:
    from align.ppo import main as ppo_main

    ppo_main(args.config, args.overrides, workspace=args.workspace, resume=args.resume)
    return 0


def cmd_dpo(args) -> int:
    from align.dpo import main as dpo_main

    dpo_main(args.config, args.overrides, workspace=args.workspace, resume=args.resume)
    return 0


def cmd_merge(args) -> int:
    from align.merge import merge_adapter

    out, artifact, difference = merge_adapter(_registry(args), args.ref, args.out, name=args.name, dtype=args.dtype)
    print(f"{artifact.ref}  {out}  (merged {args.ref}; max |logit difference| {difference:.1e})")
    return 0


def cmd_pipeline(args) -> int:
    from align.pipeline import main as pipeline_main

    pipeline_main(args.config, workspace=args.workspace, start=args.start, until=args.until)
    return 0


def cmd_compare(args) -> int:
    if args.leaderboard:
        from ui.compare_app import print_leaderboard

        print_leaderboard(args.workspace, args.arena, bootstrap=args.bootstrap, seed=args.seed, plot=args.plot)
        return 0
    if not args.models:
        raise AlignError("give the models to compare: --models REF1,REF2 (or --leaderboard to print the ratings)")
    from ui.compare_app import ChatSettings, run_compare

    defaults = ChatSettings(args.system, args.max_new_tokens, args.temperature, args.top_p)
    run_compare(
        args.workspace,
        args.models.split(","),
        arena=args.arena,
        host=args.host,
        port=args.port,
        open_access=args.open,
        defaults=defaults,
        bootstrap=args.bootstrap,
    )
    return 0


def cmd_serve(args) -> int:
    from ui.compare_app import ChatSettings
    from ui.serve_app import run_serve

    models = [ref for ref in args.models.split(",") if ref.strip()] if args.models else None
    run_serve(
        args.workspace,
        host=args.host,
        port=args.port,
        expose=args.expose,
        models=models,
        candidates=args.candidates,
        mode=args.mode,
        overlap=args.overlap,
        arena=args.arena,
        lease_seconds=args.lease_minutes * 60,
        defaults=ChatSettings("", args.max_new_tokens, args.temperature, 0.9),
    )
    return 0


def cmd_eval(args) -> int:
    from align.evaluate import EvalOptions, print_summary, run_eval
    from align.generate import SamplingSettings

    if args.resume:
        result = run_eval(_registry(args), resume=args.resume)
    else:
        if not args.models or not args.prompts:
            raise AlignError("give --models REF_A,REF_B and --prompts DATASET (or --resume)")
        sampling = SamplingSettings(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            batch_size=args.batch_size,
            dtype=args.dtype,
        )
        options = EvalOptions(
            models=args.models.split(","),
            prompts=args.prompts,
            rm=args.rm,
            references=args.references,
            baseline=args.baseline,
            kl_reference=args.kl_reference,
            few_shot=args.few_shot,
            few_shot_from=args.few_shot_from,
            few_shot_model=args.few_shot_model,
            limit=args.limit,
            name=args.name,
            bootstrap=args.bootstrap,
            rm_max_length=args.rm_max_length,
            sampling=sampling,
        )
        result = run_eval(_registry(args), options)
    print_summary(result)
    return 0


def cmd_chat(args) -> int:
    from align.chat import run_chat

    registry = _registry(args) if ":" in args.model else None
    run_chat(
        args.model,
        registry=registry,
        prompt=args.prompt,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    return 0


# Printing helpers


def _print_table(rows: list[tuple]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _node_label(node) -> str:
    if isinstance(node, str):
        return node
    if hasattr(node, "ref"):
        return node.ref
    return f"run {node.id}"


def _print_lineage(registry, node, depth: int) -> None:
    parents = registry.parents(node)
    if not parents and depth == 0:
        print("  (imported; no parents)")
    for role, parent in parents:
        print("  " * (depth + 1) + f"<- {_node_label(parent)} ({role})")
        if not isinstance(parent, str) and depth < 8:
            _print_lineage(registry, parent, depth + 1)


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


if __name__ == "__main__":
    sys.exit(main())
