"""DPO speed: TRL's DPOTrainer (its defaults plus LoRA) against `align dpo`'s recipe, same pairs, one run.

    # the headline: TRL against ours on 48 pairs (6 steps of 8)
    .venv/bin/python benchmarks/dpo_benchmark.py
    # also each lever on its own, against the same two
    .venv/bin/python benchmarks/dpo_benchmark.py --levers

Both train SmolLM2-135M-Instruct from its base with a fresh LoRA adapter (r 16, alpha 32, dropout 0.05, all linear
layers), batch 8, max_length 128, one epoch over the same pairs: HH-harmless training pairs that both keep (TRL
drops a pair whose prompt alone reaches max_length, ours one whose reply leaves under 16 prompt tokens), in a
seeded order.

    trl    TRL's DPOTrainer with its defaults (gradient checkpointing on, the reference computed every step, its
           collator and sampler) in fp32: TRL's default bf16=True runs as autocast on a CPU, which is slower here
    ours   recipes/dpo/smollm2-135m-lora.yaml: the prompt run once for both replies, batches grouped by length,
           only reply tokens through the LM head, no gradient checkpointing, torch_threads auto (one thread per
           core idle when it is built: 2 on idle cores, 1 when other processes keep a core busy)

The machine is shared, so the variants run side by side: every trainer is built first (model loading is left out;
tokenizing, and precomputing reference log-probs when that is on, are timed), then they take training steps in turn
(trl step 1, ours step 1, trl step 2, ...), each step being the trainer's own `training_step` (its collator, loss
and backward) plus the optimizer and scheduler step, as `Trainer.train` does it. A burst of load from another
process then hits every variant alike. pairs/s = pairs / (setup + all steps); the CPU-time column counts only this
process's work. Levers (--levers) change one thing from ours (the trl-* ones from trl).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from align.config import load_config, peft_config_for  # noqa: E402
from align.dpo import DPOStageConfig  # noqa: E402
from align.dpo_trainer import (  # noqa: E402
    PairCollator,
    PairDPOTrainer,
    add_pair_scoring,
    cpu_threads,
    freeze_reference,
    tokenize_pairs,
)
from align.models import EMBEDDED_ALIAS, load_model, load_tokenizer, resolve_model  # noqa: E402
from align.registry import Registry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "dpo" / "smollm2-135m-lora.yaml"
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"

# name -> (trainer, changes to TRL's config or to our recipe, torch threads during its steps)
VARIANTS = {
    "trl": ("trl", {}, None),
    "ours": ("ours", {}, None),
}
LEVERS = {
    "trl-no-checkpointing": ("trl", {"activation_checkpointing": False}, None),
    "trl-1-thread": ("trl", {}, 1),
    "ours-two-rows-per-pair": ("ours", {"share_prompt": False}, None),
    "ours-random-order": ("ours", {"train_sampling_strategy": "random"}, None),
    "ours-checkpointing": ("ours", {"activation_checkpointing": True}, None),
    "ours-precompute-ref": ("ours", {"precompute_ref_log_probs": True}, None),
    "ours-bf16-base": ("ours", {"torch_dtype": "bf16"}, None),
    "ours-1-thread": ("ours", {"torch_threads": 1}, None),
    "ours-2-threads": ("ours", {"torch_threads": 2}, None),
}


def benchmark_pairs(args, base: str) -> list[dict]:
    """A seeded sample of HH training pairs that both trainers keep whole at this max_length."""
    config = load_config(DPOStageConfig, RECIPE, {"dataset": "benchmark", "report_to": "none"})
    registry = Registry(Path(tempfile.mkdtemp(prefix="dpo-bench-")))
    source, _ = registry.import_file(args.data, name="hh-harmless")
    train, _ = registry.split(source.ref, test_size=0.1, seed=0)
    rows = registry.rows(train)
    random.Random(args.seed).shuffle(rows)
    tokenizer = load_tokenizer(base)
    kept = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=True)
        trl_keeps = len(prompt["input_ids"]) < args.max_length
        _, counts = tokenize_pairs(
            [row], tokenizer, max_length=args.max_length, min_prompt_length=config.min_prompt_length
        )
        if trl_keeps and counts["kept"]:
            kept.append(row)
        if len(kept) == args.pairs:
            return kept
    raise SystemExit(f"only {len(kept)} pairs fit; ask for fewer with --pairs")


def trl_trainer(base: str, rows: list[dict], args, changes: dict):
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = load_model(base, dtype="fp32")
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="dpo-bench-trl-"),
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        num_train_epochs=1,
        bf16=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
        **changes,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    started, cpu = time.perf_counter(), time.process_time()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )
    return trainer, time.perf_counter() - started, time.process_time() - cpu, len(trainer.train_dataset)


def our_trainer(base: str, rows: list[dict], args, changes: dict):
    import datasets

    overrides = {
        "model": base,
        "dataset": "benchmark",
        "output_dir": tempfile.mkdtemp(prefix="dpo-bench-ours-"),
        "per_device_train_batch_size": args.batch,
        "max_length": args.max_length,
        "num_train_epochs": 1,
        "max_steps": -1,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": args.seed,
    } | {key: str(value) for key, value in changes.items()}
    config = load_config(DPOStageConfig, RECIPE, overrides)
    model, tokenizer = load_model(base, dtype=config.torch_dtype)
    started, cpu = time.perf_counter(), time.process_time()
    examples, counts = tokenize_pairs(
        rows, tokenizer, max_length=config.max_length, min_prompt_length=config.min_prompt_length
    )
    add_pair_scoring(model)
    trainer = PairDPOTrainer(
        model=model,
        args=config,
        data_collator=PairCollator(tokenizer.pad_token_id, share_prompt=config.share_prompt),
        train_dataset=datasets.Dataset.from_list(examples),
        processing_class=tokenizer,
        peft_config=peft_config_for(config),
    )
    freeze_reference(trainer.model)
    trainer.threads = cpu_threads(config.torch_threads)  # what `align dpo` would set for the run
    return trainer, time.perf_counter() - started, time.process_time() - cpu, counts["kept"]


class Contestant:
    """One trainer, built and ready to take its steps one at a time."""

    def __init__(self, name: str, spec: tuple, base: str, rows: list[dict], args):
        kind, changes, self.threads = spec
        self.name = name
        build = trl_trainer if kind == "trl" else our_trainer
        self.trainer, self.seconds, self.cpu_seconds, self.pairs = build(base, rows, args, changes)
        self.threads = self.threads or getattr(self.trainer, "threads", None) or torch.get_num_threads()
        trainer = self.trainer
        steps = len(trainer.get_train_dataloader())
        trainer.create_optimizer_and_scheduler(num_training_steps=steps)
        trainer.current_gradient_accumulation_steps = 1  # Trainer.train sets it per accumulation window
        if trainer.args.activation_checkpointing:  # what Trainer.train switches on before its loop
            trainer.model.activation_checkpointing_enable()
        self.batches = iter(trainer.get_train_dataloader())
        self.steps_left = steps
        self.step_seconds: list[float] = []

    def step(self) -> None:
        trainer = self.trainer
        threads = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        started, cpu = time.perf_counter(), time.process_time()
        try:
            batch = next(self.batches)
            trainer.training_step(trainer.model, batch)
            trainer.optimizer.step()
            trainer.lr_scheduler.step()
            trainer.optimizer.zero_grad()
        finally:
            torch.set_num_threads(threads)
        self.step_seconds.append(time.perf_counter() - started)
        self.seconds += self.step_seconds[-1]
        self.cpu_seconds += time.process_time() - cpu
        self.steps_left -= 1


# For benchmarks/bench.py: each trainer in its own process, taking its steps in turn (benchmarks/lockstep.py).


def contestant(spec: dict, callback) -> dict:
    """One trainer of VARIANTS or LEVERS, built as above, trained by `Trainer.train` with the lockstep callback."""
    import json

    args = argparse.Namespace(**spec["args"])
    rows = json.loads(Path(spec["rows"]).read_text())
    kind, changes, threads = (VARIANTS | LEVERS)[spec["variant"]]
    build = trl_trainer if kind == "trl" else our_trainer
    trainer, _, _, pairs = build(spec["base"], rows, args, changes)
    threads = threads or getattr(trainer, "threads", None)
    if threads:
        torch.set_num_threads(threads)  # what `align dpo` sets for its run
    trainer.add_callback(callback)
    trainer.train()
    return {"items": pairs}


def contestants(base: str, rows: list[dict], folder: Path, args, variants=VARIANTS) -> dict:
    """The specs benchmarks/lockstep.py runs: {variant: ("dpo_benchmark:contestant", spec)}."""
    import json

    path = folder / "dpo-pairs.json"
    path.write_text(json.dumps(rows))
    spec = {
        "base": base,
        "rows": str(path),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    return {name: ("dpo_benchmark:contestant", spec | {"variant": name}) for name in variants}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48, help="pairs to train on (default 48: 6 steps of 8)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levers", action="store_true", help="also measure each lever on its own")
    parser.add_argument("--data", default=str(DATA), help="HH-style preference file")
    args = parser.parse_args()

    base = resolve_model(EMBEDDED_ALIAS).base
    rows = benchmark_pairs(args, base)
    variants = VARIANTS | (LEVERS if args.levers else {})
    print(
        f"{len(rows)} HH pairs, batch {args.batch}, max_length {args.max_length}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    contestants = [Contestant(name, spec, base, rows, args) for name, spec in variants.items()]
    for contestant in contestants:
        print(
            f"  built {contestant.name}: {contestant.seconds:.1f} s of setup, {contestant.threads} threads", flush=True
        )
    step = 0
    while any(contestant.steps_left for contestant in contestants):
        step += 1
        for contestant in contestants:
            if contestant.steps_left:
                contestant.step()
        times = "  ".join(f"{c.name} {c.step_seconds[-1]:.1f}s" for c in contestants if len(c.step_seconds) >= step)
        print(f"  step {step}: {times}", flush=True)

    trl = contestants[0]
    baseline = trl.pairs / trl.seconds
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    print(f"  {'variant':24s} {'pairs':>5s} {'seconds':>8s} {'pairs/s':>8s} {'vs trl':>7s} {'pairs/CPU-s':>12s}")
    for c in contestants:
        speed = c.pairs / c.seconds
        print(
            f"  {c.name:24s} {c.pairs:5d} {c.seconds:8.1f} {speed:8.3f} {speed / baseline:6.2f}x "
            f"{c.pairs / c.cpu_seconds:12.3f}"
        )
    ours = next(c for c in contestants if c.name == "ours")
    speed = ours.pairs / ours.seconds
    print(
        f"\nTRL DPOTrainer (defaults + LoRA): {baseline:.3f} pairs/s   ours: {speed:.3f} pairs/s   "
        f"({speed / baseline:.2f}x; target 1.5x)"
    )


if __name__ == "__main__":
    main()
