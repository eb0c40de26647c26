"""Our PPO loop end to end on a tiny model with a synthetic reward: learning, lr=0, resume, one base model."""

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from align.config import build_config
from align.errors import AlignError
from align.ppo import PPOStageConfig, main, run_ppo
from align.registry import Registry


def lowercase_letters(prompts, responses):
    """Synthetic reward: how many lowercase ASCII letters the reply holds."""
    return [float(sum(ch.isascii() and ch.islower() for ch in text)) for text in responses]


@pytest.fixture
def registry(tmp_path, tiny_policy_dir):
    registry = Registry(tmp_path / "ws")
    prompts = [{"prompt": [{"role": "user", "content": f"write something {i}"}]} for i in range(12)]
    registry.register(prompts, name="prompts", kind="prompts")
    # An "SFT adapter" to start from: a LoRA with non-zero weights on the tiny base.
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    torch.manual_seed(1)
    sft = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    sft.save_pretrained(tmp_path / "sft")
    registry.register_artifact("adapter", "sft", tmp_path / "sft", base_model=str(tiny_policy_dir))
    return registry


def recipe(tiny_policy_dir, **values):
    return {
        "model": "adapter:sft",
        "reward_model": "rm:synthetic",
        "dataset": "prompts",
        "eval_split": 0.25,
        "num_updates": 4,
        "batch_size": 8,
        "mini_batch_size": 4,
        "response_length": 8,
        "temperature": 1.0,
        "learning_rate": 1e-2,
        "kl_coef": 0.01,
        "eval_prompts": 3,
        "lora_r": 4,
        "lora_dropout": 0.0,
        "save_steps": 2,
    } | values


def test_policy_learns_a_synthetic_reward(registry, tiny_policy_dir):
    values = recipe(tiny_policy_dir, num_updates=10, learning_rate=3e-2, model=str(tiny_policy_dir))
    config = build_config(PPOStageConfig, values)
    artifact = run_ppo(config, registry, reward_fn=lowercase_letters)
    history = registry.get_run(artifact.run_id).metrics
    run = registry.get_run(artifact.run_id)
    scores = [h["objective/scores"] for h in load_history(run)]
    assert len(scores) == 10
    early, late = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert late > early + 1.0, scores  # ~0.8 letters in 8 random tokens at first
    assert history["eval_mean_reward"] > history["eval_mean_reward_before"]
    for name in (
        "report.md",
        "objective_kl.png",
        "objective_scores.png",
        "loss_value.png",
        "policy_clipfrac.png",
        "policy_entropy.png",
        "response_length.png",
    ):
        assert (run.dir / name).is_file(), name
    assert artifact.base_model == str(tiny_policy_dir)


def load_history(run):
    import json

    return json.loads((run.dir / "metrics.json").read_text())["history"]


