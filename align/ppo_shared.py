"""What the two ways `align ppo` trains share (our PPO loop; TRL's RLOO and GRPO): the policy's start and the
reward model, resolved and checked before anything is registered; the reward, a registry reward model as a
function of prompts and decoded responses; and the policy adapter it registers, with its lineage.

When the reward model is a LoRA adapter on the policy's own base, it joins the policy's roles instead of loading
that base again. With `reward_weights` the reward is the weighted sum of the reward model's heads named there
(reward/objectives.py), each checked against the heads the artifact has before anything is registered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from align.errors import AlignError
from align.models import ResolvedModel, resolve_model
from align.ppo_core import RewardFn, SharedBaseRoles, SharedBaseScorer
from align.registry import Artifact, Registry
from reward.objectives import check_reward_weights, head_names


@dataclass(frozen=True)
class PolicyInputs:
    """The models of a PPO config: the policy's start (a base model, or an SFT adapter on one), the base model the
    trained adapter is registered on, and the reward model (None where a reward function stands in for it)."""

    start: ResolvedModel
    base_ref: str
    reward_artifact: Artifact | None


def policy_inputs(config, registry: Registry, reward_fn: RewardFn | None = None) -> PolicyInputs:
    """`model` and `reward_model` of a PPO config, resolved; a reference that does not resolve fails here, and so
    does a `reward_weights` head the reward model lacks."""
    reward_artifact = reward_model_artifact(config.reward_model, registry) if reward_fn is None else None
    if reward_artifact is not None and config.reward_weights:
        check_reward_weights(config.reward_weights, reward_heads(reward_artifact), reward_artifact.ref)
    start, base_ref = policy_start(config.model, registry)
    return PolicyInputs(start, base_ref, reward_artifact)


def policy_start(model_ref: str, registry: Registry) -> tuple[ResolvedModel, str]:
    """(the policy's start resolved, the base model reference its trained adapter is registered on)."""
    resolved = resolve_model(model_ref, registry)
    if resolved.artifact_kind not in (None, "adapter"):
        raise AlignError(f"PPO starts from an SFT adapter or a base model, not {model_ref}")
    base_ref = registry.resolve_artifact(model_ref).base_model if resolved.adapter_path else model_ref
    return resolved, base_ref


def reward_model_artifact(reward_ref: str, registry: Registry):
    """The registry artifact `reward_model` names, refused unless it is a reward model."""
    artifact = registry.resolve_artifact(reward_ref)
    if artifact.kind != "rm":
        raise AlignError(f"reward_model must be a reward model (rm:NAME), not {reward_ref}")
    return artifact


def reward_heads(artifact: Artifact) -> tuple[str, ...]:
    """The heads of a reward model artifact: the preference head, then its attribute heads (align rm --objectives)."""
    return head_names(artifact.meta.get("objectives"))


def weights_text(config) -> str:
    """' (helpfulness x 1, harmlessness x 2)' for a report, '' without reward_weights."""
    if not config.reward_weights:
        return ""
    return " (" + ", ".join(f"{name} x {weight:g}" for name, weight in config.reward_weights.items()) + ")"


def registry_reward_fn(
    reward_ref: str,
    registry: Registry,
    roles: SharedBaseRoles | None = None,
    *,
    weights: dict[str, float] | None = None,
) -> RewardFn:
    """Scores from a registry reward model, on decoded text re-tokenised with the reward model's tokenizer: its
    preference head's, or with `weights` (head -> weight) the weighted sum of the heads named.

    When the reward model is a LoRA adapter on the policy's own base model, it joins the roles as the adapter
    "reward" (plus its score head) instead of loading the base a second time.
    """
    from reward.model import RewardModel

    reward_model = shared_base_reward_model(reward_ref, registry, roles) if roles is not None else None
    if reward_model is None:
        reward_model = RewardModel.load(reward_ref, registry=registry)

    def score(prompts: list[list[dict]], responses: list[str]) -> list[float]:
        completions = [[{"role": "assistant", "content": text}] for text in responses]
        return reward_model.score(prompts, completions, weights=weights)

    return score


def shared_base_reward_model(reward_ref: str, registry: Registry, roles: SharedBaseRoles):
    """The reward model as an adapter on the policy's base, or None when it has another base or adapter type."""
    from safetensors.torch import load_file

    from align.models import load_tokenizer
    from reward.model import DEFAULT_MAX_LENGTH, RewardModel

    artifact = registry.resolve_artifact(reward_ref)
    resolved = resolve_model(reward_ref, registry)
    policy_base = roles.model.get_base_model().config._name_or_path
    adapter_config = json.loads((artifact.path / "adapter_config.json").read_text(encoding="utf-8"))
    if str(resolved.base) != str(policy_base) or adapter_config.get("peft_type") != "LORA":
        return None
    if artifact.meta.get("num_layers") or artifact.meta.get("pooling", "last") != "last":
        return None  # it reads other states than the policy's last layer at the last token: a model of its own
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
    objectives = artifact.meta.get("objectives") or ()
    return RewardModel(scorer, tokenizer, max_length=max_length, ref=artifact.ref, objectives=objectives)


def register_policy(registry, run, config, model, tokenizer, *, policy: PolicyInputs, versions, metrics):
    """Save the trained policy adapter in runs/ID/adapter and register it with its lineage: the prompts it trained
    on and was evaluated on (`versions`), the registry model it started from (its init and reference) and the
    reward model."""
    output_dir = run.dir / "adapter"
    model.save_pretrained(str(output_dir), selected_adapters=["default"])
    tokenizer.save_pretrained(str(output_dir))
    train_version, eval_version = versions
    parents = [(train_version, "prompts"), (eval_version, "eval")]
    if ":" in config.model:
        parents.append((config.model, "init-and-reference"))
    if policy.reward_artifact is not None:
        parents.append((policy.reward_artifact, "reward-model"))
    return registry.register_artifact(
        "adapter",
        config.output_name,
        output_dir,
        base_model=policy.base_ref,
        run=run,
        parents=parents,
        meta={"algo": config.algo, "metrics": metrics}
        | ({"reward_weights": config.reward_weights} if config.reward_weights else {}),
    )


def finish_policy_run(registry, run, artifact, metrics: dict, *, eval_prompts: int) -> None:
    """Mark the run completed, and say what it registered and how the mean reward moved."""
    registry.finish_run(run, metrics=metrics, outputs=[artifact.ref])
    print(
        f"registered {artifact.ref}: mean reward on {eval_prompts} held-out prompts "
        f"{metrics['eval_mean_reward_before']:.3f} -> {metrics['eval_mean_reward']:.3f}; report {run.dir / 'report.md'}"
    )
