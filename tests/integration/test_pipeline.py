"""The whole loop on tiny models: every step runs, a rerun reuses them all, --from reruns from a step."""

import json

import pytest
import yaml

from align.errors import AlignError
from align.pipeline import main

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon", "melon", "grape"]


@pytest.fixture
def pipeline_recipe(tmp_path, tiny_policy_dir):
    sft = tmp_path / "tasks.jsonl"
    sft.write_text(
        "".join(
            json.dumps({"instruction": f"Say {w}.", "instances": [{"input": "", "output": f"{w} {w}"}]}) + "\n"
            for w in WORDS
        )
    )
    hh = tmp_path / "hh.jsonl"
    hh.write_text(
        "".join(
            json.dumps(
                {
                    "chosen": f"\n\nHuman: name a fruit like {w}\n\nAssistant: {w} is nice",
                    "rejected": f"\n\nHuman: name a fruit like {w}\n\nAssistant: no",
                }
            )
            + "\n"
            for w in WORDS * 2
        )
    )
    small = {"max_steps": 2, "report_to": "none", "per_device_train_batch_size": 4, "max_length": 64}
    recipe = {
        "base_model": str(tiny_policy_dir),
        "sft_data": str(sft),
        "preference_data": str(hh),
        "sft_test_size": 2,
        "preference_test_size": 0.2,
        "sft": dict(small),
        "generate": {"n": 2, "limit": 2, "max_new_tokens": 4},
        "rm": dict(small),
        "dpo": dict(small),
        "ppo": {
            "num_updates": 1,
            "batch_size": 4,
            "mini_batch_size": 2,
            "response_length": 4,
            "eval_prompts": 2,
            "lora_r": 4,
        },
        "eval": {"limit": 3, "max_new_tokens": 4, "bootstrap": 50},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_every_step_runs_then_a_rerun_reuses_them_all(tmp_path, pipeline_recipe, capsys):
    workspace = str(tmp_path / "ws")
    outputs = main(str(pipeline_recipe), workspace=workspace)
    for key in ("sft", "candidates", "train_prefs", "rm", "dpo", "ppo", "eval"):
        assert key in outputs, key
    assert outputs["sft"] == "adapter:sft@1" and outputs["rm"].startswith("rm:") and outputs["ppo"] == "adapter:ppo@1"
    first = capsys.readouterr().out
    assert first.count("running ...") == 8

    again = main(str(pipeline_recipe), workspace=workspace)
    second = capsys.readouterr().out
    assert again == outputs
    assert second.count("reused") == 8 and "running ..." not in second

    main(str(pipeline_recipe), workspace=workspace, start="rm")
    third = capsys.readouterr().out
    assert third.count("reused") == 4  # import, sft, generate, preferences
    assert third.count("running ...") == 4  # rm, dpo, ppo, eval
    assert "[rm] running" in third and "[sft] reused" in third


def test_a_bad_stage_setting_fails_before_any_step(tmp_path, pipeline_recipe):
    recipe = yaml.safe_load(pipeline_recipe.read_text())
    recipe["dpo"]["lerning_rate"] = 1.0
    pipeline_recipe.write_text(yaml.safe_dump(recipe))
    with pytest.raises(AlignError, match="unknown config key 'lerning_rate'"):
        main(str(pipeline_recipe), workspace=str(tmp_path / "ws"))
    assert not (tmp_path / "ws").exists()


def test_on_policy_dpo_trains_on_the_sft_adapters_replies_ranked_by_the_reward_model(tmp_path, pipeline_recipe):
    from align.registry import Registry

    recipe = yaml.safe_load(pipeline_recipe.read_text())
    recipe |= {"steps": ["import", "sft", "preferences", "rm", "dpo"], "dpo_pairs": "rm"}
    recipe["on_policy"] = {"n": 3, "limit": 4, "max_new_tokens": 4}
    pipeline_recipe.write_text(yaml.safe_dump(recipe))
    outputs = main(str(pipeline_recipe), workspace=str(tmp_path / "ws"))

    registry = Registry(tmp_path / "ws")
    pairs = registry.resolve(outputs["dpo_pairs"])
    assert pairs.ref == "pipeline-on-policy-pairs@1" and pairs.kind == "preference" and pairs.num_rows == 4
    roles = {role: getattr(parent, "ref", None) for role, parent in registry.parents(pairs)}
    assert roles["scored"] == "pipeline-on-policy@1" and roles["reward-model"] == outputs["rm"]
    candidates = registry.rows("pipeline-on-policy@1")
    assert all(len(row["completions"]) == 3 for row in candidates)
    assert {source for row in candidates for source in row["sources"]} == {outputs["sft"]}
    # each pair is the reward model's best reply against its worst, with the gap as the margin
    scores = pairs.meta["scores"]
    for row, candidate, score in zip(registry.rows(pairs), candidates, scores):
        assert row["chosen"] == candidate["completions"][score.index(max(score))]
        assert row["margin"] == pytest.approx(max(score) - min(score))
    dpo = registry.resolve_artifact(outputs["dpo"])
    assert ("train", pairs.ref) in [(role, getattr(parent, "ref", None)) for role, parent in registry.parents(dpo)]

    recipe["steps"] = ["import", "sft", "preferences", "dpo"]
    pipeline_recipe.write_text(yaml.safe_dump(recipe))
    with pytest.raises(AlignError, match="'dpo_pairs' is rm: the reward model ranks DPO's pairs, so add rm"):
        main(str(pipeline_recipe), workspace=str(tmp_path / "ws"))
