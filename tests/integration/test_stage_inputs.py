"""Every training stage resolves all its inputs before it registers anything: a model reference that does not
resolve exits 2 and leaves the registry as it was (no seeded split of the data, no run)."""

import pytest

from align import cli
from align.registry import Registry

STAGES = {
    "sft": ["sft", "--dataset", "chats"],
    "rm": ["rm", "--dataset", "pairs"],
    "dpo": ["dpo", "--dataset", "pairs"],
    "ppo": ["ppo", "--dataset", "prompts", "--reward_model", "rm:tiny-rm"],
    "rloo": ["ppo", "--algo", "rloo", "--dataset", "prompts", "--reward_model", "rm:tiny-rm"],
}


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "ws")
    prompts = [[{"role": "user", "content": f"question {i}"}] for i in range(20)]
    replies = [[{"role": "assistant", "content": f"answer {i}"}] for i in range(20)]
    registry.register([{"messages": p + r} for p, r in zip(prompts, replies)], name="chats", kind="sft")
    registry.register([{"prompt": p} for p in prompts], name="prompts", kind="prompts")
    refusal = [{"role": "assistant", "content": "no"}]
    pairs = [{"prompt": p, "chosen": r, "rejected": refusal} for p, r in zip(prompts, replies)]
    registry.register(pairs, name="pairs", kind="preference")
    registry.register_artifact("rm", "tiny-rm", tiny_model_dir, base_model=str(tiny_model_dir))
    return tmp_path / "ws"


@pytest.mark.parametrize("stage", STAGES)
def test_a_model_that_does_not_resolve_registers_nothing(stage, workspace, tmp_path, capsys):
    registry = Registry(workspace)
    datasets = [version.ref for version in registry.list_datasets()]
    nope = tmp_path / "nope"
    code = cli.main(["--workspace", str(workspace), *STAGES[stage], "--model", str(nope), "--report_to", "none"])
    assert code == 2
    assert f"model folder {nope} does not exist" in capsys.readouterr().err
    registry = Registry(workspace)
    assert [version.ref for version in registry.list_datasets()] == datasets
    assert registry.list_runs() == []


def test_too_few_rows_to_hold_out_are_refused_before_anything_is_registered(workspace, tiny_model_dir, capsys):
    registry = Registry(workspace)
    few = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(3)
    ]
    registry.register(few, name="few", kind="sft")
    datasets = [version.ref for version in registry.list_datasets()]
    code = cli.main(["--workspace", str(workspace), "sft", "--dataset", "few", "--model", str(tiny_model_dir)])
    assert code == 2
    assert "eval_split 0.1 of the 3 rows of few@1 holds out 0: change eval_split, or name an eval_dataset" in (
        capsys.readouterr().err
    )
    assert [version.ref for version in Registry(workspace).list_datasets()] == datasets
    assert Registry(workspace).list_runs() == []
