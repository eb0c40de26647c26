"""`reward_weights` in PPO, RLOO and GRPO: the reward is the weighted sum of a multi-objective reward model's heads,
and a head it lacks is refused, naming the key and the value, before anything starts."""

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from align import cli
from align.config import build_config
from align.errors import AlignError
from align.ppo import PPOStageConfig, load_roles, run_ppo
from align.ppo_shared import registry_reward_fn
from align.registry import Registry
from reward.model import RewardModel

HEADS = ["helpfulness", "harmlessness"]
WEIGHTS = {"helpfulness": 1.0, "harmlessness": 2.0}
PROMPTS = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "a longer question?"}]]
REPLIES = ["fine", "a rather longer reply with more words"]


@pytest.fixture
def registry(tmp_path, tiny_policy_dir):
    registry = Registry(tmp_path / "ws")
    prompts = [{"prompt": [{"role": "user", "content": f"write something {i}"}]} for i in range(8)]
    registry.register(prompts, name="prompts", kind="prompts")
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    torch.manual_seed(1)
    sft = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    sft.save_pretrained(tmp_path / "sft")
    registry.register_artifact("adapter", "sft", tmp_path / "sft", base_model=str(tiny_policy_dir))
    # A reward model with a preference head and two attribute heads, saved as `align rm --objectives` saves it.
    torch.manual_seed(3)
    scorer = AutoModelForSequenceClassification.from_pretrained(tiny_policy_dir, num_labels=1 + len(HEADS))
    lora = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules="all-linear", init_lora_weights=False, modules_to_save=["score"]
    )
    peft.get_peft_model(scorer, lora).save_pretrained(tmp_path / "rm")
    meta = {"objectives": HEADS}
    registry.register_artifact("rm", "multi", tmp_path / "rm", base_model=str(tiny_policy_dir), meta=meta)
    yield registry
    registry.close()


def recipe(**values) -> dict:
    return {
        "model": "adapter:sft",
        "reward_model": "rm:multi",
        "dataset": "prompts",
        "eval_split": 0.25,
        "num_updates": 1,
        "batch_size": 4,
        "mini_batch_size": 2,
        "num_generations": 2,
        "response_length": 6,
        "eval_prompts": 2,
        "lora_r": 4,
        "report_to": "none",
        "reward_weights": WEIGHTS,
    } | values


def test_the_reward_is_the_weighted_sum_of_the_heads_named(registry):
    rm = RewardModel.load("rm:multi", registry)
    heads = rm.score_heads(PROMPTS, [[{"role": "assistant", "content": r}] for r in REPLIES])
    assert list(heads) == ["preference", *HEADS] and len(set(heads["helpfulness"] + heads["harmlessness"])) == 4
    expected = [h + 2 * harm for h, harm in zip(heads["helpfulness"], heads["harmlessness"])]
    assert registry_reward_fn("rm:multi", registry, weights=WEIGHTS)(PROMPTS, REPLIES) == pytest.approx(expected)
    # the preference head counts only when named
    with_preference = registry_reward_fn("rm:multi", registry, weights={"preference": 1.0, "harmlessness": 0.5})
    expected = [p + 0.5 * harm for p, harm in zip(heads["preference"], heads["harmlessness"])]
    assert with_preference(PROMPTS, REPLIES) == pytest.approx(expected)
    assert registry_reward_fn("rm:multi", registry)(PROMPTS, REPLIES) == pytest.approx(heads["preference"])

    # The same numbers when the reward model joins the policy's roles as an adapter on the shared base.
    roles, _ = load_roles("adapter:sft", registry, build_config(PPOStageConfig, recipe()))
    shared = registry_reward_fn("rm:multi", registry, roles, weights=WEIGHTS)
    assert "reward" in roles.model.peft_config
    expected = [h + 2 * harm for h, harm in zip(heads["helpfulness"], heads["harmlessness"])]
    assert shared(PROMPTS, REPLIES) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("algo", ["ppo", "rloo", "grpo"])
def test_every_algorithm_trains_on_the_weighted_reward(registry, algo):
    artifact = run_ppo(build_config(PPOStageConfig, recipe(algo=algo, output_name=algo)), registry)
    run = registry.get_run(artifact.run_id)
    assert run.status == "completed" and artifact.meta["reward_weights"] == WEIGHTS
    assert "reward `rm:multi` (helpfulness x 1, harmlessness x 2)" in (run.dir / "report.md").read_text()
    assert run.config["reward_weights"] == WEIGHTS


def test_a_head_the_reward_model_lacks_is_refused_before_anything_starts(registry, capsys):
    config = build_config(PPOStageConfig, recipe(reward_weights={"helpfulness": 1.0, "honesty": 0.5}))
    with pytest.raises(AlignError) as caught:
        run_ppo(config, registry)
    assert str(caught.value).startswith(
        "config key 'reward_weights': 'honesty' (weight 0.5) is not a head of rm:multi@1"
    )
    assert registry.list_runs() == []

    root = str(registry.root)
    code = cli.main(["--workspace", root, "ppo", *flags(recipe()), "--reward_weights", "helpfulness=1,honesty=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "'honesty' (weight 2) is not a head of rm:multi@1, which has the heads preference, helpfulness" in err
    assert "Traceback" not in err
    code = cli.main(["--workspace", root, "ppo", *flags(recipe()), "--reward_weights", "helpfulness=lots"])
    assert code == 2 and "the weight of 'helpfulness' must be a number (got 'lots')" in capsys.readouterr().err
    assert registry.list_runs() == []


def flags(values: dict) -> list[str]:
    return [part for key, value in values.items() if key != "reward_weights" for part in (f"--{key}", str(value))]
