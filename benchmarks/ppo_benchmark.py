"""PPO benchmark: our shared-base PPO against the same updates with four separately loaded models.

    .venv/bin/python benchmarks/ppo_benchmark.py                 # SmolLM2, batch 8, response 32, 4 updates
    .venv/bin/python benchmarks/ppo_benchmark.py --updates 6 --batch-size 8 --response-length 32

Printed side by side, all measured in this one run (each variant in its own process, so peak memory is its own):
  - seconds per PPO update and peak RSS: ours (policy, reference, value and reward as adapters on one base)
    against four separately loaded models (policy, reference, value, reward);
  - rollout tokens/s of our PEFT policy against plain batched `generate` on the bare base model.
The peer figures of TRL 1.9's experimental PPOTrainer on this machine (24.3 s per update, 6.1 GB peak RSS, same
shape: SmolLM2, LoRA policy, separate value and reward models, batch 8, response length 32) are quoted from
the issue: TRL 1.16 no longer ships a PPOTrainer to run beside ours.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"
TRL_19 = {"seconds_per_update": 24.3, "peak_rss_gb": 6.1}


def prepare(workspace: Path) -> None:
    """A registry with HH prompts, an SFT-like adapter and a reward model on the embedded SmolLM2."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.models import embedded_checkpoint
    from align.registry import Registry

    registry = Registry(workspace)
    registry.import_file(HH, name="hh")
    registry.convert("hh", name="hh-prompts", kind="prompts")
    base = str(embedded_checkpoint())
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(workspace / "sft")
    registry.register_artifact("adapter", "sft", workspace / "sft", base_model="smollm2-135m")
    scorer = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm_lora = peft.LoraConfig(task_type="SEQ_CLS", r=16, target_modules="all-linear", modules_to_save=["score"])
    peft.get_peft_model(scorer, rm_lora).save_pretrained(workspace / "rm")
    registry.register_artifact("rm", "rm", workspace / "rm", base_model="smollm2-135m")


def config_for(args):
    from align.config import build_config
    from align.ppo import PPOStageConfig

    return build_config(
        PPOStageConfig,
        {
            "model": "adapter:sft",
            "reward_model": "rm:rm",
            "dataset": "hh-prompts",
            "batch_size": args.batch_size,
            "mini_batch_size": args.batch_size // 2,
            "response_length": args.response_length,
            "ppo_epochs": 2,
            "max_prompt_length": 192,
            "lora_dropout": 0.0,
            "temperature": 0.7,
        },
    )


class FourModelRoles:
    """The peer layout: policy, reference and value as three separately loaded models (the reward is a fourth)."""

    def __init__(self, registry, config):
        import peft
        import torch
        from transformers import AutoModelForCausalLM

        from align.config import peft_config_for
        from align.models import load_tokenizer, resolve_model

        resolved = resolve_model(config.model, registry)
        self.tokenizer = load_tokenizer(resolved)
        adapter = str(resolved.adapter_path)
        self.model = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(resolved.base), adapter, is_trainable=True
        )
        self.reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolved.base), adapter)
        self.reference.requires_grad_(False)
        self.value_model = peft.get_peft_model(
            AutoModelForCausalLM.from_pretrained(resolved.base), peft_config_for(config)
        )
        self.value_head = torch.nn.Linear(self.value_model.config.hidden_size, 1)

    def use(self, adapter):
        pass

    def trainable_parameters(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        params += [p for p in self.value_model.parameters() if p.requires_grad]
        return params + list(self.value_head.parameters())

    @staticmethod
    def _hidden(model, sequences, attention_mask, prompt_length):
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        inner = model.get_base_model().base_model
        out = inner(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids)
        return out.last_hidden_state[:, prompt_length - 1 : -1]

    def _logprobs(self, model, sequences, attention_mask, prompt_length, temperature, with_entropy=False):
        import torch

        from align.rl_utils import entropy_from_logits

        hidden = self._hidden(model, sequences, attention_mask, prompt_length)
        logits = model.get_base_model().get_output_embeddings()(hidden).float() / temperature
        logprobs = torch.log_softmax(logits, -1).gather(-1, sequences[:, prompt_length:].unsqueeze(-1)).squeeze(-1)
        return (logprobs, entropy_from_logits(logits)) if with_entropy else logprobs

    def logprobs(self, adapter, sequences, attention_mask, prompt_length, temperature, with_entropy=False):
        return self._logprobs(self.model, sequences, attention_mask, prompt_length, temperature, with_entropy)

    def reference_logprobs(self, sequences, attention_mask, prompt_length, temperature):
        return self._logprobs(self.reference, sequences, attention_mask, prompt_length, temperature)

    def values(self, sequences, attention_mask, prompt_length):
        hidden = self._hidden(self.value_model, sequences, attention_mask, prompt_length)
        return self.value_head(hidden).squeeze(-1)


def run_variant(args) -> dict:
    """One variant in this process: time `--updates` PPO updates (the first is warm-up) and report peak RSS."""
    import torch

    from align.ppo import SharedBaseRoles, ppo_update, registry_reward_fn
    from align.registry import Registry
    from align.rl_utils import FixedKLController, RunningMoments

    torch.manual_seed(0)
    registry = Registry(args.workspace)
    config = config_for(args)
    prompts = [row["prompt"] for row in registry.rows("hh-prompts")]
    if args.variant == "shared":
        roles, _ = SharedBaseRoles.load(config.model, registry, config)
        reward_fn = registry_reward_fn(config.reward_model, registry, roles)
    else:
        roles = FourModelRoles(registry, config)
        reward_fn = registry_reward_fn(config.reward_model, registry)  # a fourth, separately loaded model
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=config.learning_rate)
    seconds = []
    for update in range(args.updates):
        stats = ppo_update(
            roles, optimizer, FixedKLController(config.kl_coef), RunningMoments(), prompts, config, reward_fn, update
        )
        seconds.append(stats["seconds"])
        print(f"  {args.variant}: update {update + 1} took {stats['seconds']:.1f} s", file=sys.stderr)
    result = {
        "seconds_per_update": statistics.median(seconds[1:] or seconds),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }
    if args.variant == "shared":
        result |= rollout_throughput(roles, prompts, config, reward_fn)
    return result


