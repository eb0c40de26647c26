"""PPO stage: align a policy against a reward model, with LoRA adapters on ONE base model.

    align ppo --config recipes/ppo/smollm2-135m-lora.yaml
    align ppo --config recipes/ppo/smollm2-135m-lora.yaml --num_updates 40 --kl_coef 0.1
    align ppo --config recipes/ppo/smollm2-135m-lora.yaml --resume
    # data-parallel over several processes or GPUs (DDP only; RLOO and GRPO also FSDP and DeepSpeed)
    accelerate launch --config_file recipes/accelerate/ddp.yaml -m align ppo --config recipes/ppo/smollm2-135m-lora.yaml
    # the same inputs and outputs with TRL's trainers instead of our PPO loop:
    align ppo --config recipes/ppo/smollm2-135m-rloo.yaml      (algo: rloo)
    align ppo --config recipes/ppo/smollm2-135m-grpo.yaml      (algo: grpo)
    # with a multi-objective reward model (align rm --objectives): the reward is a weighted sum of its heads
    align ppo --config recipes/ppo/smollm2-135m-grpo.yaml --reward_weights helpfulness=1.0,harmlessness=2.0

TRL 1.16 has no PPOTrainer, so the PPO loop is ours (align/ppo_core.py). One base model in memory serves three
roles, each a PEFT adapter on it:

    default    the policy: trainable LoRA, initialised from the SFT adapter (or fresh on a plain base)
    ref        the reference: the SFT adapter, frozen (on a plain base: the base with adapters disabled)
    value      the value function: its own trainable LoRA plus a scalar head

The reward comes from a registry reward model (`rm:NAME`); text is decoded and re-tokenised for it, so a
reward model with another tokenizer works. With `reward_weights` (head -> weight; every algo) the reward is the
weighted sum of the reward model's heads named there, the preference head (`preference`) only when named
(reward/objectives.py); a head the reward model lacks is refused before anything starts. Each update: sample a
batch of prompts, roll out responses (batched, KV cache), score them, add a per-token KL penalty to the
reference, compute GAE advantages, then run several epochs of clipped-surrogate and clipped-value updates over
minibatches. Each update's numbers go to `report_to` (TensorBoard in runs/ID/logs by default), as the
Trainer-based stages' do.

Where the time goes, and what keeps it down: sampling runs with the policy's LoRA folded into the weights (an
unfolded LoRA slows every decoded token); every forward pass sees chunks of rows without the padding they all
share (HH prompts vary from 20 to 192 tokens); the policy's and the value's backward passes run one after the
other, so only one role's activations are alive at a time.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from align.config import AdapterFields, StageFields, peft_config_for
from align.distributed import (
    broadcast_from_main,
    broadcast_parameters,
    is_main_process,
    launcher,
    wait_for_everyone,
    world_size,
)
from align.errors import AlignError
from align.models import load_model
from align.ppo_core import (
    RewardFn,
    SharedBaseRoles,
    latest_checkpoint,
    load_checkpoint,
    mean_reward,
    mixed_precision,
    ppo_update,
    save_checkpoint,
    trainer_arguments,
)
from align.ppo_shared import (
    finish_policy_run,
    policy_inputs,
    policy_start,
    register_policy,
    registry_reward_fn,
    weights_text,
)
from align.registry import Registry
from align.reports import plot_series, write_metrics, write_report
from align.rl_utils import AdaptiveKLController, FixedKLController, RunningMoments
from align.runs import LoopLoggers, append_live, failures_recorded, open_stage_run, run_recipe, stage_data
from reward.objectives import parse_reward_weights

ALGOS = ("ppo", "rloo", "grpo")


@dataclass
class PPOStageConfig(StageFields, AdapterFields):
    algo: str = field(default="ppo", metadata={"help": "ppo (ours) | rloo | grpo (TRL's trainers)"})
    reward_model: str | None = field(default=None, metadata={"help": "registry reward model, rm:NAME[@V]"})
    reward_weights: dict[str, float] | str | None = field(
        default=None,
        metadata={
            "help": "the reward as a weighted sum of the reward model's heads: {helpfulness: 1.0, harmlessness: "
            "2.0} (helpfulness=1,harmlessness=2 on the command line); `preference` names the pairwise head, "
            "included only when named; null = the preference head alone"
        },
    )
    output_name: str | None = field(default="ppo", metadata={"help": "artifact name: adapter:NAME"})
    seed: int = 0
    # Rollouts
    num_updates: int = field(default=20, metadata={"help": "PPO updates (each: one batch of rollouts)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per rollout batch"})
    response_length: int = field(default=32, metadata={"help": "max new tokens per response"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompts are cut from the left to this"})
    temperature: float = 0.7
    top_p: float = 1.0
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "subtracted when no EOS"})
    reward_norm: bool = field(default=False, metadata={"help": "divide scores by their running std"})
    reward_clip: float | None = field(default=10.0, metadata={"help": "clip scores to [-c, c]"})
    # KL to the reference
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = field(default=6.0, metadata={"help": "adaptive KL: target KL per response"})
    kl_horizon: int = 10000
    # Update
    learning_rate: float = 5e-5
    ppo_epochs: int = 2
    mini_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    # Bookkeeping
    save_steps: int = field(default=10, metadata={"help": "checkpoint every N updates (what --resume continues)"})
    eval_prompts: int = field(default=16, metadata={"help": "held-out prompts scored before and after"})
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "tensorboard, none, ...: where each update's numbers are logged"}
    )
    num_generations: int = field(default=4, metadata={"help": "rloo/grpo: completions per prompt"})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast (weights stay in torch_dtype); null: on where bf16 is native to the hardware"},
    )

    def __post_init__(self):
        self.check_stage_fields()
        self.check_adapter_fields()
        if self.algo not in ALGOS:
            raise ValueError(f"config key 'algo' must be one of {', '.join(ALGOS)} (got {self.algo!r})")
        if not self.reward_model:
            raise ValueError("config key 'reward_model' is required: a registry reward model, rm:NAME[@V]")
        self.reward_weights = parse_reward_weights(self.reward_weights)
        if self.peft != "lora":
            raise ValueError(f"config key 'peft' must be lora for PPO (got {self.peft!r}): the roles are LoRA adapters")
        for key in (
            "num_updates",
            "batch_size",
            "response_length",
            "ppo_epochs",
            "mini_batch_size",
            "gradient_accumulation_steps",
            "save_steps",
            "max_prompt_length",
            "num_generations",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"config key '{key}' must be at least 1 (got {getattr(self, key)!r})")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"config key 'mini_batch_size' ({self.mini_batch_size}) must divide batch_size ({self.batch_size})"
            )
        if self.algo != "ppo" and self.batch_size % self.num_generations:
            raise ValueError(
                f"config key 'num_generations' ({self.num_generations}) must divide batch_size "
                f"({self.batch_size}): rloo/grpo batches hold whole groups of completions"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError("config key 'gradient_accumulation_steps' must divide mini_batch_size")
        processes = world_size()  # under a launcher the batches are split across processes, not multiplied
        if processes > 1:
            keys = ("batch_size", "mini_batch_size") if self.algo == "ppo" else ("batch_size",)
            for key in keys:
                if getattr(self, key) % processes:
                    raise ValueError(
                        f"config key '{key}' ({getattr(self, key)}) is split across the {processes} processes of "
                        f"this launch, so it must be a multiple of {processes}"
                    )
            if self.algo == "ppo" and (self.mini_batch_size // processes) % self.gradient_accumulation_steps:
                raise ValueError(
                    f"config key 'gradient_accumulation_steps' ({self.gradient_accumulation_steps}) must divide each "
                    f"process's share of mini_batch_size ({self.mini_batch_size} / {processes} processes)"
                )
        for key in ("learning_rate", "kl_coef", "vf_coef"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key '{key}' must be 0 or more (got {getattr(self, key)!r})")
        if not 0 < self.temperature:
            raise ValueError(f"config key 'temperature' must be above 0 (got {self.temperature!r})")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise ValueError("config keys 'gamma' and 'lam' must be in [0, 1]")


def run_ppo(
    config: PPOStageConfig,
    registry: Registry,
    *,
    recipe: dict | None = None,
    resume: str | None = None,
    reward_fn: RewardFn | None = None,
    stop_after: int | None = None,
):
    """Train and register the policy adapter: our PPO loop, or TRL's with `algo: rloo|grpo` (align/ppo_trl.py), from
    the same checked inputs and run. `reward_fn` replaces the reward model (tests);
    `stop_after` ends the process after that many updates, as a kill would (tests of --resume)."""
    # Everything that can be wrong with the inputs fails here, before anything is registered or loaded.
    if config.algo == "ppo" and launcher() in ("FSDP", "DeepSpeed"):
        raise AlignError(
            f"our PPO loop (algo: ppo) is data-parallel only: it does not run under {launcher()}. Launch it with "
            "plain DDP (accelerate launch --multi_gpu, or recipes/accelerate/ddp.yaml), or use algo: rloo or grpo"
        )
    data = stage_data(registry, config, kind="prompts")
    policy = policy_inputs(config, registry, reward_fn)

    versions = data.split(registry)  # (train, eval)
    train_version, eval_version = versions
    inputs = [train_version.ref, eval_version.ref, config.model, config.reward_model]
    run = open_stage_run(registry, "ppo", config, inputs=inputs, recipe=recipe, resume=resume)
    if config.algo != "ppo":
        from align.ppo_trl import run_trl_algo

        return run_trl_algo(config, registry, run, policy, versions, resume=resume, reward_fn=reward_fn)

    print(f"run {run.id}: PPO of {config.model} against {config.reward_model} on {train_version.ref}")
    with failures_recorded(registry, run):
        torch.manual_seed(config.seed)
        roles, _ = load_roles(config.model, registry, config)
        broadcast_parameters(roles.trainable_parameters())  # every process starts from the main one's weights
        if reward_fn is None:
            reward_fn = registry_reward_fn(config.reward_model, registry, roles, weights=config.reward_weights)
        train_prompts = [row["prompt"] for row in registry.rows(train_version)]
        eval_prompts = [row["prompt"] for row in registry.rows(eval_version)][: config.eval_prompts]
        optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=config.learning_rate)
        kl = (
            AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
            if config.adaptive_kl
            else FixedKLController(config.kl_coef)
        )
        moments = RunningMoments()
        history: list[dict] = []
        start = 0
        checkpoints = run.dir / "checkpoints"
        if resume and latest_checkpoint(checkpoints):
            start = load_checkpoint(latest_checkpoint(checkpoints), roles, optimizer, kl, moments, history)
            print(f"resumed from update {start}")

        if start == 0:
            with mixed_precision(config, roles.model.device):
                before = mean_reward(roles.model, roles.tokenizer, eval_prompts, config, reward_fn)
        else:
            before = history[0]["eval_before"]
        from tqdm.auto import tqdm

        # Under a launcher every process runs the loop on its share of each update's prompts; only the main one
        # logs, writes the live metrics and saves the checkpoints (the trainable state is the same on all).
        main = is_main_process()
        quiet = {} if main else {"disable": True}  # (TQDM_DISABLE still applies to the main process's bar)
        progress = tqdm(total=config.num_updates, initial=start, desc="ppo", unit="update", **quiet)
        with progress, loggers_for(config, run, roles.model) if main else nullcontext() as loggers:
            for update in range(start, config.num_updates):
                with mixed_precision(config, roles.model.device):
                    stats = ppo_update(roles, optimizer, kl, moments, train_prompts, config, reward_fn, update)
                if update == 0:
                    stats["eval_before"] = before
                history.append(stats)
                progress.update(1)
                progress.set_postfix(score=f"{stats['objective/scores']:.3f}", kl=f"{stats['objective/kl']:.3f}")
                if main:
                    append_live(run.dir, update + 1, stats)
                    loggers.log(update + 1, stats)
                if main and ((update + 1) % config.save_steps == 0 or update + 1 == config.num_updates):
                    save_checkpoint(
                        checkpoints / f"update-{update + 1}", roles, optimizer, kl, moments, history, update + 1
                    )
                if stop_after is not None and update + 1 >= stop_after and update + 1 < config.num_updates:
                    raise KeyboardInterrupt(f"stopped after update {update + 1}")
        with mixed_precision(config, roles.model.device):
            after = mean_reward(roles.model, roles.tokenizer, eval_prompts, config, reward_fn)

        # A process that failed stops the main one here, before anything is registered; then only the main process
        # writes, and the others wait for the artifact it registers.
        wait_for_everyone()
        if not main:
            return broadcast_from_main(None)
        metrics = {
            "eval_mean_reward_before": before,
            "eval_mean_reward": after,
            "updates": config.num_updates,
            "final_kl_coef": kl.value,
            **{f"last/{k}": v for k, v in history[-1].items() if k != "eval_before"},
        }
        artifact = register_policy(
            registry, run, config, roles.model, roles.tokenizer, policy=policy, versions=versions, metrics=metrics
        )
        _report(run, config, history, metrics, artifact)
        finish_policy_run(registry, run, artifact, metrics, eval_prompts=len(eval_prompts))
        return broadcast_from_main(artifact)


def load_roles(start_ref: str, registry: Registry, config: PPOStageConfig) -> tuple[SharedBaseRoles, str]:
    """Load the base once and put the roles on it. Returns (roles, base model reference)."""
    resolved, base_ref = policy_start(start_ref, registry)
    base, tokenizer = load_model(resolved.base, registry, dtype=config.torch_dtype)
    roles = SharedBaseRoles.on_base(base, tokenizer, peft_config_for(config), adapter_path=resolved.adapter_path)
    return roles, base_ref


def loggers_for(config: PPOStageConfig, run, model) -> LoopLoggers:
    """`report_to` for our loop: one log entry per update, with the settings a Trainer's arguments have too."""
    return LoopLoggers(str(run.dir / "checkpoints"), model=model, **trainer_arguments(config))


