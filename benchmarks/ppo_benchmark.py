"""PPO benchmark: our shared-base PPO against four separately loaded models and TRL 1.9.2's PPOTrainer.

    .venv/bin/python benchmarks/ppo_benchmark.py                 # SmolLM2, batch 8, response 32, 4 updates
    .venv/bin/python benchmarks/ppo_benchmark.py --updates 6 --batch-size 8 --response-length 32

Printed side by side, all measured in this one run (each variant in its own process, so peak memory is its own):
  - seconds per PPO update and peak RSS: ours (policy, reference, value and reward as adapters on one base)
    against four separately loaded models (policy, reference, value, reward), and against the peer, TRL 1.9.2's
    experimental PPOTrainer (LoRA policy, separate value and reward models) on the same workload;
  - rollout tokens/s of our PEFT policy against plain batched `generate` on the bare base model.
TRL 1.16 (our dependency) no longer ships a PPOTrainer, so the peer runs from its own `pip install --no-deps
--target` of trl==1.9.2 (in the align cache, bench/trl-1.9.2, installed on first use; it runs on our
transformers, peft and torch), first on PYTHONPATH in the peer's process only. If that install fails, the peer
row is skipped. The figure quoted in the issue (24.3 s per update, 6.1 GB) is printed for reference only.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"
TRL_PEER_VERSION = "1.9.2"
TRL_19_QUOTED = {"seconds_per_update": 24.3, "peak_rss_gb": 6.1}  # the figure, printed for reference only


def prepare(workspace: Path, base: str | None = None) -> None:
    """A registry with HH prompts, an SFT-like adapter and a reward model on `base` (default: the embedded
    SmolLM2; benchmarks/bench.py --quick gives a tiny model built from a config)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.models import embedded_checkpoint
    from align.registry import Registry

    registry = Registry(workspace)
    registry.import_file(HH, name="hh")
    registry.convert("hh", name="hh-prompts", kind="prompts")
    base_model = base or "smollm2-135m"
    base = base or str(embedded_checkpoint())
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(workspace / "sft")
    registry.register_artifact("adapter", "sft", workspace / "sft", base_model=base_model)
    scorer = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm_lora = peft.LoraConfig(task_type="SEQ_CLS", r=16, target_modules="all-linear", modules_to_save=["score"])
    peft.get_peft_model(scorer, rm_lora).save_pretrained(workspace / "rm")
    registry.register_artifact("rm", "rm", workspace / "rm", base_model=base_model)


RECIPE = ROOT / "recipes" / "ppo" / "smollm2-135m-lora.yaml"


def config_for(args):
    """The PPO recipe users run, on the benchmark's registry and shape (batch, response length)."""
    from align.config import build_config, read_yaml
    from align.ppo import PPOStageConfig

    values = read_yaml(RECIPE) | {
        "model": "adapter:sft",
        "reward_model": "rm:rm",
        "dataset": "hh-prompts",
        "batch_size": args.batch_size,
        "mini_batch_size": args.batch_size // 2,
        "response_length": args.response_length,
    }
    if args.gradient_accumulation_steps:
        values["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    return build_config(PPOStageConfig, values)


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

    # The same computations as SharedBaseRoles, on three models instead of three adapters.

    def logprobs(self, adapter, sequences, attention_mask, prompt_length, temperature, with_entropy=False):
        from align.ppo_core import response_logprobs

        return response_logprobs(self.model, sequences, attention_mask, prompt_length, temperature, with_entropy)

    def reference_logprobs(self, sequences, attention_mask, prompt_length, temperature):
        from align.ppo_core import response_logprobs

        return response_logprobs(self.reference, sequences, attention_mask, prompt_length, temperature)

    def values(self, sequences, attention_mask, prompt_length):
        from align.ppo_core import backbone

        hidden = backbone(self.value_model, sequences, attention_mask)[:, prompt_length - 1 : -1]
        return self.value_head(hidden).squeeze(-1)


def run_variant(args) -> dict:
    """One variant in this process: time `--updates` PPO updates (the first is warm-up) and report peak RSS."""
    import torch

    from align.ppo import load_roles
    from align.ppo_core import mixed_precision, ppo_update
    from align.ppo_shared import registry_reward_fn
    from align.registry import Registry
    from align.rl_utils import FixedKLController, RunningMoments

    torch.manual_seed(0)
    registry = Registry(args.workspace)
    config = config_for(args)
    prompts = [row["prompt"] for row in registry.rows("hh-prompts")]
    if args.variant == "shared":
        roles, _ = load_roles(config.model, registry, config)
        reward_fn = registry_reward_fn(config.reward_model, registry, roles)
    else:
        roles = FourModelRoles(registry, config)
        reward_fn = registry_reward_fn(config.reward_model, registry)  # a fourth, separately loaded model
    optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=config.learning_rate)
    seconds = []
    kl, moments = FixedKLController(config.kl_coef), RunningMoments()
    for update in range(args.updates):
        with mixed_precision(config, torch.device("cpu")):
            stats = ppo_update(roles, optimizer, kl, moments, prompts, config, reward_fn, update)
        seconds.append(stats["seconds"])
        print(f"  {args.variant}: update {update + 1} took {stats['seconds']:.1f} s", file=sys.stderr)
    result = {
        "seconds_per_update": statistics.median(seconds[1:] or seconds),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "machine_gflops": machine_gflops(),
    }
    if args.variant == "shared":
        result |= rollout_throughput(roles, prompts, config, reward_fn)
    return result


