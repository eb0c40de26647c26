"""`align ppo` with `algo: rloo` or `algo: grpo`: TRL's RLOOTrainer / GRPOTrainer, same inputs and outputs.

The policy starts from the SFT adapter (trainable); TRL keeps a frozen copy of it on the same base under the
adapter name "ref" and uses it as the KL reference when `kl_coef` (TRL's `beta`) is above 0. The
registry reward model is the reward function: completions are decoded text, re-tokenised by the reward model
(with `reward_weights`, the weighted sum of its heads).
"""

from __future__ import annotations

from align.config import peft_config_for
from align.distributed import broadcast_from_main, is_main_process, wait_for_everyone
from align.models import load_model
from align.ppo_core import mean_reward, trainer_arguments
from align.ppo_shared import PolicyInputs, finish_policy_run, register_policy, registry_reward_fn, weights_text
from align.reports import history_series, plot_series, write_metrics, write_report
from align.runs import failures_recorded, last_checkpoint, live_metrics_callback


def trl_args(config, output_dir: str):
    """Our PPO config's fields mapped onto TRL's RLOOConfig or GRPOConfig."""
    import torch
    from trl import GRPOConfig, RLOOConfig

    config_class = RLOOConfig if config.algo == "rloo" else GRPOConfig
    return config_class(
        output_dir=output_dir,
        # per_device_train_batch_size is completions per step: batch_size / num_generations prompts
        **trainer_arguments(config),
        num_generations=config.num_generations,
        max_completion_length=config.response_length,
        temperature=config.temperature,
        top_p=config.top_p,
        beta=config.kl_coef,
        num_iterations=config.ppo_epochs,
        epsilon=config.cliprange,
        bf16=bool(config.bf16),
        use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False,
        disable_dropout=True,
    )


def run_trl_algo(config, registry, run, policy: PolicyInputs, versions, *, resume: str | None, reward_fn=None):
    """Train the policy with TRL's RLOOTrainer or GRPOTrainer in the run `align ppo` opened for it (on the inputs it
    checked and the (train, eval) prompt versions it registered), and register it."""
    import datasets
    import peft
    from trl import GRPOTrainer, RLOOTrainer

    train_version, eval_version = versions
    print(f"run {run.id}: {config.algo.upper()} (TRL) of {config.model} against {config.reward_model}")
    with failures_recorded(registry, run):
        base, tokenizer = load_model(policy.start.base, registry, dtype=config.torch_dtype)
        peft_config = None
        if policy.start.adapter_path is not None:
            # TRL copies a trained "default" adapter into a frozen "ref" adapter on the same base itself.
            model = peft.PeftModel.from_pretrained(base, str(policy.start.adapter_path), is_trainable=True)
        else:
            model, peft_config = base, peft_config_for(config)
        score = reward_fn or registry_reward_fn(config.reward_model, registry, weights=config.reward_weights)

        def registry_reward(prompts, completions, **kwargs):
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return score(prompts, texts)

        eval_prompts = [row["prompt"] for row in registry.rows(eval_version)][: config.eval_prompts]
        before = mean_reward(model, tokenizer, eval_prompts, config, score)
        trainer_class = RLOOTrainer if config.algo == "rloo" else GRPOTrainer
        trainer = trainer_class(
            model=model,
            reward_funcs=registry_reward,
            args=trl_args(config, str(run.dir / "checkpoints")),
            train_dataset=datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in registry.rows(train_version)]),
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[live_metrics_callback(run)],
        )
        trainer.train(resume_from_checkpoint=last_checkpoint(run.dir / "checkpoints") if resume else None)
        trained = trainer.model
        after = mean_reward(trained, tokenizer, eval_prompts, config, score)

        # A process that failed stops the main one here, before anything is registered; then only the main process
        # writes, and the others wait for the artifact it registers.
        wait_for_everyone()
        if not is_main_process():
            return broadcast_from_main(None)
        metrics = {"eval_mean_reward_before": before, "eval_mean_reward": after, "updates": trainer.state.global_step}
        artifact = register_policy(
            registry, run, config, trained, tokenizer, policy=policy, versions=versions, metrics=metrics
        )
        log = trainer.state.log_history
        plots = [
            plot_series(run.dir / f"{key.replace('/', '_')}.png", key, {key: history_series(log, key)})
            for key in ("reward", "kl", "loss", "entropy", "completions/mean_length")
        ]
        write_metrics(run, metrics | {"history": log})
        setup = (
            f"TRL {config.algo.upper()} from `{config.model}`, reward `{config.reward_model}`{weights_text(config)}, "
            "prompts "
            f"`{config.dataset}`, {config.num_generations} completions per prompt, beta {config.kl_coef}. "
            f"Output `{artifact.ref}`."
        )
        write_report(run, f"{config.algo.upper()} report", summary=metrics, sections=[("Setup", setup)], plots=plots)
        finish_policy_run(registry, run, artifact, metrics, eval_prompts=len(eval_prompts))
        return broadcast_from_main(artifact)
