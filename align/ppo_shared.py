"""What the two ways `align ppo` trains share (our PPO loop; TRL's RLOO and GRPO): the reward, a registry reward
model as a function of prompts and decoded responses, and the policy adapter it registers, with its lineage.

The reward model is resolved and checked before a run opens; when it is a LoRA adapter on the policy's own base,
it joins the policy's roles instead of loading that base again.
"""

from __future__ import annotations

import json

from align.errors import AlignError
from align.ppo_core import RewardFn, SharedBaseRoles, SharedBaseScorer
from align.registry import Registry


def reward_model_artifact(reward_ref: str, registry: Registry):
    """The registry artifact `reward_model` names, refused unless it is a reward model."""
    artifact = registry.resolve_artifact(reward_ref)
    if artifact.kind != "rm":
        raise AlignError(f"reward_model must be a reward model (rm:NAME), not {reward_ref}")
    return artifact


def registry_reward_fn(reward_ref: str, registry: Registry, roles: SharedBaseRoles | None = None) -> RewardFn:
    """Scores from a registry reward model, on decoded text re-tokenised with the reward model's tokenizer.

    When the reward model is a LoRA adapter on the policy's own base model, it joins the roles as the adapter
    "reward" (plus its score head) instead of loading the base a second time.
    """
    from reward.model import RewardModel

    reward_model = shared_base_reward_model(reward_ref, registry, roles) if roles is not None else None
    if reward_model is None:
        reward_model = RewardModel.load(reward_ref, registry=registry)

    def score(prompts: list[list[dict]], responses: list[str]) -> list[float]:
        completions = [[{"role": "assistant", "content": text}] for text in responses]
        return reward_model.score(prompts, completions)

    return score


def shared_base_reward_model(reward_ref: str, registry: Registry, roles: SharedBaseRoles):
    """The reward model as an adapter on the policy's base, or None when it has another base or adapter type."""
    from safetensors.torch import load_file

    from align.models import load_tokenizer, resolve_model
    from reward.model import DEFAULT_MAX_LENGTH, RewardModel

    artifact = registry.resolve_artifact(reward_ref)
    resolved = resolve_model(reward_ref, registry)
    policy_base = roles.model.get_base_model().config._name_or_path
    adapter_config = json.loads((artifact.path / "adapter_config.json").read_text(encoding="utf-8"))
    if str(resolved.base) != str(policy_base) or adapter_config.get("peft_type") != "LORA":
        return None
    weights = load_file(str(artifact.path / "adapter_model.safetensors"))
    score = [tensor for name, tensor in weights.items() if name.endswith("score.weight")]
    if len(score) != 1:
        return None
    roles.model.load_adapter(str(artifact.path), adapter_name="reward", is_trainable=False)
    roles.frozen_adapters.append("reward")
    roles.use("default")
    tokenizer = load_tokenizer(reward_ref, registry)
    scorer = SharedBaseScorer(roles, score[0], tokenizer.pad_token_id)
    max_length = artifact.meta.get("max_length") or DEFAULT_MAX_LENGTH
    print(f"reward model {artifact.ref} shares the policy's base: loaded as an adapter, not a second model")
    return RewardModel(scorer, tokenizer, max_length=max_length, ref=artifact.ref)


def register_policy(registry, run, config, output_dir, *, base_model, versions, reward_artifact, from_adapter, metrics):
    """Register the trained policy adapter (saved in `output_dir`) with its lineage: the prompts it trained on and
    was evaluated on (`versions`), the starting adapter (its init and reference) and the reward model."""
    train_version, eval_version = versions
    parents = [(train_version, "prompts"), (eval_version, "eval")]
    if from_adapter:
        parents.append((config.model, "init-and-reference"))
    if reward_artifact is not None:
        parents.append((reward_artifact, "reward-model"))
    return registry.register_artifact(
        "adapter",
        config.output_name,
        output_dir,
        base_model=base_model,
        run=run,
        parents=parents,
        meta={"algo": config.algo, "metrics": metrics},
    )