def _report(run, config, history, metrics, artifact) -> None:
    plots = []
    for key, title in (
        ("objective/scores", "raw reward-model score"),
        ("objective/rlhf_reward", "RLHF reward"),
        ("objective/kl", "KL to the reference"),
        ("loss/value", "value loss"),
        ("policy/clipfrac", "clip fraction"),
        ("policy/approx_kl", "approx KL (old -> new)"),
        ("policy/entropy", "entropy"),
        ("response_length", "response length"),
    ):
        name = key.replace("/", "_")
        plots.append(
            plot_series(
                run.dir / f"{name}.png", title, {title: [(h["update"], h[key]) for h in history]}, xlabel="update"
            )
        )
    write_metrics(run, metrics | {"history": history})
    setup = (
        f"Policy from `{config.model}`, reward `{config.reward_model}`{weights_text(config)}, prompts "
        f"`{config.dataset}`; "
        f"{config.num_updates} updates of {config.batch_size} rollouts ({config.response_length} tokens), "
        f"{config.ppo_epochs} epochs of minibatch {config.mini_batch_size}; KL coefficient {config.kl_coef}"
        f"{' (adaptive)' if config.adaptive_kl else ''}. Output `{artifact.ref}`."
    )
    summary = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    write_report(run, "PPO report", summary=summary, sections=[("Setup", setup)], plots=plots)


def main(
    config_path: str | None, overrides: list[str], *, workspace: str | None = None, resume: str | bool | None = None
):
    """`align ppo`: the recipe plus overrides, or on --resume the recipe the run started with."""
    return run_recipe("ppo", PPOStageConfig, run_ppo, config_path, overrides, workspace=workspace, resume=resume)
