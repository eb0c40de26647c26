"""What every part of the command line shares: the workspace, lists of models, tables."""

from __future__ import annotations

import argparse
import sys

from align.models import DTYPE_NAMES

DTYPE_HELP = "the weights' dtype while generating (default: bf16 on a CPU with native bf16, else fp32; on a GPU, auto)"


def workspace_parent() -> argparse.ArgumentParser:
    """--workspace, accepted after the subcommand too (as a parent of every subcommand's parser)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--workspace",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="registry workspace (default: $ALIGN_WORKSPACE or ./align-workspace)",
    )
    return common


class ModelList(argparse.Action):
    """A list of models is one flag with comma-separated references: `--models A,B` (`align rm eval --rm A,B`).

    Repeating the flag, or giving the singular alias a command took before (`--model A --model B`), still adds to
    the list, and prints a one-line deprecation note on stderr.
    """

    def __init__(self, option_strings, dest, *, alias_of: str | None = None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.alias_of = alias_of  # the documented flag, when this one is its deprecated alias

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(namespace, self.dest, None)
        flag = self.alias_of or self.option_strings[0]
        if (self.alias_of or given is not None) and not getattr(namespace, "_model_list_noted", False):
            old = f"{option_string} A {option_string} B" if given is not None else option_string
            print(f"align: {old} is deprecated; give the models as {flag} A,B", file=sys.stderr)
            namespace._model_list_noted = True
        refs = [ref.strip() for ref in values.split(",") if ref.strip()]
        setattr(namespace, self.dest, (given or []) + refs)


def add_model_list(parser, flag: str = "--models", *, alias: str | None = None, **kwargs) -> None:
    """The documented `flag A,B`, plus a deprecated `alias` (hidden from the help) that fills the same list."""
    dest = flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, action=ModelList, dest=dest, **kwargs)
    if alias:
        parser.add_argument(alias, action=ModelList, dest=dest, alias_of=flag, help=argparse.SUPPRESS)


def open_registry(args):
    from align.registry import Registry

    return Registry(args.workspace)


def print_table(rows: list[tuple]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def add_sampling(p, *, seed_help: str | None, temperature: float = 0.8) -> None:
    """The sampling flags of `align generate`, `align eval` and `align expand` (align.sampling.SamplingSettings)."""
    p.add_argument("--max-new-tokens", type=int, default=128)
    greedy = f"0 for greedy decoding (default: {temperature})"
    p.add_argument("--temperature", type=float, default=temperature, help=greedy)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=DTYPE_HELP)


def sampling_settings(args):
    from align.sampling import SamplingSettings

    return SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=args.dtype,
    )
