"""SFT speed: TRL's SFTTrainer (its defaults plus LoRA) against `align sft`'s recipe, same samples, one run.

    # the headline: TRL against ours on 48 samples (6 steps of 8)
    .venv/bin/python benchmarks/sft_benchmark.py
    # a smoke run on a tiny model built from a config
    .venv/bin/python benchmarks/sft_benchmark.py --quick

Both train SmolLM2-135M-Instruct from its base with a fresh LoRA adapter (r 16, alpha 32, dropout 0.05, all linear
layers), batch 8, one epoch over the same samples: prompt/completion rows of the Self-Instruct seed tasks, one per
assistant turn as `align sft` makes them (align/sft.py), the loss on the completion only, in a seeded order. Only
rows whose prompt and completion fit --fit-length tokens whole are drawn (256: the longest seed tasks would make a
batch's memory, not the trainer, the story), and both trainers get the recipe's max_length (512), so neither cuts
anything.

    trl    TRL's SFTConfig defaults (gradient checkpointing on, its collator and random order, lr 2e-5) with bf16
           where the machine runs it natively: TRL's default bf16=True runs as emulated autocast on a CPU without
           AMX or AVX-512 BF16, which is slower, so there it runs fp32 like ours
    ours   recipes/sft/smollm2-135m-lora.yaml as `align sft` builds it: batches grouped by length (less padding),
           no gradient checkpointing, bf16 only where native

Each trainer runs in its own process and they take their optimizer steps in turn (benchmarks/lockstep.py), so load
from other processes hits both alike and each peak RSS is its own. samples/s = samples / seconds of the training
loop (building and tokenizing left out); MFU = the FLOPs of benchmarks/flops.py over those seconds, against the
machine's fp32 matmul peak at the threads the trainer used.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

RECIPE = ROOT / "recipes" / "sft" / "smollm2-135m-lora.yaml"
DATA = ROOT.parent / "shared" / "data" / "self-instruct-seed-tasks.jsonl"
VARIANTS = ("trl", "ours")
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def benchmark_rows(base: str, *, samples: int, fit_length: int, seed: int, data: Path = DATA) -> list[dict]:
    """A seeded sample of the seed tasks' prompt/completion rows that fit `fit_length` tokens whole."""
    from align.models import load_tokenizer
    from align.registry import Registry
    from align.sft import to_prompt_completion

    registry = Registry(Path(tempfile.mkdtemp(prefix="sft-bench-")))
    version, _ = registry.import_file(data, name="seed-tasks")
    rows = to_prompt_completion(registry.rows(version))
    random.Random(seed).shuffle(rows)
    tokenizer = load_tokenizer(base)
    kept = []
    for row in rows:
        ids = tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)
        if len(ids["input_ids"]) <= fit_length:
            kept.append(row)
        if len(kept) == samples:
            return kept
    raise SystemExit(f"only {len(kept)} samples fit {fit_length} tokens; ask for fewer with --samples")


def trl_trainer(base: str, rows: list[dict], spec: dict):
    import datasets
    import torch
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from align.models import bf16_is_fast, load_model

    model, tokenizer = load_model(base, dtype="fp32")
    native = bf16_is_fast()
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="sft-bench-trl-"),
        per_device_train_batch_size=spec["batch"],
        max_length=spec["max_length"],
        num_train_epochs=1,
        bf16=native,
        use_cpu=native and not torch.cuda.is_available(),  # transformers refuses bf16 on a CPU unless told
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=spec["seed"],
    )
    lora = LoraConfig(task_type="CAUSAL_LM", **LORA)
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora,
    )


def our_trainer(base: str, rows: list[dict], spec: dict):
    """The trainer `align sft` builds from its recipe (align/sft.py), on these rows."""
    import datasets
    from trl import SFTTrainer

    from align.config import load_config, peft_config_for
    from align.models import load_model
    from align.sft import SFTStageConfig

    overrides = {
        "model": base,
        "dataset": "benchmark",
        "output_dir": tempfile.mkdtemp(prefix="sft-bench-ours-"),
        "per_device_train_batch_size": spec["batch"],
        "max_length": spec["max_length"],
        "num_train_epochs": 1,
        "max_steps": -1,
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        "seed": spec["seed"],
    }
    config = load_config(SFTStageConfig, RECIPE, overrides)
    model, tokenizer = load_model(base, dtype=config.torch_dtype)
    return SFTTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config_for(config),
    )


def contestant(spec: dict, callback) -> dict:
    """One trainer in its own process (benchmarks/lockstep.py): build, then train with the lockstep callback."""
    rows = json.loads(Path(spec["rows"]).read_text())
    build = trl_trainer if spec["variant"] == "trl" else our_trainer
    trainer = build(spec["base"], rows, spec)
    trainer.add_callback(callback)
    trainer.train()
    return {"items": len(trainer.train_dataset)}


def contestants(base: str, rows: list[dict], folder: Path, *, batch: int, max_length: int, seed: int) -> dict:
    """The specs benchmarks/lockstep.py runs: {variant: ("sft_benchmark:contestant", spec)}."""
    path = folder / "sft-rows.json"
    path.write_text(json.dumps(rows))
    common = {"base": base, "rows": str(path), "batch": batch, "max_length": max_length, "seed": seed}
    return {name: ("sft_benchmark:contestant", common | {"variant": name}) for name in VARIANTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=48, help="rows to train on (default 48: 6 steps of 8)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512, help="both trainers' max_length (the recipe's)")
    parser.add_argument("--fit-length", type=int, default=256, help="draw only rows this short, in tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny model built from a config: the path only")
    args = parser.parse_args()

    from lockstep import run_lockstep

    from align.models import EMBEDDED_ALIAS, resolve_model

    folder = Path(tempfile.mkdtemp(prefix="sft-bench-"))
    if args.quick:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import save_tiny_model

        base = str(save_tiny_model(folder / "tiny"))
        args.samples, args.batch = min(args.samples, 8), min(args.batch, 4)
    else:
        base = str(resolve_model(EMBEDDED_ALIAS).base)
    rows = benchmark_rows(base, samples=args.samples, fit_length=args.fit_length, seed=args.seed)
    specs = contestants(base, rows, folder, batch=args.batch, max_length=args.max_length, seed=args.seed)
    print(f"{len(rows)} seed-task samples, batch {args.batch}, max_length {args.max_length}; logs in {folder}")
    results = run_lockstep(specs, folder)
    print(f"  {'variant':8s} {'samples':>7s} {'seconds':>8s} {'samples/s':>9s} {'vs trl':>7s} {'peak RSS GB':>11s}")
    baseline = results["trl"]["items"] / results["trl"]["seconds"]
    for name, result in results.items():
        speed = result["items"] / result["seconds"]
        print(
            f"  {name:8s} {result['items']:7d} {result['seconds']:8.1f} {speed:9.3f} {speed / baseline:6.2f}x "
            f"{result['peak_rss_gb']:11.2f}"
        )


if __name__ == "__main__":
    main()
