"""The command line: every subcommand has working --help, and `align --help` stays light (no torch); a stage's
--help lists every recipe key; a mistake on the command line is blamed on it; lists of models are `--models A,B`."""

import dataclasses
import re
import subprocess
import sys

import pytest

from align import cli
from align.cli import stages

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
    assert "align.errors" in imported  # the parse worked: align/cli/__main__.py ran
    assert "torch" not in imported and "transformers" not in imported


# A stage's --help lists every recipe key, with its type, default and help (as TRL's TrlParser does)


def stage_help(stage: str, capsys) -> dict[str, str]:
    """`align STAGE --help` -> {key: its entry, whitespace folded}."""
    with pytest.raises(SystemExit) as info:
        cli.main([stage, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    entries = re.findall(r"^  --(\w+) (.*?)(?=^  -|^\S|\Z)", out, flags=re.MULTILINE | re.DOTALL)
    return {key: " ".join(text.split()) for key, text in entries}


@pytest.mark.parametrize(
    "stage, key, entry",
    [
        ("sft", "lora_r", "int LoRA rank: more capacity, more memory (default: 16)"),
        ("sft", "dataset", "str | None registry dataset, NAME or NAME@V (default: None)"),
        ("dpo", "beta", "float Parameter controlling"),
        ("dpo", "lr_scheduler_type", "SchedulerType | str The learning rate scheduler type to use."),
        ("rm", "output_name", "str | None artifact name: rm:NAME (default: rm)"),
        ("ppo", "num_updates", "int PPO updates (each: one batch of rollouts) (default: 20)"),
    ],
)
def test_stage_help_shows_a_key_with_its_type_help_and_default(stage, key, entry, capsys):
    assert stage_help(stage, capsys)[key].startswith(entry)


def test_stage_help_lists_every_key_of_the_config(capsys):
    for stage, load in (("sft", stages.sft_stage), ("rm", stages.rm_stage), ("dpo", stages.dpo_stage),
                        ("ppo", stages.ppo_stage)):  # fmt: skip
        config_class, _ = load()
        listed = stage_help(stage, capsys)
        assert set(listed) - {"workspace", "config", "resume", "help"} == {
            field.name for field in dataclasses.fields(config_class) if field.init
        }, stage
    assert listed["kl_coef"] == "float (default: 0.05)"  # a PPO key without help still shows type and default
    dpo = stage_help("dpo", capsys)
    assert dpo["beta"].endswith("(default: 0.1)") and dpo["learning_rate"].startswith("float")


# A mistake on the command line is blamed on the command line, not on the recipe file


@pytest.fixture
def dpo_recipe(tmp_path):
    recipe = tmp_path / "R.yaml"
    recipe.write_text("model: smollm2-135m\ndataset: prefs\nbeta: 0.1\n", encoding="utf-8")
    return ["--workspace", str(tmp_path / "ws"), "dpo", "--config", str(recipe)]


def test_a_typo_on_the_command_line_is_blamed_on_the_command_line(dpo_recipe, capsys):
    assert cli.main([*dpo_recipe, "--betaa", "0.1"]) == 2
    assert capsys.readouterr().err == "error: unknown option --betaa on the command line (did you mean --beta?)\n"
    assert cli.main([*dpo_recipe, "--beta", "high"]) == 2
    assert capsys.readouterr().err == "error: command line: config key 'beta' must be float (got 'high')\n"


def test_a_typo_in_the_recipe_is_still_blamed_on_the_recipe(dpo_recipe, capsys):
    recipe = dpo_recipe[-1]
    with open(recipe, "a", encoding="utf-8") as file:
        file.write("betaa: 0.2\n")
    assert cli.main([*dpo_recipe, "--beta", "0.2"]) == 2
    assert capsys.readouterr().err == f"error: {recipe}: unknown config key 'betaa' (did you mean 'beta'?)\n"


# Lists of models: `--models A,B` on every command; the repeated flag still works, with a deprecation note


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "--prompts", "p", "--name", "c"],
        ["eval", "--prompts", "p"],
        ["compare"],
        ["serve"],
    ],
    ids=lambda command: command[0],
)
def test_models_flag(command, capsys):
    args, _ = cli.build_parser().parse_known_args([*command, "--models", "adapter:sft, smollm2-135m"])
    assert args.models == ["adapter:sft", "smollm2-135m"]
    assert capsys.readouterr().err == ""
    args, _ = cli.build_parser().parse_known_args([*command, "--model", "adapter:sft", "--model", "smollm2-135m"])
    assert args.models == ["adapter:sft", "smollm2-135m"]
    assert capsys.readouterr().err == "align: --model is deprecated; give the models as --models A,B\n"


def test_rm_eval_takes_its_reward_models_comma_separated(capsys):
    args, _ = cli.build_parser().parse_known_args(["rm", "eval", "--rm", "rm:rm,smollm2-135m", "--data", "d"])
    assert args.rm == ["rm:rm", "smollm2-135m"] and capsys.readouterr().err == ""
    args, _ = cli.build_parser().parse_known_args(
        ["rm", "eval", "--rm", "rm:rm", "--rm", "smollm2-135m", "--data", "d"]
    )
    assert args.rm == ["rm:rm", "smollm2-135m"]
    assert capsys.readouterr().err == "align: --rm A --rm B is deprecated; give the models as --rm A,B\n"


def test_generate_needs_models(capsys):
    assert cli.main(["generate", "--prompts", "p", "--name", "c"]) == 2
    assert "give the models to sample from: --models" in capsys.readouterr().err
