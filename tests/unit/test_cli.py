"""The command line: every subcommand has working --help, and `align --help` stays light (no torch)."""

import subprocess
import sys

import pytest

from align import cli

COMMANDS = sorted(cli.subcommand_parsers())


def test_the_walk_finds_the_data_commands():
    assert {
        ("data", "import"),
        ("data", "list"),
        ("data", "show"),
        ("data", "export"),
        ("data", "split"),
        ("data", "prompts-from"),
        ("runs", "list"),
        ("runs", "show"),
    } <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "align")
def test_help(path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([*path, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ")
    usage = out.split("\n\n")[0]  # argparse may wrap the usage line
    assert " ".join(["usage: align", *path]) in " ".join(usage.split())


def test_missing_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["data"])
    assert info.value.code == 2
    assert "usage: align data" in capsys.readouterr().err


def test_help_does_not_import_torch():
    code = (
        "import sys, align.cli; align.cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


def test_help_subprocess_runs_without_torch():
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "align.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    assert done.stdout.startswith("usage: align")
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "align.errors" in imported  # the parse worked: align.cli itself runs as __main__
    assert "torch" not in imported and "transformers" not in imported