def machine_gflops() -> float:
    """fp32 matmul speed right after a variant ran. This machine's speed drifts (by up to 2x within an hour on
    the 2-core VM we measured on), so each row carries it: rows measured at different speeds are not comparable."""
    import torch

    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    began = time.perf_counter()
    for _ in range(20):
        a @ b
    return 20 * 2 * 1024**3 / (time.perf_counter() - began) / 1e9


def rollout_throughput(roles, prompts, config, reward_fn) -> dict:
    """Response tokens/s of our rollout (PEFT policy, sampling) and of plain batched generate on the bare base."""
    import torch

    from align.ppo_core import encode_prompts, rollout

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


# The peer: TRL 1.9.2's experimental PPOTrainer, measured in this run on the same workload.


def install_trl_peer() -> Path | None:
    """The folder holding trl==1.9.2 (installed there on first use), or None when pip cannot install it.

    `--no-deps --target`: only TRL itself goes there, so the peer runs on the transformers, peft and torch of
    our venv, and our own TRL 1.16 stays untouched.
    """
    from align.models import cache_dir

    dest = cache_dir() / "bench" / f"trl-{TRL_PEER_VERSION}"
    if (dest / f"trl-{TRL_PEER_VERSION}.dist-info").is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Install into a private folder, then rename: a concurrent run sees a whole install or none.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    print(f"installing trl=={TRL_PEER_VERSION} into {dest} (first use only) ...", file=sys.stderr)
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(tmp)]
    done = subprocess.run(pip + [f"trl=={TRL_PEER_VERSION}"], stdout=sys.stderr)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        print(
            f"could not install trl=={TRL_PEER_VERSION} (pip exited with {done.returncode}): "
            "the TRL PPOTrainer row is skipped",
            file=sys.stderr,
        )
        return None
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
    try:
        tmp.rename(dest)
    except OSError:  # another run installed it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def run_trl_peer(args) -> dict:
    """TRL 1.9.2's PPOTrainer on our workload, in a process whose PYTHONPATH starts with the TRL 1.9.2 install.

    Same as ours: the embedded SmolLM2, the SFT adapter as the trainable policy, the `rm` reward model, the
    hh-prompts (chat-templated, cut from the left to 192 tokens by our own `encode_prompts`), batch 8 in 2
    minibatches of 4, 2 epochs, response length 32, temperature 0.7, lr 5e-5, KL coefficient 0.05, fp32.
    TRL's layout: the policy's base (the reference is that base with the adapter disabled), a value model and
    a reward model, three bases in all.

    What one TRL update runs, for reading its time against ours: one `generate` (its old log-probs come from
    the generation scores, where ours runs one more policy forward), a reference forward, a value forward and
    a reward forward, then epochs x minibatches of a policy + value forward and backward. Its forwards compute
    LM-head logits for every position, prompt included, and its value model gets gradients for every weight.
    """
    import contextlib

    import peft
    import torch
    import trl

    if trl.__version__ != TRL_PEER_VERSION:  # e.g. PYTHONPATH not set: never report another TRL as the peer
        raise SystemExit(f"the peer needs trl {TRL_PEER_VERSION} first on PYTHONPATH, got {trl.__version__}")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    from align.models import load_tokenizer, resolve_model
    from align.ppo_core import encode_prompts
    from align.registry import Registry

    torch.manual_seed(0)
    registry = Registry(args.workspace)
    config = config_for(args)
    base = str(resolve_model(config.model, registry).base)  # the embedded SmolLM2 (a tiny model under --quick)

    tokenizer = load_tokenizer(config.model, registry)
    prompts = [row["prompt"] for row in registry.rows("hh-prompts")]
    ids, mask = encode_prompts(tokenizer, prompts, config.max_prompt_length)  # also sets left padding
    dataset = Dataset.from_dict({"input_ids": [row[keep.bool()].tolist() for row, keep in zip(ids, mask)]})
    # TRL 1.9 finds padding by token id (attention mask = ids != pad_token_id). SmolLM2 pads with its EOS,
    # <|im_end|>, which also closes every chat turn: TRL would mask the prompts' turn ends and the responses'
    # EOS. Its unused unk token, <|endoftext|>, pads instead (an existing id: no new embedding).
    tokenizer.pad_token = tokenizer.unk_token

    fp32 = {"dtype": torch.float32}
    # Policy: the SFT adapter, trainable, as ours. ref_model=None is TRL's own choice for a PeftModel policy:
    # the reference is the policy with its adapter disabled (the bare base), not the frozen SFT adapter we use
    # (TRL's ref_adapter_name would match ours; one forward of the base either way).
    sft = str(resolve_model(config.model, registry).adapter_path)
    policy = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, **fp32), sft, is_trainable=True)
    # Value: TRL's separate scalar model, trained whole (every weight, with Adam state), where ours trains a LoRA
    # adapter and a head.
    value = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, **fp32)
    # Reward: the benchmark's `rm` (base + its LoRA and score head), merged. TRL scores the policy's token ids
    # directly (same tokenizer), where ours decodes and re-tokenises.
    rm_path = str(registry.resolve_artifact(config.reward_model).path)
    scorer = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, **fp32)
    reward = peft.PeftModel.from_pretrained(scorer, rm_path).merge_and_unload()

    class UpdateClock(TrainerCallback):
        """Timestamps at the start of training and at the end of each update (PPOTrainer calls on_step_end
        once per update, after its epochs of minibatch steps)."""

        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, *a, **k):
            self.marks.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.marks.append(time.perf_counter())
            took = self.marks[-1] - self.marks[-2]
            print(f"  trl19: update {len(self.marks) - 1} took {took:.1f} s", file=sys.stderr)

    clock = UpdateClock()
    with tempfile.TemporaryDirectory() as output_dir, contextlib.redirect_stdout(sys.stderr):
        ppo_config = PPOConfig(
            output_dir=output_dir,
            use_cpu=True,
            bf16=bool(config.bf16),  # the same precision as ours: the recipe's bf16, as resolved on this machine
            seed=0,
            per_device_train_batch_size=config.batch_size,  # prompts per update (one process, no accumulation)
            # 2 epochs over 2 minibatches of 4, like our recipe (TRL's defaults: 4 epochs over 1 minibatch).
            num_mini_batches=config.batch_size // config.mini_batch_size,
            num_ppo_epochs=config.ppo_epochs,
            total_episodes=args.updates * config.batch_size,  # exactly --updates updates
            response_length=config.response_length,
            stop_token="eos",  # responses end at EOS, as ours (TRL's default never stops before response_length)
            temperature=config.temperature,
            learning_rate=config.learning_rate,
            kl_coef=config.kl_coef,
            cliprange=config.cliprange,
            cliprange_value=config.cliprange_value,
            vf_coef=config.vf_coef,
            gamma=config.gamma,
            lam=config.lam,
            gradient_checkpointing=False,  # 1.9.2's PPOTrainer ignores it anyway; ours does not checkpoint
            num_sample_generations=0,  # no sample generations during training
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
        )
        trainer = PPOTrainer(
            args=ppo_config,
            processing_class=tokenizer,
            model=policy,
            ref_model=None,
            reward_model=reward,
            train_dataset=dataset,
            value_model=value,
            callbacks=[clock],
        )
        trainer.train()
    seconds = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    return {
        "seconds_per_update": statistics.median(seconds[1:] or seconds),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "trl_version": trl.__version__,
        "machine_gflops": machine_gflops(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--workspace", type=Path)
    parser.add_argument("--gradient-accumulation-steps", type=int, help="override the recipe's")
    parser.add_argument("--variant", choices=["shared", "separate", "trl19"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from align.errors import AlignError

    try:
        config_for(args)  # a shape the recipe cannot run fails here, not in a subprocess
    except AlignError as exc:
        parser.error(str(exc))
    if args.variant:
        print(json.dumps(run_trl_peer(args) if args.variant == "trl19" else run_variant(args)))
        return 0

    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    if not (workspace / "registry.sqlite").exists():
        print(f"preparing {workspace} ...", file=sys.stderr)
        prepare(workspace)
    ours = measure("shared", workspace, args)
    four = measure("separate", workspace, args)
    peer = None
    trl_path = install_trl_peer()
    if trl_path is not None:
        # TRL 1.9.2 first on the PYTHONPATH of the peer's process only, ahead of our TRL 1.16.
        path = os.pathsep.join(filter(None, [str(trl_path), os.environ.get("PYTHONPATH")]))
        peer = measure("trl19", workspace, args, env=os.environ | {"PYTHONPATH": path})

    print(
        f"\nPPO, SmolLM2-135M + LoRA, batch {args.batch_size}, response length {args.response_length}, "
        f"{args.updates} updates (median after the first)"
    )
    config = config_for(args)
    micro = config.mini_batch_size // config.gradient_accumulation_steps
    print(
        f"{config.ppo_epochs} epochs over minibatches of {config.mini_batch_size}; ours and four models run {micro} "
        f"rollouts per forward (the recipe's gradient_accumulation_steps {config.gradient_accumulation_steps}), "
        f"TRL all {config.mini_batch_size}"
    )
    print(f"precision (all three): {'bf16 autocast' if config.bf16 else 'fp32'} (the recipe's bf16, on this machine)")
    print(f"{'':44}{'s/update':>10}{'peak RSS GB':>13}{'GFLOP/s':>9}")
    rows = [
        ("ours: one base, 4 roles as adapters", ours),
        ("four separately loaded models (this run)", four),
        (f"TRL {TRL_PEER_VERSION} PPOTrainer (this run)", peer),
        ("TRL 1.9 PPOTrainer (issue's quoted figure)", TRL_19_QUOTED),
    ]
    for label, row in rows:
        if row is None:
            print(f"{label:44}{'skipped (see above)':>23}")
        else:
            speed = f"{row['machine_gflops']:>9.0f}" if "machine_gflops" in row else ""
            print(f"{label:44}{row['seconds_per_update']:>10.1f}{row['peak_rss_gb']:>13.2f}{speed}")
    memory = f"memory: ours is {ours['peak_rss_gb'] / four['peak_rss_gb']:.0%} of four models"
    if peer is not None:
        memory += f", {ours['peak_rss_gb'] / peer['peak_rss_gb']:.0%} of TRL {TRL_PEER_VERSION} (this run)"
    print(memory + " (target: at most 50%)")
    print(
        f"rollout: {ours['rollout_tokens_per_s']:.1f} tokens/s (our PEFT policy) vs "
        f"{ours['plain_generate_tokens_per_s']:.1f} tokens/s (plain batched generate on the bare base)"
    )
    return 0


def measure(variant: str, workspace: Path, args, env=None) -> dict | None:
    """Run one variant in its own process (so its peak RSS is its own) and return its JSON line. Only the
    TRL peer may fail without stopping the benchmark: its row is then skipped (None)."""
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
    if args.gradient_accumulation_steps:
        command += ["--gradient-accumulation-steps", str(args.gradient_accumulation_steps)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0 and variant == "trl19":
        print(
            f"the TRL {TRL_PEER_VERSION} peer failed (exit {done.returncode}, see above): row skipped", file=sys.stderr
        )
        return None
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, command)
    return json.loads(done.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    sys.exit(main())