def logged_scalars(log_dir) -> dict[str, list[int]]:
    """The steps of each scalar TensorBoard holds under `log_dir` (every event file in it)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[str, list[int]] = {}
    for events in sorted(log_dir.glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(event.step for event in accumulator.Scalars(tag))
    return steps


def test_each_update_is_logged_to_report_to(registry, tiny_policy_dir):
    """report_to as in the Trainer-based stages: TensorBoard in runs/ID/logs by default, nothing with none."""
    config = build_config(PPOStageConfig, recipe(tiny_policy_dir, num_updates=2, learning_rate=0.0))
    assert config.report_to == "tensorboard"
    run = registry.get_run(run_ppo(config, registry, reward_fn=lowercase_letters).run_id)
    scalars = logged_scalars(run.dir / "logs")
    assert scalars["train/objective/scores"] == [1, 2] and scalars["train/loss/policy"] == [1, 2], scalars
    assert scalars["eval/before"] == [1]  # the held-out mean reward before training, logged with update 1

    quiet = build_config(PPOStageConfig, recipe(tiny_policy_dir, num_updates=1, report_to="none", output_name="q"))
    run = registry.get_run(run_ppo(quiet, registry, reward_fn=lowercase_letters).run_id)
    assert not (run.dir / "logs").exists()
    with pytest.raises(AlignError, match="'report_to': nowhere is not supported"):
        build_config(PPOStageConfig, recipe(tiny_policy_dir, report_to="nowhere"))


def test_learning_rate_zero_leaves_the_policy_and_kl_at_zero(registry, tiny_policy_dir):
    config = build_config(PPOStageConfig, recipe(tiny_policy_dir, learning_rate=0.0, num_updates=2))
    artifact = run_ppo(config, registry, reward_fn=lowercase_letters)
    history = load_history(registry.get_run(artifact.run_id))
    assert all(h["objective/kl"] == 0.0 for h in history)
    before = load_file(registry.resolve_artifact("adapter:sft").path / "adapter_model.safetensors")
    after = load_file(artifact.path / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_bf16_autocast_runs_the_update_and_keeps_lr_zero_exact(registry, tiny_policy_dir):
    autocast_seen = []

    def reward(prompts, responses):
        autocast_seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return lowercase_letters(prompts, responses)

    config = build_config(PPOStageConfig, recipe(tiny_policy_dir, learning_rate=0.0, num_updates=2, bf16=True))
    artifact = run_ppo(config, registry, reward_fn=reward)
    assert autocast_seen and all(autocast_seen)  # rollouts, updates and the before/after means
    history = load_history(registry.get_run(artifact.run_id))
    # old, reference and new log-probs come from the same bf16 passes, so the KL is still exactly 0
    assert all(h["objective/kl"] == 0.0 for h in history)
    after = load_file(artifact.path / "adapter_model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in after.values())  # the weights stay fp32


def test_resume_matches_an_uninterrupted_run(tmp_path, registry, tiny_policy_dir, assert_same_adapter):
    straight = run_ppo(build_config(PPOStageConfig, recipe(tiny_policy_dir)), registry, reward_fn=lowercase_letters)

    values = recipe(tiny_policy_dir, output_name="resumed")
    with pytest.raises(KeyboardInterrupt):
        run_ppo(
            build_config(PPOStageConfig, values), registry, recipe=values, reward_fn=lowercase_letters, stop_after=2
        )
    killed = registry.list_runs()[-1]
    assert killed.status == "failed" and (killed.dir / "checkpoints" / "update-2").is_dir()
    config = build_config(PPOStageConfig, values)
    resumed = run_ppo(config, registry, recipe=values, resume=killed.id, reward_fn=lowercase_letters)
    assert_same_adapter(straight, resumed)


@pytest.fixture
def model_loads(monkeypatch) -> list:
    """What from_pretrained loads during the test, in order."""
    from transformers import PreTrainedModel

    loads = []
    original = PreTrainedModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting))
    return loads


def test_the_base_model_is_loaded_once(registry, tiny_policy_dir, model_loads):
    run_ppo(build_config(PPOStageConfig, recipe(tiny_policy_dir, num_updates=1)), registry, reward_fn=lowercase_letters)
    assert model_loads == [str(tiny_policy_dir)], model_loads


def test_bad_inputs_fail_before_any_model_loads(registry, tiny_policy_dir):
    with pytest.raises(AlignError, match="'reward_model' is required"):
        build_config(PPOStageConfig, {"dataset": "prompts"})
    with pytest.raises(AlignError, match="must divide batch_size"):
        build_config(PPOStageConfig, recipe(tiny_policy_dir, mini_batch_size=3))
    with pytest.raises(AlignError, match="no artifact 'rm:missing'"):
        run_ppo(build_config(PPOStageConfig, recipe(tiny_policy_dir, reward_model="rm:missing")), registry)
    with pytest.raises(AlignError, match="holds 'prompts' rows"):
        registry.resolve("prompts", kind="sft")
    with pytest.raises(AlignError, match="unknown config key 'kl_coeff'"):
        main(None, ["--dataset", "prompts", "--reward_model", "rm:x", "--kl_coeff", "1"], workspace=str(registry.root))
    assert registry.list_runs() == []


@pytest.mark.parametrize("algo", ["rloo", "grpo"])
def test_trl_algorithms_take_the_same_inputs_and_register_an_adapter(registry, tiny_policy_dir, algo):
    values = recipe(tiny_policy_dir, algo=algo, num_updates=2, batch_size=4, num_generations=2, output_name=algo)
    artifact = run_ppo(build_config(PPOStageConfig, values), registry, reward_fn=lowercase_letters)
    assert artifact.ref == f"{algo}:{algo}@1".replace(f"{algo}:", "adapter:", 1)
    assert (artifact.path / "adapter_model.safetensors").is_file()
    assert artifact.base_model == str(tiny_policy_dir)
    run = registry.get_run(artifact.run_id)
    assert run.status == "completed" and run.metrics["updates"] == 2
    roles = {role for role, _ in registry.parents(artifact)}
    assert {"prompts", "init-and-reference", "base-model", "produced-by"} <= roles
    rewards_logged = [entry["step"] for entry in load_history(run) if "reward" in entry]
    assert rewards_logged and logged_scalars(run.dir / "logs")["train/reward"] == rewards_logged  # report_to


@pytest.fixture
def reward_artifact(registry, tiny_policy_dir, tmp_path):
    """A reward model on the policy's own base: a SEQ_CLS LoRA with its score head, as `align rm` saves it."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_policy_dir, num_labels=1)
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules="all-linear", init_lora_weights=False, modules_to_save=["score"]
    )
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "rm")
    return registry.register_artifact("rm", "tiny-rm", tmp_path / "rm", base_model=str(tiny_policy_dir))


