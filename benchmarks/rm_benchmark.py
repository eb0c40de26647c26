"""Reward-model benchmark: the plain TRL recipe (the floor) against our `align rm` recipe, same data, one run.

    # the full run (all shared HH pairs; more than an hour on 2 CPU cores)
    .venv/bin/python benchmarks/rm_benchmark.py
    # a reduced run: 400 training pairs, 160 held-out pairs
    .venv/bin/python benchmarks/rm_benchmark.py --pairs 400 --eval-pairs 160
    # also measure variants of our recipe (NAME:key=value,key=value; any config key)
    .venv/bin/python benchmarks/rm_benchmark.py --pairs 400 --variant lr3e-4:learning_rate=3e-4
    # a learning curve: our recipe on the first N pairs of one shuffle of the train split, same held-out pairs
    .venv/bin/python benchmarks/rm_benchmark.py --skip-floor --skip-untrained --skip-ours --curve 200,400,800,1437

Variants and the curve are for reporting, not for choosing: they are scored on the held-out test pairs. Choose
recipes on validation pairs carved from the training pairs (`align sweep`).

Data: the shared HH-harmless dev file (1,600 pairs, 1,597 valid), imported into a fresh workspace and split with
a fixed seed into train and test (`--test-size`, default 10%). Only these pairs are public here, so "unseen
pairs" means the held-out test split. Every model is scored on the same test pairs, twice:

    acc<=256   the test pairs that fit in max_length whole (what the floor can be measured on)
    acc(all)   every test pair, long ones cut from the left of the prompt (none dropped)

The floor: TRL's RewardTrainer as documented, on the conversational rows (TRL tokenizes them and drops pairs
longer than max_length), SmolLM2 + LoRA r16 (PEFT's default targets, q_proj and v_proj), lr 2e-4, one epoch,
batch 8, TRL's defaults otherwise (gradient checkpointing on), fp32. Ours: recipes/rm/smollm2-135m-lora.yaml
(its own training max_length; every model is scored at --max-length). Speed is training pairs per second of
training time (the trainer's train_runtime), "train s" the whole training time, and "stage s" the whole
`align rm` stage for ours (loading, caching frozen layers, training, saving, its own evaluation).
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import load_config  # noqa: E402
from align.registry import Registry  # noqa: E402
from align.stats import wilson_interval  # noqa: E402
from align.truncation import encode_rows  # noqa: E402
from reward.metrics import expected_calibration_error, pairwise_accuracy, sigmoid  # noqa: E402
from reward.model import RewardModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "rm" / "smollm2-135m-lora.yaml"
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"


def prepare(workspace: Path, args) -> tuple[Registry, str, str]:
    registry = Registry(workspace)
    source, _ = registry.import_file(args.data, name="hh-harmless")
    train, test = registry.split(source.ref, test_size=args.test_size, seed=args.seed)
    rng = random.Random(args.seed)
    train_rows, test_rows = registry.rows(train), registry.rows(test)
    if args.pairs and args.pairs < len(train_rows):
        train_rows = rng.sample(train_rows, args.pairs)
    if args.eval_pairs and args.eval_pairs < len(test_rows):
        test_rows = rng.sample(test_rows, args.eval_pairs)
    train_ref = registry.register(train_rows, name="bench-train", kind="preference", parents=[train]).ref
    test_ref = registry.register(test_rows, name="bench-test", kind="preference", parents=[test]).ref
    # The stage evaluates on this two-pair probe; the benchmark scores the reloaded artifact on the test split.
    registry.register(test_rows[:2], name="bench-probe", kind="preference", parents=[test])
    print(f"data: {train_ref} ({len(train_rows)} pairs) for training, {test_ref} ({len(test_rows)} pairs) held out")
    return registry, train_ref, test_ref


def held_out(rm: RewardModel, rows: list[dict], max_length: int) -> dict:
    """Accuracy on the pairs that fit whole and on all pairs (left-truncated), and ECE on all."""
    encoded, _ = encode_rows(rm.tokenizer, rows, max_length, overflow="cut")
    fits = [i for i, item in enumerate(encoded) if not item.truncated]
    rm.max_length = max_length
    scores = rm.score_pairs(rows, progress=True)
    c, r = scores.chosen, scores.rejected
    return {
        "acc_fit": pairwise_accuracy([c[i] for i in fits], [r[i] for i in fits]),
        "fit_pairs": len(fits),
        "acc_all": pairwise_accuracy(c, r),
        "all_pairs": len(rows),
        "ece": expected_calibration_error([sigmoid(a - b) for a, b in zip(c, r)]),
    }


def floor_trainer(registry: Registry, train_ref: str, args, output_dir: str, base: str | None = None):
    """TRL's RewardTrainer as documented (see the module's docstring), on `base` (default: the embedded SmolLM2)."""
    import peft
    from trl import RewardConfig, RewardTrainer

    from align.models import embedded_checkpoint, load_tokenizer

    base = base or str(embedded_checkpoint())
    config = RewardConfig(
        output_dir=output_dir,
        learning_rate=2e-4,
        num_train_epochs=1,
        max_length=args.max_length,
        per_device_train_batch_size=8,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10,
        seed=args.seed,
    )
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, lora_dropout=0.05)
    return RewardTrainer(
        model=base,
        args=config,
        train_dataset=registry.load(train_ref),
        processing_class=load_tokenizer(base),
        peft_config=lora,
    )


def run_floor(registry: Registry, train_ref: str, test_ref: str, args) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = floor_trainer(registry, train_ref, args, output_dir)
        trained = len(trainer.train_dataset)
        result = trainer.train()
        runtime = result.metrics["train_runtime"]
        rm = RewardModel(trainer.model, trainer.processing_class, batch_size=16)
        figures = held_out(rm, registry.rows(test_ref), args.max_length)
    train_rows = registry.resolve(train_ref).num_rows
    return figures | {"trained": trained, "dropped": train_rows - trained, "seconds": runtime}


def run_ours(
    registry: Registry, train_ref: str, test_ref: str | None, args, name: str, overrides: dict, callbacks=()
) -> dict:
    """`align rm` on the recipe; the saved artifact scored on `test_ref` (None: not scored)."""
    from reward.train import RewardStageConfig, run_rm

    values = {
        "dataset": train_ref,
        "eval_dataset": "bench-probe",
        "output_name": f"bench-{name}",
        "report_to": "none",
        "save_strategy": "no",
        "seed": args.seed,
        "eval_max_length": args.max_length,  # training length is the recipe's; scoring is the same for everyone
    } | overrides
    config = load_config(RewardStageConfig, RECIPE, values)
    started = time.perf_counter()
    artifact = run_rm(config, registry, callbacks=callbacks)
    wall = time.perf_counter() - started  # loading, any caching of frozen layers, training, the stage's own eval
    metrics = registry.get_run(artifact.run_id).metrics
    figures = {}
    if test_ref is not None:
        rm = RewardModel.load(artifact.ref, registry, batch_size=16)  # the saved artifact, reloaded
        figures = held_out(rm, registry.rows(test_ref), args.max_length)
    return figures | {
        "trained": metrics["train_pairs"],
        "dropped": metrics["train_dropped"],
        "seconds": metrics["train_runtime_s"],
        "wall": wall,
    }


def run_untrained(registry: Registry, test_ref: str, args) -> dict:
    rm = RewardModel.load("smollm2-135m", registry, batch_size=16, seed=args.seed)
    return held_out(rm, registry.rows(test_ref), args.max_length) | {"trained": 0, "dropped": 0, "seconds": 0.0}


def learning_curve(registry: Registry, train_ref: str, test_ref: str, args) -> dict:
    """Ours on nested training sets (the first N pairs of one shuffle), each scored on the same held-out pairs."""
    rows = registry.rows(train_ref)
    random.Random(args.seed).shuffle(rows)
    sizes = [min(int(n), len(rows)) for n in args.curve.split(",")]
    results = {}
    for n in sizes:
        ref = registry.register(rows[:n], name=f"bench-train-{n}", kind="preference").ref
        results[f"ours, {n} pairs"] = run_ours(registry, ref, test_ref, args, f"curve-{n}", {})
        print(f"ours, {n} pairs: {results[f'ours, {n} pairs']}", flush=True)
        gc.collect()
    plot_curve(sizes, [results[f"ours, {n} pairs"] for n in sizes], args.plot)
    return results


def plot_curve(sizes: list[int], results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracy = [r["acc_all"] for r in results]
    intervals = [wilson_interval(r["acc_all"] * r["all_pairs"], r["all_pairs"]) for r in results]
    low = [a - lo for a, (lo, _) in zip(accuracy, intervals)]
    high = [hi - a for a, (_, hi) in zip(accuracy, intervals)]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.errorbar(sizes, accuracy, yerr=[low, high], marker="o", capsize=4, label="reward model (95% interval)")
    ax.axhline(0.5, color="grey", linestyle="--", label="chance")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training pairs")
    ax.set_ylabel(f"held-out accuracy ({results[0]['all_pairs']} pairs)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"learning curve: {path}")


def gemm_gflops(size: int = 1024, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return repeats * 2 * size**3 / (time.perf_counter() - started) / 1e9


# For benchmarks/bench.py: the floor and ours in processes of their own, taking their steps in turn
# (benchmarks/lockstep.py), on a workspace `prepare` made. Only speed: the held-out scoring is left out.


def fitting_pairs(registry: Registry, ref: str, base: str, max_length: int, count: int, seed: int) -> str:
    """A seeded sample of `count` pairs of `ref` that fit `max_length` tokens whole, so that neither trainer cuts
    or drops any (TRL drops a long pair, ours cuts its prompt): both train on the same tokens. Registered; its ref."""
    from align.models import load_tokenizer

    rows = registry.rows(ref)
    random.Random(seed).shuffle(rows)
    encoded, _ = encode_rows(load_tokenizer(base), rows, max_length, overflow="cut")
    kept = [row for row, item in zip(rows, encoded) if item is not None and not item.truncated][:count]
    if len(kept) < count:
        raise SystemExit(f"only {len(kept)} pairs of {ref} fit {max_length} tokens; ask for fewer")
    return registry.register(kept, name=f"bench-fit-{max_length}", kind="preference", parents=[ref]).ref


def contestant(spec: dict, callback) -> dict:
    args = argparse.Namespace(**spec["args"])
    registry = Registry(Path(spec["workspace"]))
    if spec["variant"] == "trl":
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = floor_trainer(registry, spec["train_ref"], args, output_dir, spec["base"])
            trainer.add_callback(callback)
            trainer.train()
            return {"items": len(trainer.train_dataset)}
    overrides = {"model": spec["base"]} | spec.get("overrides", {})
    result = run_ours(registry, spec["train_ref"], None, args, "ours", overrides, callbacks=[callback])
    return {"items": result["trained"], "stage_seconds": result["wall"]}


def contestants(base: str, workspace: Path, train_ref: str, args, overrides: dict | None = None) -> dict:
    """The specs benchmarks/lockstep.py runs: {"trl": ..., "ours": ...}."""
    spec = {
        "base": base,
        "workspace": str(workspace),
        "train_ref": train_ref,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "overrides": overrides or {},
    }
    return {name: ("rm_benchmark:contestant", spec | {"variant": name}) for name in ("trl", "ours")}


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, body = text.partition(":")
    values = {}
    for item in filter(None, body.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise SystemExit(f"--variant {text!r}: write NAME:key=value,key=value")
        values[key.strip()] = value.strip()
    return name, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="the HH-harmless JSONL file")
    parser.add_argument("--pairs", type=int, help="training pairs to sample (default: the whole train split)")
    parser.add_argument("--eval-pairs", type=int, help="held-out pairs to sample (default: the whole test split)")
    parser.add_argument("--test-size", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...")
    parser.add_argument("--skip-floor", action="store_true")
    parser.add_argument("--skip-untrained", action="store_true")
    parser.add_argument("--skip-ours", action="store_true", help="only the --variant runs")
    parser.add_argument("--curve", metavar="N,N,...", help="train ours on the first N pairs of one shuffle of the "
                        "train split for each N (a learning curve); plotted to --plot")  # fmt: skip
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "results" / "rm-learning-curve.png")
    parser.add_argument("--workspace", type=Path, help="default: a temporary folder")
    args = parser.parse_args()

    workspace = args.workspace or Path(tempfile.mkdtemp(prefix="rm-benchmark-"))
    registry, train_ref, test_ref = prepare(workspace, args)
    results = {}
    if not args.skip_untrained:
        results["untrained head"] = run_untrained(registry, test_ref, args)
        print(f"untrained head: {results['untrained head']}", flush=True)
    if not args.skip_floor:
        results["TRL floor"] = run_floor(registry, train_ref, test_ref, args)
        print(f"TRL floor: {results['TRL floor']}", flush=True)
        gc.collect()
    runs = ([] if args.skip_ours else [("ours", {})]) + [parse_variant(v) for v in args.variant]
    for name, overrides in runs:
        started = time.perf_counter()
        results[name] = run_ours(registry, train_ref, test_ref, args, name, overrides)
        print(f"{name}: {results[name]} ({time.perf_counter() - started:.0f} s with evaluation)", flush=True)
        gc.collect()
    if args.curve:
        results |= learning_curve(registry, train_ref, test_ref, args)

    print(f"\nworkspace {workspace}; {train_ref} -> {test_ref}, max_length {args.max_length}")
    columns = ("trained", "dropped", "train s", "stage s", "pairs/s", "acc<=256", "acc(all) [95% interval]", "ECE")
    header = f"{'model':<28} " + " ".join(f"{c:>8}" for c in columns)
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        speed = r["trained"] / r["seconds"] if r["seconds"] else float("nan")
        low, high = wilson_interval(r["acc_all"] * r["all_pairs"], r["all_pairs"])
        print(
            f"{name:<28} {r['trained']:>8} {r['dropped']:>8} {r['seconds']:>8.0f} {r.get('wall', 0):>8.0f} "
            f"{speed:>8.2f} "
            f"{r['acc_fit']:>8.3f} {r['acc_all']:>8.3f} [{low:.3f}, {high:.3f}] {r['ece']:>8.3f}"
        )
    some = next(iter(results.values()))
    print(f"(acc<=256 on the {some['fit_pairs']} held-out pairs that fit whole; acc(all) on all {some['all_pairs']})")
    print(f"matmul speed now: {gemm_gflops():.0f} GFLOP/s fp32 (this machine's speed drifts)")


if __name__ == "__main__":
    main()
