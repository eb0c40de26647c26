"""`align rm`: trains with --config and --key value overrides; `align rm eval` / `align rm score` are actions."""

import pytest

from align import cli
from align.cli import stages


def parse(argv):
    args, extra = cli.build_parser().parse_known_args(argv)
    return args, extra


def test_the_help_walk_finds_the_rm_commands():
    assert {("rm",), ("rm", "eval"), ("rm", "score")} <= set(cli.subcommand_parsers())


@pytest.mark.parametrize(
    "argv",
    [
        ["rm", "--config", "r.yaml", "--dataset", "hh-train", "--max_steps", "5"],
        ["rm", "--dataset", "hh-train", "--config", "r.yaml", "--max_steps", "5"],
        ["rm", "--dataset", "hh-train", "--max_steps", "5", "--config", "r.yaml"],
    ],
)
def test_override_values_are_not_taken_for_actions(argv):
    args, extra = parse(argv)
    assert args.handler is stages.run_stage and args.stage is stages.rm_stage and args.accepts_overrides
    assert args.config == "r.yaml" and args.rm_action is None
    assert extra == ["--dataset", "hh-train", "--max_steps", "5"]


def test_resume_and_workspace_after_overrides():
    args, extra = parse(["rm", "--dataset", "hh", "--workspace", "W", "--resume", "--packing"])
    assert (args.workspace, args.resume, extra) == ("W", True, ["--dataset", "hh", "--packing"])


def test_eval_and_score_are_actions_without_overrides(capsys):
    args, extra = parse(["rm", "eval", "--rm", "rm:a", "--data", "d@1", "--max-length", "128"])
    assert (args.handler, args.rm, args.data, args.max_length, extra) == (stages.cmd_rm_eval, ["rm:a"], "d@1", 128, [])
    assert not args.accepts_overrides
    args, _ = parse(["--workspace", "W", "rm", "score", "--rm", "smollm2-135m", "--data", "c", "--name", "s"])
    assert (args.handler, args.workspace, args.name, args.seed) == (stages.cmd_rm_score, "W", "s", 0)
    with pytest.raises(SystemExit):  # overrides belong to training only
        cli.main(["rm", "eval", "--rm", "rm:a", "--data", "d", "--learning_rate", "1"])
    assert "unrecognized arguments: --learning_rate 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["rm", "score", "--rm", "rm:a", "--data", "d"])  # --name is required
    assert "--name" in capsys.readouterr().err