def test_a_reward_model_on_the_same_base_is_an_adapter_with_identical_scores(
    registry, tiny_policy_dir, reward_artifact
):
    from align.ppo import load_roles
    from align.ppo_shared import registry_reward_fn
    from reward.model import RewardModel

    config = build_config(PPOStageConfig, recipe(tiny_policy_dir, reward_model="rm:tiny-rm"))
    roles, _ = load_roles("adapter:sft", registry, config)
    shared = registry_reward_fn("rm:tiny-rm", registry, roles)
    assert "reward" in roles.model.peft_config
    prompts = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "a longer question?"}]]
    replies = ["fine", "a rather longer reply with more words"]
    separate = RewardModel.load("rm:tiny-rm", registry=registry).score(
        prompts, [[{"role": "assistant", "content": r}] for r in replies]
    )
    assert shared(prompts, replies) == pytest.approx(separate, abs=1e-5)
    assert roles.model.active_adapter == "default"
    assert not any(p.requires_grad for n, p in roles.model.named_parameters() if ".reward." in n)


def test_a_reward_model_reading_a_middle_layer_is_loaded_as_its_own_model(registry, tiny_policy_dir, tmp_path):
    """A reward model with num_layers or reply_mean pooling reads other states than the policy's last layer at the
    last token: PPO scores with it as `align rm eval` does, not through the shared base."""
    from transformers import AutoModelForSequenceClassification

    from align.ppo import load_roles
    from align.ppo_shared import registry_reward_fn
    from reward.model import RewardModel

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_policy_dir, num_labels=1)
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear", modules_to_save=["score"])
    peft.get_peft_model(model, lora).save_pretrained(tmp_path / "rm")
    meta = {"num_layers": 1, "pooling": "reply_mean"}
    registry.register_artifact("rm", "mid-rm", tmp_path / "rm", base_model=str(tiny_policy_dir), meta=meta)
    config = build_config(PPOStageConfig, recipe(tiny_policy_dir, reward_model="rm:mid-rm"))
    roles, _ = load_roles("adapter:sft", registry, config)
    score = registry_reward_fn("rm:mid-rm", registry, roles)
    assert "reward" not in roles.model.peft_config
    prompts = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "a longer question?"}]]
    replies = ["fine", "a rather longer reply with more words"]
    separate = RewardModel.load("rm:mid-rm", registry=registry)
    assert separate.pooling == "reply_mean" and len(separate.model.get_base_model().model.layers) == 1
    expected = separate.score(prompts, [[{"role": "assistant", "content": r}] for r in replies])
    assert score(prompts, replies) == pytest.approx(expected, abs=1e-6)


def test_ppo_with_a_registry_reward_model_loads_the_base_once(registry, tiny_policy_dir, reward_artifact, model_loads):
    artifact = run_ppo(
        build_config(PPOStageConfig, recipe(tiny_policy_dir, reward_model="rm:tiny-rm", num_updates=1)), registry
    )
    assert model_loads == [str(tiny_policy_dir)], model_loads
    roles = {role: parent for role, parent in registry.parents(artifact)}
    assert roles["reward-model"].ref == "rm:tiny-rm@1"


