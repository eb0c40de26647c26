"""Scale-out benchmark: one process with 2 threads against 2 processes with 1 thread each, same recipes, same steps.

    .venv/bin/python benchmarks/distributed_benchmark.py            # SmolLM2-135M, the stages' recipes, short runs
    .venv/bin/python benchmarks/distributed_benchmark.py --quick    # tiny models built from config: a smoke run

Each variant runs the stage the way users run it, from the command line, in one run of this script:

    one process   OMP_NUM_THREADS=2 align STAGE --config RECIPE ...
    2 processes   OMP_NUM_THREADS=1 accelerate launch --multi_gpu --num_processes 2 -m align STAGE --config RECIPE ...

with the same global batch (the 2-process run splits it: align/distributed.py) and the same number of steps.
Printed: samples/s for SFT (conversations), pairs/s for RM and DPO, from the trainer's own `train_runtime` (the
training loop: model loading, tokenizing and evaluation are left out), and s/update for our PPO loop (the mean
of its updates' `seconds`, the first left out as warm-up when there are more than two), then the ratio 2
processes / 1 process.

What to expect on a 2-core CPU: a ratio near 1, or above. Two threads of one process share every matmul, and on
these small matrices (LoRA, short sequences, small per-device batches) two threads rarely reach twice one thread's
speed; two single-threaded processes each keep a core busy with half the batch. Against that, the 2-process run
adds, per optimizer step, an all-reduce of every trainable gradient over gloo (loopback TCP: the LoRA weights, a few
tens of MB) and a second copy of the model in memory, and each launch loads the model twice. Data parallelism pays
where each process has its own device (GPUs) and the batch per device stays large; here the run proves the path and
shows what it costs. Run it on idle cores (another job on the machine skews both sides); the machine's speed drifts,
and each stage's two variants run one after the other, so a ratio is good to about +-0.3.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BIN = Path(sys.executable).parent

# stage -> (recipe, what its throughput counts, extra keys for the full-size run)
STAGES = {
    "sft": ("recipes/sft/smollm2-135m-lora.yaml", "samples", {"dataset": "seed-tasks", "max_steps": 8}),
    "rm": ("recipes/rm/smollm2-135m-lora.yaml", "pairs", {"dataset": "hh", "max_steps": 8}),
    "dpo": (
        "recipes/dpo/smollm2-135m-lora.yaml",
        "pairs",
        # torch_threads: null, so OMP_NUM_THREADS decides (the recipe's auto counts idle cores)
        {"model": "smollm2-135m", "dataset": "hh", "max_steps": 8, "eval_limit": 8, "torch_threads": None},
    ),
    "ppo": ("recipes/ppo/smollm2-135m-lora.yaml", "updates", {"dataset": "hh-prompts", "num_updates": 4}),
}
LABELS = {"samples": "samples/s", "pairs": "pairs/s", "updates": "s/update"}
# eval_dataset: null holds out a seeded split of `dataset` (the recipes name versions this workspace does not have)
COMMON = {"report_to": "none", "save_steps": 1000, "seed": 0, "eval_dataset": None}


def prepare_full(workspace: Path) -> dict:
    """The shared public data and the embedded SmolLM2: seed tasks (SFT), HH pairs (RM, DPO) and their prompts (PPO),
    an SFT-like adapter and an untrained reward model for PPO (as benchmarks/ppo_benchmark.py builds them)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from ppo_benchmark import prepare

    from align.registry import Registry

    prepare(workspace)  # hh, hh-prompts, adapter:sft, rm:rm
    Registry(workspace).import_file(DATA / "self-instruct-seed-tasks.jsonl", name="seed-tasks")
    return {"ppo": {"model": "adapter:sft", "reward_model": "rm:rm"}}


