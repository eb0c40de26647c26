"""The `align` command line.

Each subcommand's handler imports what it needs when it runs, so `align --help` stays fast.
Problems a user can fix (AlignError) print one clear message and exit with status 2.

    align/cli/data.py     align data, runs, models, annotators: the registry
    align/cli/stages.py   align sft, rm, dpo, kto, ppo (one parser each from a recipe), merge, pipeline, sweep
    align/cli/apps.py     align generate, label, compare, serve, eval, chat
    align/cli/expand.py   align expand, review
"""

from __future__ import annotations

import argparse
import sys

from align.cli import apps, data, expand, stages
from align.cli.common import workspace_parent
from align.distributed import world_size
from align.errors import AlignError

# The subcommands in the order `align --help` lists them
COMMANDS = (
    data.add_data,
    data.add_runs,
    data.add_models,
    stages.add_sft,
    apps.add_generate,
    expand.add_expand,
    stages.add_rm,
    apps.add_label,
    expand.add_review,
    data.add_annotators,
    stages.add_ppo,
    stages.add_dpo,
    stages.add_kto,
    stages.add_merge,
    stages.add_pipeline,
    stages.add_sweep,
    apps.add_compare,
    apps.add_serve,
    apps.add_eval,
    apps.add_chat,
)


def build_parser() -> argparse.ArgumentParser:
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
    common = workspace_parent()  # --workspace is accepted before or after the subcommand
    for add in COMMANDS:
        add(commands, common)
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
    processes = world_size()
    if processes > 1 and not getattr(args, "distributed", False):
        print(
            f"error: `align {args.command}` runs in one process, and this is one of the {processes} processes of a "
            "launch: run it without accelerate launch or torchrun (the training stages sft, rm, dpo, kto and ppo run "
            "under one)",
            file=sys.stderr,
        )
        return 2
    try:
        return args.handler(args) or 0
    except AlignError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
