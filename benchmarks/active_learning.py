"""Active learning: does serving the reward model's least sure pairs first give a better reward model from fewer
human labels? Simulated annotators label the HH train pairs in two orders, from the same starting reward model.

    # the full run: the embedded SmolLM2-135M with the RM recipe (about 2 hours on one free core; see Cost);
    # started again after a stop, it goes on from its last finished round
    python benchmarks/active_learning.py
    # a smoke test: a tiny model built from a config, 80 pool pairs (under a minute)
    python benchmarks/active_learning.py --quick

The pool is the train split of the shared HH-harmless file, split as benchmarks/rm_benchmark.py splits it (seed 0,
10% held out: 1,437 pairs in the pool, 160 held out). The oracle is the recorded human choice: the simulated
annotator always picks the pair's `chosen` reply, so a label is the pair as recorded. Both orders start from the
same seed set (the first --seed-labels pairs of one seeded shuffle of the pool) and the same starting reward
model trained on it. Then, every --every labels, each order takes that many more labels and the reward model is
retrained from the same initial weights on all the labels it has so far, and scored on the held-out pairs:

  random       the next pairs of the same shuffle (what `align label --order random` serves)
  uncertainty  the pairs the current reward model is least sure of: the smallest |r_chosen - r_rejected|, its
               preference probability nearest 1/2 (align/label_order.py's measure, the one `align label --order
               uncertainty` serves); it never looks at which reply was chosen

Accuracy is the share of held-out pairs scored chosen above rejected, with its 95% Wilson interval; the gap
between the orders at each count has a paired bootstrap interval (the same held-out pairs). The target: the
uncertainty order reaches the random order's accuracy at 800 labels with 600 labels or fewer. With 160 held-out
pairs an interval is about +-7 points wide, so read one run's curve with that in mind.

The reward model is the real one of `align rm --config recipes/rm/smollm2-135m-lora.yaml` (its settings are read
from the recipe): the base's bottom 24 layers, LoRA on the top 2 of them plus the score head, the head on the
mean of the reply's tokens, the recipe's learning rate, schedule and batch size, trained by the stage's
PreferenceRewardTrainer and loss. To be affordable it trains as the recipe does with `cache_frozen_layers: true`
(reward/features.py): the 22 frozen layers run once per pair for the whole pool and the held-out pairs, and every
retraining and every scoring runs only the top 2 layers on those cached states: the same arithmetic as the whole
model. One difference from the stage: every pair is cut to one length (--max-length, default the recipe's
training length, 192 tokens), for training, scoring the pool and the held-out evaluation alike (`align rm eval`
scores at 256), so one cache serves all three. Each retraining runs --epochs epochs (default 1, the recipe's own:
the 100-label starting model then takes 13 optimizer steps; --epochs 2 doubles the retraining time).

The uncertainty order's next pairs are always picked by the model trained on its own labels so far. Every
finished round is saved (the curves, the labels so far and the next picks) in active-learning-state.json beside
the results, and the cached states in the align cache (about 1 GB): started again with the same settings, the run
goes on from its last finished round, and on the same machine skips the caching too.

Cost of the full run (estimated from rates measured on a 64-pair probe on one shared core, scaled to a free
core): caching the frozen layers, 0.95 pairs/s; retraining on cached states, 1.9 pair-epochs/s; scoring cached
states, about 4 pairs/s. The full run caches 1,597 pairs (about 28 minutes), retrains 15 times on 100 to 800
labels (7,100 pair-epochs at one epoch, about an hour), scores the unlabelled pool after each of the 7
uncertainty retrainings that pick a next round (about 7,300 pairs, 30 minutes) and the 160 held-out pairs 15
times (10 minutes): a little over 2 hours on one free core. The script prints the measured speed of each part as
it goes, and the results file the minutes the run took.

Writes benchmarks/results/active-learning.png (accuracy against labels, both orders, with intervals) and
benchmarks/results/active-learning.txt (the settings, the table and the verdict). --quick writes them to a
temporary folder instead, and its numbers mean nothing: a random tiny model on 80 pairs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import load_config, peft_config_for  # noqa: E402
from align.label_order import uncertainty_order  # noqa: E402
from align.registry import Registry  # noqa: E402
from align.stats import bootstrap_ci, wilson_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "rm" / "smollm2-135m-lora.yaml"
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"
RESULTS = ROOT / "benchmarks" / "results"
ORDERS = ("random", "uncertainty")


@dataclass
class Setup:
    """The reward model with its initial trainable weights, and the cached frozen-layer states of every pair."""

    model: object
    tokenizer: object
    config: object  # the recipe's RewardStageConfig
    cut: int  # the first trainable layer: the cached states enter it
    initial: dict  # trainable parameter name -> its initial value (LoRA and the fresh head)
    examples: list[dict]  # one per pair (pool, then held out): token ids, reply start, index into `states`
    states: list  # (chosen, rejected) cached states per pair

    @property
    def reply_mean(self) -> bool:
        return self.config.pooling == "reply_mean"


# The data: the rm benchmark's split


def split_rows(workspace: Path, args) -> tuple[list[dict], list[dict]]:
    registry = Registry(workspace)
    source, _ = registry.import_file(args.data, name="hh-harmless")
    train, test = registry.split(source.ref, test_size=0.1, seed=0)  # benchmarks/rm_benchmark.py's split
    pool, held_out = registry.rows(train), registry.rows(test)
    if args.pool and args.pool < len(pool):
        pool = random.Random(args.seed).sample(pool, args.pool)
    if args.held_out and args.held_out < len(held_out):
        held_out = random.Random(args.seed).sample(held_out, args.held_out)
    registry.close()
    print(f"data: {len(pool)} pool pairs ({train.ref}), {len(held_out)} held-out pairs ({test.ref})")
    return pool, held_out


# The model: the rm stage's, with its frozen layers cached


def recipe_config(model: str, output_dir: str, args):
    """The RM recipe's settings, as a RewardStageConfig (for the trainer), with this benchmark's overrides."""
    from reward.train import RewardStageConfig

    overrides = {
        "model": model,
        "dataset": "unused",  # the stage reads its data from the registry; this benchmark hands the trainer pairs
        "output_dir": output_dir,
        "report_to": "none",
        "save_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "num_train_epochs": args.epochs,
        "seed": args.seed,
        "cache_frozen_layers": True,
    }
    if args.max_length:
        overrides["max_length"] = args.max_length
    if args.quick:  # the tiny model has 4 layers: LoRA on the top one, no layers dropped
        overrides |= {"num_layers": None, "lora_top_layers": 1, "per_device_eval_batch_size": 8, "warmup_steps": 2}
    return load_config(RewardStageConfig, RECIPE, overrides)


def build(config, rows: list[dict], cache: Path | None = None) -> Setup:
    """The model and the cached states; `cache`, a file that keeps the states for a resumed run."""
    import torch
    from peft import get_peft_model
    from transformers import set_seed

    from align.truncation import encode_rows
    from reward.features import keep_layers
    from reward.model import load_scorer
    from reward.train import cache_states
    from reward.trainer import layer_linear_names, top_layers, training_examples

    model, tokenizer, _ = load_scorer(config.model, seed=config.seed, dtype=config.torch_dtype)
    if config.num_layers:
        keep_layers(model, config.num_layers)
    peft_config = peft_config_for(config, "SEQ_CLS")
    peft_config.modules_to_save = ["score"]
    peft_config.target_modules = layer_linear_names(model, config.lora_target_modules)
    peft_config.layers_to_transform = top_layers(model, config.lora_top_layers)
    peft_config.layers_pattern = "layers"
    set_seed(config.seed)
    model = get_peft_model(model, peft_config)
    cut = model.config.num_hidden_layers - config.lora_top_layers
    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    encoded, stats = encode_rows(tokenizer, rows, config.max_length, overflow="cut")  # cut, never dropped
    examples, _ = training_examples(rows, encoded, use_margins=False, use_weights=False, ties="together")
    if len(examples) != len(rows):
        raise SystemExit(f"{len(rows) - len(examples)} pairs could not be encoded")
    for index, example in enumerate(examples):
        example["index"] = index
    print(f"encoded: {stats.describe()}")
    states = None
    if cache is not None and cache.exists():
        states = torch.load(cache)
        print(f"read the cached frozen-layer states of {len(states)} pairs from {cache}")
    if states is None or len(states) != len(examples):
        started = time.perf_counter()
        states = cache_states(model, examples, cut, tokenizer, config)
        seconds = time.perf_counter() - started
        print(f"cached the frozen layers of {len(rows)} pairs in {seconds:.0f} s ({len(rows) / seconds:.2f} pairs/s)")
        if cache is not None:  # a resumed run on this machine skips the slowest part
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save(states, cache.with_suffix(".partial"))
            cache.with_suffix(".partial").replace(cache)
    return Setup(model, tokenizer, config, cut, initial, examples, states)


def retrain(setup: Setup, labelled: list[int]) -> float:
    """Train from the initial weights on the labelled pairs, as the rm stage does on cached states; returns the
    seconds it took."""
    import datasets
    import torch
    from transformers import set_seed

    from reward.features import top_layers_only
    from reward.trainer import CachedStateCollator, PreferenceRewardTrainer

    started = time.perf_counter()
    with torch.no_grad():
        for name, parameter in setup.model.named_parameters():
            if name in setup.initial:
                parameter.copy_(setup.initial[name])
    set_seed(setup.config.seed)
    trainer = PreferenceRewardTrainer(
        model=setup.model,
        args=setup.config,
        data_collator=CachedStateCollator(setup.states, setup.reply_mean),
        train_dataset=datasets.Dataset.from_list([setup.examples[i] for i in labelled]),
        processing_class=setup.tokenizer,
    )
    with top_layers_only(setup.model, setup.cut):
        trainer.train()
    return time.perf_counter() - started


def score(setup: Setup, indices: list[int], batch_size: int = 16) -> list[tuple[float, float]]:
    """(chosen, rejected) scores of these pairs, from their cached states through the top layers."""
    import torch

    from reward.features import pad_states, score_states, top_layers_only

    setup.model.eval()
    found = []
    with torch.inference_mode(), top_layers_only(setup.model, setup.cut):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            pairs = [setup.states[i] for i in chunk]
            states, attention_mask = pad_states([c for c, _ in pairs] + [r for _, r in pairs])
            starts = None
            if setup.reply_mean:
                starts = torch.tensor([setup.examples[i]["reply_start"] for i in chunk] * 2, dtype=torch.long)
            values = score_states(setup.model, states, attention_mask, starts).float().tolist()
            found += list(zip(values[: len(chunk)], values[len(chunk) :]))
    return found


def correct(scores: list[tuple[float, float]]) -> list[float]:
    """Per held-out pair: 1 when chosen scores above rejected, 1/2 on a tie, else 0."""
    return [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in scores]


# The simulation


def simulate(setup: Setup, pool: list[int], held_out: list[int], args, state_path: Path | None = None) -> dict:
    """{order: [(labels, per-pair correctness on the held-out pairs, seconds)]}, both orders from one start.

    The uncertainty order's next pairs are picked by the model trained on its own labels so far, right after that
    model is scored. With `state_path`, every finished round is written there (the curves, the uncertainty order's
    labels and its next picks), and a run started again with the same settings goes on from the last round."""
    shuffled = pool[:]
    random.Random(args.seed).shuffle(shuffled)
    seed_set = shuffled[: args.seed_labels]
    counts = list(range(args.seed_labels, args.budget + 1, args.every))
    state = load_state(state_path, args)
    if state:
        curves, active, picks = state["curves"], state["active"], state["picks"]
        print(f"resuming from {state_path}: {curves['random'][-1][0]} labels done")
    else:
        seconds = retrain(setup, seed_set)
        start = correct(score(setup, held_out))
        accuracy = sum(start) / len(start)
        print(f"starting reward model, {len(seed_set)} labels: accuracy {accuracy:.3f} ({seconds:.0f} s)")
        active = seed_set[:]
        picks, choosing = least_sure(setup, pool, active, args.every)
        curves = {
            "random": [(len(seed_set), start, seconds)],
            "uncertainty": [(len(seed_set), start, seconds + choosing)],
        }
        save_state(state_path, args, curves, active, picks)
    for labels in counts[1:]:
        if labels <= curves["random"][-1][0]:
            continue
        active = active + picks[: labels - len(active)]
        for order, labelled in (("uncertainty", active), ("random", shuffled[:labels])):
            seconds = retrain(setup, labelled)
            hits = correct(score(setup, held_out))
            choosing, note = 0.0, ""
            if order == "uncertainty" and labels < counts[-1]:  # this model picks the next round's pairs
                picks, choosing = least_sure(setup, pool, active, args.every)
                note = f"; scored {len(pool) - len(active)} pool pairs in {choosing:.0f} s"
            curves[order].append((labels, hits, seconds + choosing))
            print(
                f"{order:<12} {labels:>5} labels: accuracy {sum(hits) / len(hits):.3f} "
                f"(retrained in {seconds:.0f} s, {len(labelled) * args.epochs / seconds:.2f} pairs/s{note})",
                flush=True,
            )
        save_state(state_path, args, curves, active, picks)
    return curves


def least_sure(setup: Setup, pool: list[int], labelled: list[int], count: int) -> tuple[list[int], float]:
    """The `count` unlabelled pool pairs the current model is least sure of, and the seconds scoring took."""
    started = time.perf_counter()
    taken = set(labelled)
    unlabelled = [i for i in pool if i not in taken]
    pool_scores = score(setup, unlabelled)
    picked = uncertainty_order([(0, 1)] * len(unlabelled), range(len(unlabelled)), pool_scores)
    return [unlabelled[i] for i in picked[:count]], time.perf_counter() - started


# Resuming: the finished rounds, keyed by the settings that shape them

SETTINGS = ("data", "pool", "held_out", "seed_labels", "every", "budget", "epochs", "max_length", "seed", "quick")


def settings_of(args) -> dict:
    return {key: str(getattr(args, key)) for key in SETTINGS}


def load_state(path: Path | None, args) -> dict | None:
    import json

    if path is None or not path.exists():
        return None
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("settings") != settings_of(args):
        print(f"{path} holds a run with other settings: starting afresh (it will be overwritten)")
        return None
    state["curves"] = {order: [tuple(point) for point in points] for order, points in state["curves"].items()}
    return state


def save_state(path: Path | None, args, curves: dict, active: list[int], picks: list[int]) -> None:
    import json

    if path is None:
        return
    state = {"settings": settings_of(args), "curves": curves, "active": active, "picks": picks}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(state), encoding="utf-8")
    partial.replace(path)


# The report


def verdict(curves: dict, reference: int, target: int) -> tuple[str, float | None, int | None]:
    """(a sentence, random's accuracy at `reference` labels, the fewest labels at which uncertainty reaches it)."""
    random_at = {labels: sum(h) / len(h) for labels, h, _ in curves["random"]}
    if reference not in random_at:
        return f"the random order has no point at {reference} labels (see --budget and --every)", None, None
    goal = random_at[reference]
    reached = next((labels for labels, h, _ in curves["uncertainty"] if sum(h) / len(h) >= goal), None)
    if reached is None:
        text = f"not met: the uncertainty order never reached {goal:.3f} (random at {reference} labels)"
    else:
        met = "met" if reached <= target else "not met"
        text = (
            f"{met}: the uncertainty order reached {goal:.3f} (random at {reference} labels) with {reached} labels "
            f"(target: {target} or fewer)"
        )
    return text, goal, reached


def table(curves: dict, rounds: int = 2000) -> list[str]:
    import numpy as np

    lines = [
        f"{'labels':>6}  {'random [95% interval]':>24}  {'uncertainty [95% interval]':>27}  "
        f"{'uncertainty - random [95% paired bootstrap]':>44}"
    ]
    for (labels, plain, _), (_, active, _) in zip(curves["random"], curves["uncertainty"]):
        n = len(plain)
        cells = []
        for hits in (plain, active):
            low, high = wilson_interval(sum(hits), n)
            cells.append(f"{sum(hits) / n:.3f} [{low:.3f}, {high:.3f}]")
        difference = np.asarray(active) - np.asarray(plain)
        low, high = bootstrap_ci(lambda idx, d=difference: d[idx].mean(), n, rounds=rounds)
        gap = f"{difference.mean():+.3f} [{low:+.3f}, {high:+.3f}]"
        lines.append(f"{labels:>6}  {cells[0]:>24}  {cells[1]:>27}  {gap:>44}")
    return lines


def plot(curves: dict, goal: float | None, reference: int, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for order, colour in zip(ORDERS, ("tab:grey", "tab:blue")):
        labels = [point[0] for point in curves[order]]
        accuracy = [sum(point[1]) / len(point[1]) for point in curves[order]]
        intervals = [wilson_interval(sum(point[1]), len(point[1])) for point in curves[order]]
        errors = [
            [a - lo for a, (lo, _) in zip(accuracy, intervals)],
            [hi - a for a, (_, hi) in zip(accuracy, intervals)],
        ]
        ax.errorbar(labels, accuracy, yerr=errors, marker="o", capsize=3, color=colour, label=f"{order} order")
    if goal is not None:
        ax.axhline(goal, color="tab:grey", linestyle=":", label=f"random at {reference} labels")
    ax.axhline(0.5, color="black", linewidth=0.6, linestyle="--", label="chance")
    ax.set_xlabel("human labels (pairs)")
    ax.set_ylabel(f"held-out accuracy ({len(curves['random'][0][1])} pairs, 95% interval)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# A tiny model for --quick


def tiny_model(folder: Path) -> str:
    """A 4-layer Llama built from a config, with a byte-level tokenizer and a ChatML template; random weights."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(alphabet)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke test on a tiny model built from a config")
    parser.add_argument("--data", type=Path, default=DATA, help="the HH-harmless JSONL file")
    parser.add_argument("--pool", type=int, help="pool pairs to sample from the train split (default: all)")
    parser.add_argument("--held-out", type=int, help="held-out pairs to sample from the test split (default: all)")
    parser.add_argument("--seed-labels", type=int, default=100, help="labels of the starting reward model")
    parser.add_argument("--every", type=int, default=100, help="labels between two retrainings (K)")
    parser.add_argument("--budget", type=int, default=800, help="labels at the end")
    parser.add_argument("--reference", type=int, default=800, help="the random order's label count to match")
    parser.add_argument("--target", type=int, default=600, help="labels the uncertainty order may use to match it")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of each retraining")
    parser.add_argument("--max-length", type=int, help="tokens per pair (default: the recipe's max_length)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="where the png and txt go (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    if args.quick:  # small enough for a test: every count scaled down
        args.pool, args.held_out = args.pool or 80, args.held_out or 40
        args.seed_labels, args.every, args.budget, args.reference, args.target = 10, 10, 40, 30, 20
        args.epochs, args.max_length = 1, args.max_length or 96
    if not 0 < args.seed_labels <= args.budget or args.every < 1:
        parser.error("need 0 < --seed-labels <= --budget and --every >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="active-learning-") as scratch:
        scratch = Path(scratch)
        out = args.out or (Path(tempfile.mkdtemp(prefix="active-learning-quick-")) if args.quick else RESULTS)
        name = "active-learning-quick" if args.quick else "active-learning"
        pool_rows, held_rows = split_rows(scratch / "ws", args)
        if args.budget > len(pool_rows):
            raise SystemExit(f"--budget {args.budget} is more than the {len(pool_rows)} pool pairs")
        model = tiny_model(scratch / "tiny") if args.quick else "smollm2-135m"
        config = recipe_config(model, str(scratch / "trainer"), args)
        cache = None
        if not args.quick:  # keyed by the settings that shape the states
            from align.models import cache_dir

            key = hashlib.sha256(repr((settings_of(args), config.max_length)).encode()).hexdigest()[:16]
            cache = cache_dir() / "active-learning" / f"states-{key}.pt"
        setup = build(config, pool_rows + held_rows, cache)
        pool = list(range(len(pool_rows)))
        held_out = list(range(len(pool_rows), len(pool_rows) + len(held_rows)))
        curves = simulate(setup, pool, held_out, args, out / f"{name}-state.json")
        text, goal, _ = verdict(curves, args.reference, args.target)
        what = "a tiny random model (--quick: the numbers mean nothing)" if args.quick else "SmolLM2-135M, RM recipe"
        title = f"Active learning on HH: {what}, retrained every {args.every} labels"
        plot(curves, goal, args.reference, out / f"{name}.png", title)
        minutes = (time.perf_counter() - started) / 60
        lines = [
            f"Active learning benchmark, {date.today().isoformat()}: python benchmarks/active_learning.py"
            + (" --quick" if args.quick else ""),
            f"model: {what}; layers cached below {setup.cut}; max_length {config.max_length}; "
            f"{args.epochs} epoch(s) per retraining, learning rate {config.learning_rate}, batch "
            f"{config.per_device_train_batch_size}",
            f"pool: {len(pool)} HH train pairs; held out: {len(held_out)} HH test pairs; seed set {args.seed_labels}, "
            f"then {args.every} labels per round up to {args.budget}; seed {args.seed}",
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {minutes:.1f} minutes in all",
            "",
            *table(curves),
            "",
            f"target (uncertainty reaches random's {args.reference}-label accuracy with <= {args.target} labels): "
            + text,
            f"plot: {out / f'{name}.png'}",
        ]
        (out / f"{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print("\n".join(lines))
        print(f"results: {out / f'{name}.txt'}")
    return {"curves": curves, "verdict": text}


if __name__ == "__main__":
    main()