def test_sampling_with_the_lora_folded_in_changes_nothing_after(registry, tiny_policy_dir):
    """Folding the policy's LoRA into the weights for sampling gives the unfolded policy's logits, and the base
    weights come back bit for bit (not W + BA - BA)."""
    from align.ppo import load_roles
    from align.ppo_core import folded_lora

    roles, _ = load_roles("adapter:sft", registry, build_config(PPOStageConfig, recipe(tiny_policy_dir)))
    model = roles.model
    ids = torch.tensor([[5, 9, 17, 3, 11]])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unfolded = model(input_ids=ids).logits
        with folded_lora(model):
            folded = model(input_ids=ids).logits
            assert not any(torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
        bare = roles.model.get_base_model()
        with model.disable_adapter():
            base_only = bare(input_ids=ids).logits
    torch.testing.assert_close(folded, unfolded, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(folded, base_only, atol=1e-3)  # the SFT adapter does change the logits
    for name, parameter in model.named_parameters():
        if name in before:
            assert torch.equal(parameter, before[name]), name
    assert model.active_adapter == "default"
    assert all(p.requires_grad for n, p in model.named_parameters() if ".default." in n)


def test_the_policy_trains_without_the_sft_adapters_dropout(tmp_path, registry, tiny_policy_dir):
    """An SFT adapter trained with LoRA dropout: the policy made from it follows the PPO config's dropout (0), so
    two training-mode passes at the same weights agree, and the ratio starts at exactly 1."""
    from align.ppo import load_roles

    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    lora = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.5)
    peft.get_peft_model(base, lora).save_pretrained(tmp_path / "sft-dropout")
    registry.register_artifact("adapter", "sft-dropout", tmp_path / "sft-dropout", base_model=str(tiny_policy_dir))
    config = build_config(PPOStageConfig, recipe(tiny_policy_dir, model="adapter:sft-dropout"))
    roles, _ = load_roles("adapter:sft-dropout", registry, config)
    ids = torch.tensor([[5, 9, 17, 3, 11, 12, 13]])
    mask = torch.ones_like(ids)
    roles.model.train()
    with torch.no_grad():
        first = roles.logprobs("default", ids, mask, 3, 1.0)
        second = roles.logprobs("default", ids, mask, 3, 1.0)
    assert torch.equal(first, second)
    assert roles.model.peft_config["default"].lora_dropout == 0.0
    assert roles.model.peft_config["ref"].lora_dropout == 0.5  # the frozen reference is never in a training pass


def test_chunks_drop_the_padding_every_row_shares_and_keep_the_logprobs(registry, tiny_policy_dir):
    from align.ppo import load_roles
    from align.ppo_core import Rollout, chunks

    roles, _ = load_roles("adapter:sft", registry, build_config(PPOStageConfig, recipe(tiny_policy_dir)))
    # Prompts of 2, 3 and 6 tokens left-padded to 6; responses of 1, 2 and 4 tokens right-padded to 4 (pad 0).
    prompts = [[0, 0, 0, 0, 7, 8], [0, 0, 0, 4, 5, 6], [9, 10, 11, 12, 13, 14]]
    responses = [[21, 0, 0, 0], [22, 23, 0, 0], [24, 25, 26, 27]]
    response_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float)
    prompt_mask = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1], [1] * 6])
    batch = Rollout(
        sequences=torch.tensor([p + r for p, r in zip(prompts, responses)]),
        attention_mask=torch.cat([prompt_mask, response_mask.long()], dim=1),
        response_mask=response_mask,
        prompt_length=6,
        responses=["", "", ""],
        scores=torch.zeros(3),
        contains_eos=torch.ones(3, dtype=torch.bool),
    )
    pieces = list(chunks(batch, [0, 1, 2], 2))
    assert [rows for rows, _ in pieces] == [[0, 1], [2]]
    first = pieces[0][1]
    # Rows 0 and 1 share 3 columns of left padding and 2 of right padding: 3 prompt + 2 response columns stay.
    assert (first.prompt_length, first.width) == (3, 2)
    assert first.sequences.tolist() == [[0, 7, 8, 21, 0], [4, 5, 6, 22, 23]]
    assert (pieces[1][1].prompt_length, pieces[1][1].width) == (6, 4)
    with torch.no_grad():
        whole = roles.logprobs("default", batch.sequences, batch.attention_mask, 6, 1.0)
        for rows, chunk in pieces:
            part = roles.logprobs("default", *chunk.inputs, 1.0)
            torch.testing.assert_close(
                part * response_mask[rows, : chunk.width],
                whole[rows, : chunk.width] * response_mask[rows, : chunk.width],
                atol=1e-5,
                rtol=1e-5,
            )