def rollout_throughput(roles, prompts, config, reward_fn) -> dict:
    """Response tokens/s of our rollout (PEFT policy, sampling) and of plain batched generate on the bare base."""
    import torch

    from align.ppo import encode_prompts, rollout

    batch = prompts[: config.batch_size]
    roles.use("default")
    began = time.perf_counter()
    ours = rollout(roles.model, roles.tokenizer, batch, config, lambda p, r: [0.0] * len(r))
    ours_seconds = time.perf_counter() - began
    ids, mask = encode_prompts(roles.tokenizer, batch, config.max_prompt_length)
    torch.manual_seed(0)
    with roles.model.disable_adapter(), torch.no_grad():
        began = time.perf_counter()
        plain = roles.model.get_base_model().generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=config.response_length,
            do_sample=True,
            temperature=config.temperature,
            pad_token_id=roles.tokenizer.pad_token_id,
            use_cache=True,
        )
        plain_seconds = time.perf_counter() - began
    plain_tokens = int((plain[:, ids.shape[1] :] != roles.tokenizer.pad_token_id).sum())
    return {
        "rollout_tokens_per_s": float(ours.response_mask.sum()) / ours_seconds,
        "plain_generate_tokens_per_s": max(plain_tokens, 1) / plain_seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--workspace", type=Path)
    parser.add_argument("--variant", choices=["shared", "separate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.variant:
        print(json.dumps(run_variant(args)))
        return 0

    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    if not (workspace / "registry.sqlite").exists():
        print(f"preparing {workspace} ...", file=sys.stderr)
        prepare(workspace)
    results = {}
    for variant in ("shared", "separate"):
        command = [
            sys.executable,
            __file__,
            "--variant",
            variant,
            "--workspace",
            str(workspace),
            "--updates",
            str(args.updates),
            "--batch-size",
            str(args.batch_size),
            "--response-length",
            str(args.response_length),
        ]
        output = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
        results[variant] = json.loads(output.strip().splitlines()[-1])
    ours, four = results["shared"], results["separate"]
    print(
        f"\nPPO, SmolLM2-135M + LoRA, batch {args.batch_size}, response length {args.response_length}, "
        f"{args.updates} updates (median after the first)"
    )
    print(f"{'':44}{'s/update':>10}{'peak RSS GB':>13}")
    print(f"{'ours: one base, 4 roles as adapters':44}{ours['seconds_per_update']:>10.1f}{ours['peak_rss_gb']:>13.2f}")
    print(
        f"{'four separately loaded models (this run)':44}{four['seconds_per_update']:>10.1f}"
        f"{four['peak_rss_gb']:>13.2f}"
    )
    print(
        f"{'TRL 1.9 PPOTrainer (quoted, same machine)':44}{TRL_19['seconds_per_update']:>10.1f}"
        f"{TRL_19['peak_rss_gb']:>13.2f}"
    )
    print(
        f"memory: ours is {ours['peak_rss_gb'] / four['peak_rss_gb']:.0%} of four models, "
        f"{ours['peak_rss_gb'] / TRL_19['peak_rss_gb']:.0%} of TRL 1.9 (target: at most 50%)"
    )
    print(
        f"rollout: {ours['rollout_tokens_per_s']:.1f} tokens/s (our PEFT policy) vs "
        f"{ours['plain_generate_tokens_per_s']:.1f} tokens/s (plain batched generate on the bare base)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