def prepare_quick(workspace: Path) -> dict:
    """Tiny models built from a config (as the tests do) and a few synthetic rows: the path, not the speed."""
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_model

    from align.registry import Registry

    tiny = save_tiny_model(workspace / "tiny")
    registry = Registry(workspace)
    words = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"] * 4
    registry.register(
        [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]} for w in words],
        name="seed-tasks",
        kind="sft",
    )
    pairs = [
        {
            "prompt": [{"role": "user", "content": f"is {w} ok?"}],
            "chosen": [{"role": "assistant", "content": f"yes {w}"}],
            "rejected": [{"role": "assistant", "content": f"no {w}"}],
        }
        for w in words
    ]
    registry.register(pairs, name="hh", kind="preference")
    registry.register([{"prompt": p["prompt"]} for p in pairs], name="hh-prompts", kind="prompts")
    torch.manual_seed(0)
    scorer = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear", modules_to_save=["score"])
    peft.get_peft_model(scorer, lora).save_pretrained(workspace / "rm")
    registry.register_artifact("rm", "rm", workspace / "rm", base_model=str(tiny))
    quick = {"model": str(tiny), "max_length": 64, "per_device_train_batch_size": 4, "bf16": False}
    return {
        "sft": quick | {"max_steps": 2},
        "rm": quick | {"max_steps": 2, "num_layers": None},  # the recipe keeps 24 layers; the tiny model has 2
        "dpo": quick | {"max_steps": 2, "eval_limit": 4},
        "ppo": {"model": str(tiny), "reward_model": "rm:rm", "num_updates": 2, "batch_size": 4, "mini_batch_size": 2,
                "gradient_accumulation_steps": 1, "response_length": 8, "eval_prompts": 2, "bf16": False},
    }  # fmt: skip


def run_stage(workspace: Path, stage: str, values: dict, processes: int) -> dict:
    """Run `align STAGE` in one process with 2 threads, or in 2 processes with 1 thread; return its run's numbers."""
    import yaml

    recipe = workspace / f"{stage}-{processes}.yaml"
    recipe.write_text(yaml.safe_dump(values), encoding="utf-8")
    arguments = ["--workspace", str(workspace), stage, "--config", str(recipe)]
    if processes == 1:
        command, threads = [str(BIN / "python"), "-m", "align", *arguments], "2"
    else:
        command = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes)]
        command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "align"]
        command, threads = command + arguments, "1"
    env = os.environ | {"OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    began = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"{stage} with {processes} process(es) failed:\n{done.stderr[-3000:]}")
    from align.registry import Registry

    run = Registry(workspace).list_runs()[-1]
    return {"run": run, "wall": wall}


def throughput(stage: str, run, processes: int) -> float:
    """pairs/s of a Trainer stage (global batch x steps / train_runtime), or s/update of our PPO loop."""
    from align.runs import read_live

    if stage == "ppo":
        seconds = [h["seconds"] for h in json.loads((run.dir / "metrics.json").read_text())["history"]]
        return statistics.mean(seconds[1:] if len(seconds) > 2 else seconds)
    log = read_live(run.dir)
    runtime = next(e["train_runtime"] for e in reversed(log) if "train_runtime" in e)
    config = run.config  # what the run trained with: the 2-process run's per-device share of the global batch
    batch = config["per_device_train_batch_size"] * processes * config["gradient_accumulation_steps"]
    return batch * run.metrics["steps"] / runtime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models built from config: a smoke run of the path")
    parser.add_argument("--stages", default="sft,rm,dpo,ppo", help="comma-separated (default: all four)")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    import yaml

    with tempfile.TemporaryDirectory(prefix="align-distributed-bench-") as folder:
        workspace = Path(folder) / "ws"
        extra = prepare_quick(workspace) if args.quick else prepare_full(workspace)
        rows = []
        for stage in args.stages.split(","):
            recipe, unit, full = STAGES[stage]
            values = yaml.safe_load((ROOT / recipe).read_text()) | COMMON | full | extra.get(stage, {})
            measured = {}
            for processes in (1, 2):
                result = run_stage(workspace, stage, values, processes)
                measured[processes] = throughput(stage, result["run"], processes)
                label, wall = LABELS[unit], result["wall"]
                print(f"{stage}, {processes} process(es): {measured[processes]:.3f} {label} (wall {wall:.0f} s)")
            rows.append((stage, unit, measured))
        print("\nstage  one process x 2 threads  2 processes x 1 thread  ratio (2 processes / 1; >1 = faster)")
        for stage, unit, measured in rows:
            one, two = measured[1], measured[2]
            ratio = one / two if unit == "updates" else two / one  # s/update: lower is faster
            label = LABELS[unit]
            print(f"{stage:5}  {one:10.3f} {label:9}  {two:10.3f} {label:9}  {ratio:.2f}")


if __name__ == "__main__":
    main()
