"""`align rm --objectives` on a tiny model built in the test: one backbone, a preference head and two attribute
heads that learn two synthetic attributes apart, saved with the adapter and scored head by head by `rm eval`."""

import random

import pytest

from align import cli
from align.config import build_config
from align.errors import AlignError
from align.registry import Registry
from reward.model import RewardModel
from reward.train import RewardStageConfig, run_rm

WORDS = "apple pear plum fig kiwi lime date lemon grape melon berry cherry olive peach mango".split()
MARKER = "banana"
OBJECTIVES = ["marker", "length"]


def text(rng: random.Random, marker: bool, long: bool) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(7, 9) if long else rng.randint(1, 2))]
    if marker:
        words[rng.randrange(len(words))] = MARKER
    return " ".join(words)


def attribute_rows(count: int, seed: int) -> list[dict]:
    """Two attributes drawn independently for each reply: `marker` (the word banana: score 5, else 1) and `length`
    (long: 5, short: 1). The preferred reply has more of them (a coin decides between equals). Some rows carry no
    scores, some only the chosen reply's: they train the preference head and nothing else."""
    rng = random.Random(seed)
    rows = []
    for number in range(count):
        sides = [(rng.random() < 0.5, rng.random() < 0.5) for _ in range(2)]
        if sum(sides[1]) > sum(sides[0]) or (sum(sides[1]) == sum(sides[0]) and rng.random() < 0.5):
            sides.reverse()
        (chosen_marker, chosen_long), (rejected_marker, rejected_long) = sides
        row = {
            "prompt": [{"role": "user", "content": f"name some fruit {number % 7}"}],
            "chosen": [{"role": "assistant", "content": text(rng, chosen_marker, chosen_long)}],
            "rejected": [{"role": "assistant", "content": text(rng, rejected_marker, rejected_long)}],
        }
        if number % 10 == 3:
            pass  # no scores at all
        elif number % 10 == 7:
            row["scores"] = {
                "marker": {"chosen": 5 if chosen_marker else 1},
                "length": {"chosen": 5 if chosen_long else 1},
            }
        else:
            row["scores"] = {
                "marker": {"chosen": 5 if chosen_marker else 1, "rejected": 5 if rejected_marker else 1},
                "length": {"chosen": 5 if chosen_long else 1, "rejected": 5 if rejected_long else 1},
            }
        rows.append(row)
    return rows


def recipe(tiny_model_dir, **values) -> dict:
    return {
        "model": str(tiny_model_dir),
        "dataset": "attributes-train",
        "eval_dataset": "attributes-test",
        "objectives": ",".join(OBJECTIVES),
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 5e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "max_length": 96,
        "num_train_epochs": 3,
        "logging_steps": 5,
        "save_steps": 1000,
        "report_to": "none",
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "gradient_checkpointing": False,
        "seed": 0,
        "bf16": False,
    } | values


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    registry = Registry(tmp_path_factory.mktemp("rm-objectives") / "ws")
    registry.register(attribute_rows(320, seed=1), name="attributes-train", kind="preference")
    registry.register(attribute_rows(120, seed=2), name="attributes-test", kind="preference")
    artifact = run_rm(build_config(RewardStageConfig, recipe(tiny_model_dir, output_name="multi")), registry)
    return registry, artifact


def test_each_head_learns_its_own_attribute_and_not_the_other(trained):
    registry, artifact = trained
    assert artifact.meta["objectives"] == OBJECTIVES
    metrics = registry.get_run(artifact.run_id).metrics
    heads = RewardModel.load(artifact.ref, registry).evaluate(registry.rows("attributes-test"))[0]["heads"]
    for own, other in (("marker", "length"), ("length", "marker")):
        entry = heads["attributes"][own]
        assert entry["pairs"] >= 30, entry
        assert entry["accuracy"][own]["value"] >= 0.85, (own, entry)
        assert entry["accuracy"][own]["low"] > 0.5  # above chance by its interval
        assert abs(entry["accuracy"][other]["value"] - 0.5) <= 0.2, (other, "on", own, entry)  # near chance
        assert metrics[f"eval_accuracy_{own}"] == entry["accuracy"][own]["value"]  # the stage measured the same
    assert metrics["eval_accuracy"] >= 0.65  # the preference head on the preference labels


def test_the_heads_reload_from_the_artifact_and_score_apart(trained):
    registry, artifact = trained
    rm = RewardModel.load(artifact.ref, registry)
    assert rm.heads == ("preference", "marker", "length")
    assert rm.model.config.id2label == {0: "preference", 1: "marker", 2: "length"}
    prompts = [[{"role": "user", "content": "name some fruit 1"}]] * 4
    replies = [
        [{"role": "assistant", "content": t}] for t in ("banana", "fig", "banana pear plum kiwi lime fig", "fig")
    ]
    heads = rm.score_heads(prompts, replies)
    assert heads["preference"] == rm.score(prompts, replies)
    assert heads["marker"][0] > heads["marker"][1]  # the marker, short either way
    assert heads["length"][2] > heads["length"][3]  # long against short
    weighted = rm.score(prompts, replies, weights={"marker": 1.0, "length": 2.0})
    assert weighted == pytest.approx([m + 2 * n for m, n in zip(heads["marker"], heads["length"])])
    with pytest.raises(AlignError, match="'honesty' \\(weight 1\\) is not a head of rm:multi@1"):
        rm.score(prompts, replies, weights={"honesty": 1.0})


def test_rm_eval_reports_each_head(trained, capsys):
    registry, artifact = trained
    code = cli.main(
        ["--workspace", str(registry.root), "rm", "eval", "--rm", artifact.ref, "--data", "attributes-test"]
    )
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"{artifact.ref}: preference head: accuracy " in out
    for attribute in OBJECTIVES:
        assert f"  {attribute} head: accuracy " in out and f"pairs whose {attribute} scores differ: above chance" in out
        assert f"accuracy_{attribute}" in out  # in the table too
    run = registry.list_runs()[-1]
    assert run.stage == "rm-eval" and set(run.metrics["heads"]["attributes"]) == set(OBJECTIVES)
    report = (run.dir / "report.md").read_text()
    assert "## Heads" in report and "| marker scores differ |" in report and "marker head | length head" in report


def test_objectives_need_scores_in_the_training_rows(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "ws")
    rows = attribute_rows(20, seed=3)
    registry.register(rows, name="attributes-train", kind="preference")
    registry.register(rows, name="attributes-test", kind="preference")
    config = build_config(RewardStageConfig, recipe(tiny_model_dir, objectives="marker,honesty"))
    message = "'objectives': honesty has no rubric score in attributes-train@1 \\(its rows score length, marker\\)"
    with pytest.raises(AlignError, match=message):
        run_rm(config, registry)
    assert registry.list_runs() == []  # refused before a run opened
