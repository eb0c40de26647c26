"""DPO speed: TRL's DPOTrainer (its defaults plus LoRA) against `align dpo`'s recipe, same pairs, one run.

    # the headline: TRL against ours, 3 interleaved rounds of 32 pairs each (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/dpo_benchmark.py
    # also each lever on its own (about 35 minutes)
    .venv/bin/python benchmarks/dpo_benchmark.py --levers

Both train SmolLM2-135M-Instruct from its base with a fresh LoRA adapter (r 16, alpha 32, all linear layers),
batch 8, max_length 128, one epoch over the same pairs: HH-harmless training pairs whose prompt TRL keeps (TRL
drops a pair whose prompt alone reaches max_length, ours one whose reply leaves under 16 prompt tokens), in a
seeded order. The figure is pairs per second of wall
time from building the trainer to the end of training: tokenizing, precomputing reference log-probs when that
is on, and every step. Model loading is left out of both.

    trl    TRL's DPOTrainer with its defaults (gradient checkpointing on, the reference computed every step) in
           fp32: TRL's default bf16=True runs as autocast on a CPU, which is slower here
    ours   recipes/dpo/smollm2-135m-lora.yaml: the prompt run once for both replies, batches grouped by length,
           only reply tokens through the LM head, no gradient checkpointing

The variants run in turn within each round (trl, ours, trl, ours, ...), so another process's load hits all of them
alike; the table gives each variant's median over the rounds. Levers (--levers) change one thing from ours (or,
for trl-no-checkpointing, from trl).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from align.config import load_config, peft_config_for  # noqa: E402
from align.dpo import (  # noqa: E402
    DPOStageConfig,
    PairCollator,
    PairDPOTrainer,
    add_pair_scoring,
    freeze_reference,
    tokenize_pairs,
)
from align.models import EMBEDDED_ALIAS, load_model, resolve_model  # noqa: E402
from align.registry import Registry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "dpo" / "smollm2-135m-lora.yaml"
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"

# name -> (trainer, our recipe overrides or TRL config changes, torch threads)
VARIANTS = {
    "trl": ("trl", {}, None),
    "ours": ("ours", {}, None),
}
LEVERS = {
    "trl-no-checkpointing": ("trl", {"activation_checkpointing": False}, None),
    "ours-two-rows-per-pair": ("ours", {"share_prompt": False}, None),
    "ours-random-order": ("ours", {"train_sampling_strategy": "random"}, None),
    "ours-checkpointing": ("ours", {"activation_checkpointing": True}, None),
    "ours-precompute-ref": ("ours", {"precompute_ref_log_probs": True}, None),
    "ours-bf16-base": ("ours", {"torch_dtype": "bf16"}, None),
    "ours-1-thread": ("ours", {}, 1),
}


def benchmark_pairs(args, base: str) -> list[dict]:
    """A seeded sample of HH training pairs that both keep at this max_length: TRL drops a pair whose prompt alone
    reaches max_length, ours one whose reply leaves less than min_prompt_length tokens of prompt."""
    from align.models import load_tokenizer

    config = load_config(DPOStageConfig, RECIPE, {"dataset": "benchmark", "report_to": "none"})
    workspace = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    registry = Registry(workspace)
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


def run_trl(base: str, rows: list[dict], args, changes: dict) -> dict:
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
        logging_steps=10_000,
        disable_tqdm=True,
        seed=args.seed,
        **changes,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    started = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    seconds = time.perf_counter() - started
    pairs = len(trainer.train_dataset)
    return {"pairs": pairs, "seconds": seconds, "tokens": trainer._total_train_tokens}


def run_ours(base: str, rows: list[dict], args, changes: dict) -> dict:
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
        "logging_steps": 10_000,
        "disable_tqdm": True,
        "seed": args.seed,
    } | {key: str(value) for key, value in changes.items()}
    config = load_config(DPOStageConfig, RECIPE, overrides)
    model, tokenizer = load_model(base, dtype=config.torch_dtype)
    started = time.perf_counter()
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
    trainer.train()
    seconds = time.perf_counter() - started
    per_pair = [
        len(e["prompt_ids"]) * (1 if config.share_prompt else 2) + len(e["chosen_ids"]) + len(e["rejected_ids"])
        for e in examples
    ]
    return {"pairs": counts["kept"], "seconds": seconds, "tokens": sum(per_pair)}


def measure(name: str, spec: tuple, base: str, rows: list[dict], args) -> dict:
    kind, changes, threads = spec
    default_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = (run_trl if kind == "trl" else run_ours)(base, rows, args, changes)
    finally:
        torch.set_num_threads(default_threads)
        gc.collect()
    result["pairs_per_second"] = result["pairs"] / result["seconds"]
    print(
        f"  {name:24s} {result['pairs_per_second']:6.3f} pairs/s  ({result['pairs']} pairs in "
        f"{result['seconds']:.1f} s, {result['tokens'] / result['pairs']:.0f} tokens per pair)",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32, help="pairs per run (default 32: 4 steps of 8)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
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
        f"{len(rows)} HH pairs, batch {args.batch}, max_length {args.max_length}, {args.rounds} rounds, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
    )
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for round_number in range(1, args.rounds + 1):
        print(f"round {round_number}/{args.rounds}", flush=True)
        for name, spec in variants.items():
            results[name].append(measure(name, spec, base, rows, args))

    baseline = statistics.median(r["pairs_per_second"] for r in results["trl"])
    print("\nmedian pairs/s over the rounds (same pairs, same settings, one run)")
    print(f"  {'variant':24s} {'pairs/s':>8s} {'vs trl':>7s}")
    for name, runs in results.items():
        speed = statistics.median(r["pairs_per_second"] for r in runs)
        print(f"  {name:24s} {speed:8.3f} {speed / baseline:6.2f}x")
    ours = statistics.median(r["pairs_per_second"] for r in results["ours"])
    print(
        f"\nTRL DPOTrainer (defaults + LoRA): {baseline:.3f} pairs/s   ours: {ours:.3f} pairs/s   "
        f"({ours / baseline:.2f}x; target 1.5x)"
    )


if __name__ == "__main__":
    main()
