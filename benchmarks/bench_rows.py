"""The rows of benchmarks/bench.py: one function each, taking the run's Context and returning its figures.

    gemm        the machine's matmul peak, fp32 (and bf16, marked emulated where it is not native)
    sft         ours against TRL's SFTTrainer (benchmarks/sft_benchmark.py), in lockstep
    rm          ours against TRL's RewardTrainer (benchmarks/rm_benchmark.py), in lockstep, plus held-out accuracy
    dpo         ours against TRL's DPOTrainer (benchmarks/dpo_benchmark.py), in lockstep
    ppo         ours against TRL 1.9.2's PPOTrainer (benchmarks/ppo_benchmark.py), one process each, in turn
    generation  `align generate`'s sampling against plain batched `model.generate`, interleaved rounds
    registry    import of 100,000 HH-style pairs, and `load` of that version
    label       vote latency of the labeling server (benchmarks/label_load.py)
    demo        `make demo` until it prints the serve URL (opt-in: --demo)

A row returns {"figures": [bench_report.figure(...)], "notes": [text], "details": {...}}; bench.py times it and
records a failure (with its error) without stopping the others. --quick shrinks every row to a tiny model built
from a config and a few examples: the path is exercised, the figures mean nothing.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench_report import figure

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = ROOT.parent / "shared" / "data"
HH = DATA / "hh-rlhf-harmless-dev.jsonl.gz"


@dataclass
class Context:
    quick: bool
    folder: Path  # scratch space for this run
    say: callable = print
    import_pairs: int | None = None  # the registry row's size (default: 100,000; 2,000 under --quick)
    peaks: dict = field(default_factory=dict)  # {"fp32": {threads: GFLOP/s}, "bf16": {...}}
    bf16_native: bool = False
    _base: str | None = None

    @property
    def base(self) -> str:
        """The model the training rows start from: the embedded SmolLM2, or under --quick a tiny one."""
        if self._base is None:
            if self.quick:
                sys.path.insert(0, str(ROOT / "tests"))
                from conftest import save_tiny_model

                self._base = str(save_tiny_model(self.folder / "tiny-model"))
            else:
                from align.models import EMBEDDED_ALIAS, resolve_model

                self._base = str(resolve_model(EMBEDDED_ALIAS).base)
        return self._base

    def scratch(self, name: str) -> Path:
        path = self.folder / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def peak(self, threads: int, precision: str = "fp32") -> float:
        """GFLOP/s of the matmul peak at `threads` (measured now if the gemm row did not)."""
        import torch
        from flops import gemm_gflops

        table = self.peaks.setdefault(precision, {})
        if str(threads) not in table:
            dtype = torch.float32 if precision == "fp32" else torch.bfloat16
            table[str(threads)] = max(gemm_gflops(dtype, threads, size) for size in (512, 1024))
        return table[str(threads)]

    def mfu(self, result: dict) -> float | None:
        """A lockstep result's achieved FLOP/s as a percentage of the peak at its threads and precision."""
        if not result.get("seconds") or not result.get("threads"):
            return None
        precision = "bf16" if result.get("bf16") and self.bf16_native else "fp32"
        return 100 * result["flops"] / result["seconds"] / (self.peak(result["threads"], precision) * 1e9)


# 1. The machine


def gemm(ctx: Context) -> dict:
    import torch
    from flops import bf16_native, cpu_capability, cpu_flags, gemm_gflops

    flags = cpu_flags()
    ctx.bf16_native = bf16_native(flags)
    most = torch.get_num_threads()
    sizes = (512, 1024) if ctx.quick else (1024, 2048)
    repeats = 2 if ctx.quick else 4
    figures, notes = [], []
    for threads in sorted({1, most}):
        fp32 = max(gemm_gflops(torch.float32, threads, size, repeats=repeats) for size in sizes)
        ctx.peaks.setdefault("fp32", {})[str(threads)] = fp32
        figures.append(figure(f"fp32 matmul peak, {threads} thread{'s' * (threads > 1)}", fp32, unit="GFLOP/s"))
        # emulated bf16 runs ~30x slower than fp32 here: a small matmul says so well enough
        size = 1024 if ctx.bf16_native and not ctx.quick else 512
        bf16 = gemm_gflops(torch.bfloat16, threads, size, repeats=2 if ctx.bf16_native else 1, trials=2)
        if ctx.bf16_native:
            ctx.peaks.setdefault("bf16", {})[str(threads)] = bf16
        kind = "native" if ctx.bf16_native else "emulated, not native: not a peak"
        figures.append(figure(f"bf16 matmul, {threads} thread{'s' * (threads > 1)}", bf16, unit="GFLOP/s", note=kind))
    capability = cpu_capability()
    native = "AMX or AVX-512 BF16" if ctx.bf16_native else "neither AMX nor AVX-512 BF16 (no bf16 in hardware)"
    notes.append(
        f"Square matmuls of {' and '.join(map(str, sizes))}, the best of 3 timings of {repeats} each, at 1 thread "
        f"and at torch's default ({most}, what the stages use unless a recipe says otherwise). torch's CPU "
        f"capability: {capability}; /proc/cpuinfo: {native}. MFU in the training rows is against the fp32 peak at "
        "the threads the trainer ran with" + (" (the bf16 peak for a bf16 run)." if ctx.bf16_native else ".")
    )
    relevant = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    return {
        "figures": figures,
        "notes": notes,
        "details": {"peaks": ctx.peaks, "bf16_native": ctx.bf16_native, "capability": capability, "flags": relevant},
    }


# 2. Training: ours against TRL's trainer, in lockstep


def training_figures(ctx: Context, results: dict, unit: str, peer_name: str, target: str) -> list[dict]:
    ours, trl = results["ours"], results["trl"]
    mfu_ours, mfu_trl = ctx.mfu(ours), ctx.mfu(trl)
    threads = f"{ours['threads']} / {trl['threads']} threads"
    return [
        figure(
            unit, ours["items"] / ours["seconds"], trl["items"] / trl["seconds"], peer_name=peer_name, target=target
        ),
        figure("peak RSS", ours["peak_rss_gb"], trl["peak_rss_gb"], unit="GB", peer_name=peer_name),
        figure("MFU", mfu_ours, mfu_trl, unit="%", peer_name=peer_name, note=f"of the matmul peak; {threads}"),
    ]


def training_details(results: dict) -> dict:
    return {
        name: {key: value for key, value in result.items() if key != "event"}
        | {"flops_per_item": result["flops"] / max(result["items"], 1)}
        for name, result in results.items()
    }


def sft(ctx: Context) -> dict:
    from lockstep import run_lockstep
    from sft_benchmark import benchmark_rows, contestants

    samples, batch = (8, 4) if ctx.quick else (48, 8)
    folder = ctx.scratch("sft")
    rows = benchmark_rows(ctx.base, samples=samples, fit_length=256, seed=0)
    results = run_lockstep(contestants(ctx.base, rows, folder, batch=batch, max_length=512, seed=0), folder, ctx.say)
    note = (
        f"{samples} Self-Instruct seed-task samples that fit 256 tokens, batch {batch}, one epoch, LoRA r16 on every "
        "linear layer; TRL's SFTConfig defaults (gradient checkpointing, random order) against recipes/sft/"
        "smollm2-135m-lora.yaml (grouped by length, no checkpointing); each in its own process, steps in turn "
        "(benchmarks/sft_benchmark.py). samples/s over the training loop; MFU per benchmarks/flops.py."
    )
    return {
        "figures": training_figures(ctx, results, "samples/s", "TRL SFTTrainer", "ratio >= 1.2"),
        "notes": [note],
        "details": training_details(results),
    }


def rm(ctx: Context) -> dict:
    from lockstep import run_lockstep
    from rm_benchmark import contestants, fitting_pairs, prepare

    pairs, length = (8, 128) if ctx.quick else (48, 192)
    args = argparse.Namespace(data=HH, pairs=None, eval_pairs=None, test_size=0.1, max_length=256, seed=0)
    workspace = ctx.scratch("rm") / "ws"
    registry, train_ref, _ = prepare(workspace, args)
    fit_ref = fitting_pairs(registry, train_ref, ctx.base, length, pairs, seed=0)
    overrides = {"max_length": length}
    if ctx.quick:
        overrides |= {"num_layers": None, "lora_top_layers": 1}  # the tiny model has 2 layers
    results = run_lockstep(contestants(ctx.base, workspace, fit_ref, args, overrides), ctx.scratch("rm"), ctx.say)
    figures = training_figures(ctx, results, "pairs/s", "TRL RewardTrainer", "ratio >= 1.5")
    accuracy = latest_rm_accuracy(RESULTS)
    if accuracy["ours"] is not None:
        target = "ratio >= 1" if accuracy["floor"] is not None else None
        figures.append(
            figure(
                "held-out accuracy",
                accuracy["ours"],
                accuracy["floor"],
                peer_name="TRL floor",
                target=target,
                note=f"from {accuracy['source']}, not this run",
            )
        )
    notes = [
        f"{pairs} HH-harmless training pairs that fit {length} tokens whole (neither trainer cuts or drops any), "
        "batch 8, one epoch; the floor is TRL's RewardTrainer as documented (LoRA r16 on q/v of every layer, "
        "gradient checkpointing, fp32), ours `align rm` on recipes/rm/smollm2-135m-lora.yaml (the whole stage, "
        "timed over its training loop); each in its own process, steps in turn (benchmarks/rm_benchmark.py).",
        f"Held-out accuracy is not measured here (a full training run takes most of an hour): {accuracy['text']}",
    ]
    return {"figures": figures, "notes": notes, "details": training_details(results) | {"accuracy": accuracy}}


def latest_rm_accuracy(folder: Path) -> dict:
    """Ours and the TRL floor's held-out accuracy (all test pairs) from the newest rm_benchmark logs that hold them
    (benchmarks/results/DATE-rm-MACHINE.txt: lines 'ours: {...}' and 'TRL floor: {...}')."""
    found = {"ours": None, "floor": None, "source": None, "floor_source": None}
    logs = sorted(p for p in folder.glob("*-rm-*.txt") if re.match(r"\d{4}-\d\d-\d\d-rm-[a-z0-9-]+\.txt$", p.name))
    for path in reversed(logs):
        if re.search(r"-rm-(learning-curve|validation)", path.name):
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            match = re.match(r"^(ours|TRL floor): (\{.*?\})", line)
            if not match:
                continue
            key = "ours" if match.group(1) == "ours" else "floor"
            if found[key] is None:
                found[key] = ast.literal_eval(match.group(2))["acc_all"]
                found["source" if key == "ours" else "floor_source"] = f"benchmarks/results/{path.name}"
    if found["ours"] is None:
        found["text"] = "no rm_benchmark log in benchmarks/results holds our figure."
    elif found["floor"] is None:
        found["text"] = (
            f"ours {found['ours']:.3f} on all held-out pairs ({found['source']}); no log there holds the TRL floor's "
            "figure, so 'equal or better accuracy' is not checked (`python benchmarks/rm_benchmark.py` measures both)."
        )
    else:
        found["text"] = (
            f"ours {found['ours']:.3f} ({found['source']}), the TRL floor {found['floor']:.3f} "
            f"({found['floor_source']})."
        )
    return found


def dpo(ctx: Context) -> dict:
    from dpo_benchmark import benchmark_pairs, contestants
    from lockstep import run_lockstep

    pairs, batch, length = (8, 4, 256) if ctx.quick else (48, 8, 128)
    args = argparse.Namespace(pairs=pairs, batch=batch, max_length=length, seed=0, levers=False, data=str(HH))
    rows = benchmark_pairs(args, ctx.base)
    folder = ctx.scratch("dpo")
    results = run_lockstep(contestants(ctx.base, rows, folder, args), folder, ctx.say)
    note = (
        f"{pairs} HH-harmless pairs both trainers keep whole at max_length {length}, batch {batch}, one epoch, a "
        "fresh LoRA (r16, every linear layer) on the base; TRL's DPOConfig defaults in fp32 against recipes/dpo/"
        "smollm2-135m-lora.yaml; each in its own process, steps in turn (benchmarks/dpo_benchmark.py; its --levers "
        "measures each change on its own). pairs/s over the training loop; the reference passes count as forward "
        "FLOPs."
    )
    return {
        "figures": training_figures(ctx, results, "pairs/s", "TRL DPOTrainer", "ratio >= 2.5"),
        "notes": [note],
        "details": training_details(results),
    }


# 3. PPO: one process per side, one after the other (benchmarks/ppo_benchmark.py)


def ppo(ctx: Context) -> dict:
    import ppo_benchmark as bench

    shape = (2, 4, 8, 1) if ctx.quick else (4, 8, 32, None)
    workspace = ctx.scratch("ppo") / "ws"
    args = argparse.Namespace(
        updates=shape[0], batch_size=shape[1], response_length=shape[2], gradient_accumulation_steps=shape[3]
    )
    bench.prepare(workspace, base=ctx.base if ctx.quick else None)
    ctx.say("    ours (one base, the roles as adapters) ...")
    ours = bench.measure("shared", workspace, args)
    peer, why = None, ""
    path = bench.install_trl_peer()
    if path is None:
        why = f"trl=={bench.TRL_PEER_VERSION} could not be installed: no peer figure"
    else:
        ctx.say(f"    TRL {bench.TRL_PEER_VERSION} PPOTrainer ...")
        pythonpath = os.pathsep.join(filter(None, [str(path), os.environ.get("PYTHONPATH")]))
        peer = bench.measure("trl19", workspace, args, env=os.environ | {"PYTHONPATH": pythonpath})
        if peer is None:
            why = f"the TRL {bench.TRL_PEER_VERSION} peer failed (its output is in the bench's log)"
    name = f"TRL {bench.TRL_PEER_VERSION} PPOTrainer"
    peer = peer or {}
    figures = [
        figure("s/update", ours["seconds_per_update"], peer.get("seconds_per_update"), peer_name=name,
               unit="s", target="ratio <= 0.5"),
        figure("peak RSS", ours["peak_rss_gb"], peer.get("peak_rss_gb"), unit="GB", peer_name=name,
               target="ours <= 2.5"),
        figure("rollout tokens/s", ours["rollout_tokens_per_s"], ours["plain_generate_tokens_per_s"],
               peer_name="plain generate, bare base"),
    ]  # fmt: skip
    notes = [
        f"SmolLM2-135M with an SFT-like LoRA policy, HH prompts, batch {args.batch_size}, response length "
        f"{args.response_length}, {args.updates} updates (the median after the first); each side in its own process, "
        "one after the other (not interleaved: the machine's matmul speed after each is in the details). Rollout: "
        "our PEFT policy's sampling against plain batched generate on the bare base, same prompts."
    ]
    if why:
        notes.append(why)
    return {"figures": figures, "notes": notes, "details": {"ours": ours, "peer": peer or None}}


# 4. Generation: `align generate`'s sampling against plain batched generate


class CountingModel:
    """The model, with the new (non-pad) tokens of every `generate` counted."""

    def __init__(self, model, pad_token_id: int):
        self.model, self.pad, self.tokens = model, pad_token_id, 0

    def generate(self, **kwargs):
        output = self.model.generate(**kwargs)
        self.tokens += int((output[:, kwargs["input_ids"].shape[1] :] != self.pad).sum())
        return output

    def __getattr__(self, name):
        return getattr(self.model, name)


def plain_generate(model, tokenizer, prompts: list, settings) -> int:
    """Batched `model.generate` in the prompts' own order, the same settings and batch size; new tokens made."""
    import torch

    tokenizer.padding_side = "left"
    made = 0
    for start in range(0, len(prompts), settings.batch_size):
        batch = prompts[start : start + settings.batch_size]
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in batch]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(settings.seed + start)
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=settings.max_new_tokens,
                do_sample=True,
                temperature=settings.temperature,
                top_p=settings.top_p,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = output[:, encoded["input_ids"].shape[1] :]
        tokenizer.batch_decode(new, skip_special_tokens=True)
        made += int((new != tokenizer.pad_token_id).sum())
    return made


def generation(ctx: Context) -> dict:
    from align.models import load_model
    from align.registry import Registry
    from align.sampling import ReplyJournal, SamplingSettings, merged_for_inference, sample

    count, new_tokens, batch, rounds = (8, 16, 4, 1) if ctx.quick else (32, 64, 8, 2)
    registry = Registry(ctx.scratch("generation") / "ws")
    registry.import_file(HH, name="hh")
    prompts = [row["prompt"] for row in registry.rows(registry.convert("hh", name="hh-prompts", kind="prompts"))]
    prompts = prompts[:count]
    settings = SamplingSettings(max_new_tokens=new_tokens, batch_size=batch, seed=0).resolved()
    model, tokenizer = load_model(ctx.base, dtype=settings.dtype)
    model = merged_for_inference(model)
    totals = {"ours": [0, 0.0], "plain": [0, 0.0]}

    def ours() -> int:
        counting = CountingModel(model, tokenizer.pad_token_id)
        journal = ReplyJournal(ctx.scratch("generation") / f"replies-{time.monotonic_ns()}.jsonl")
        sample(counting, tokenizer, prompts, 1, settings, on_batch=lambda made: journal.append("bench", made))
        return counting.tokens

    for number in range(rounds):
        order = [("ours", ours), ("plain", lambda: plain_generate(model, tokenizer, prompts, settings))]
        for name, run in order if number % 2 == 0 else order[::-1]:  # A/B, then B/A
            began = time.perf_counter()
            tokens = run()
            totals[name][0] += tokens
            totals[name][1] += time.perf_counter() - began
        ctx.say(f"    round {number + 1}: " + "  ".join(f"{k} {t / s:.1f} tokens/s" for k, (t, s) in totals.items()))
    speed = {name: tokens / seconds for name, (tokens, seconds) in totals.items()}
    note = (
        f"{count} HH prompts, 1 reply each, {new_tokens} new tokens at most, temperature {settings.temperature}, top_p "
        f"{settings.top_p}, batch {batch}, {settings.dtype} weights, "
        + (
            "one round (ours, then plain). "
            if rounds == 1
            else f"{rounds} rounds (ours then plain, then the reverse). "
        )
        + "Ours: align/sampling.py's `sample` as `align generate` runs it (prompts sorted by length, a seed per "
        "batch, each batch journaled); plain: `model.generate` on the prompts in their own order. tokens/s counts "
        "the new non-padding tokens over the whole call, tokenizing and decoding included."
    )
    return {
        "figures": [
            figure("tokens/s", speed["ours"], speed["plain"], peer_name="plain batched generate", target="ratio >= 0.9")
        ],
        "notes": [note],
        "details": {name: {"tokens": t, "seconds": s} for name, (t, s) in totals.items()},
    }


# 5. The registry: import and load


def synthesise_pairs(source: Path, count: int, out: Path) -> Path:
    """`count` HH-style pairs: the source's valid rows over and over, each copy's last turns marked ' (copy N)' so
    that no two rows are the same (the importer drops exact duplicates). Written as .jsonl.gz, like the source."""
    from align.registry.importers import import_file

    skipped = {int(m.group(1)) for line in import_file(source).skipped if (m := re.match(r"line (\d+)", line))}
    with gzip.open(source, "rt", encoding="utf-8") as lines:
        valid = [json.loads(line) for number, line in enumerate(lines, start=1) if number not in skipped]
    with gzip.open(out, "wt", encoding="utf-8", compresslevel=1) as handle:
        for index in range(count):
            row = valid[index % len(valid)]
            mark = f" (copy {index // len(valid)})" if index >= len(valid) else ""
            handle.write(json.dumps({"chosen": row["chosen"] + mark, "rejected": row["rejected"] + mark}) + "\n")
    return out


def registry(ctx: Context) -> dict:
    from align.registry import Registry

    count = ctx.import_pairs or (2_000 if ctx.quick else 100_000)
    folder = ctx.scratch("registry")
    began = time.perf_counter()
    source = synthesise_pairs(HH, count, folder / f"hh-{count}.jsonl.gz")
    ctx.say(
        f"    synthesised {count:,} pairs in {time.perf_counter() - began:.1f} s ({source.stat().st_size / 1e6:.0f} MB)"
    )
    began, cpu = time.perf_counter(), time.process_time()
    version, result = Registry(folder / "ws").import_file(source, name="hh-big")
    imported, imported_cpu = time.perf_counter() - began, time.process_time() - cpu
    began = time.perf_counter()
    import datasets  # noqa: F401  (Registry.load's library, imported once per process: timed on its own)

    libraries = time.perf_counter() - began
    began, cpu = time.perf_counter(), time.process_time()
    dataset = Registry(folder / "ws").load(version.ref)  # a fresh Registry, as a new process would open it
    loaded, loaded_cpu = time.perf_counter() - began, time.process_time() - cpu
    if len(dataset) != version.num_rows:
        raise RuntimeError(f"load returned {len(dataset)} rows, the version holds {version.num_rows}")
    scale = "" if count == 100_000 else f"at {count:,} pairs, not the target's 100,000"
    return {
        "figures": [
            figure(f"import {count:,} pairs", imported, unit="s", target="ours < 15", note=scale),
            figure(f"load {version.num_rows:,} pairs", loaded, unit="s", target="ours < 2", note=scale),
        ],
        "notes": [
            f"`Registry.import_file` (what `align data import` runs: detect the format, validate every row, write "
            f"Parquet, register) on {count:,} HH-style pairs synthesised from the shared HH file "
            f"({source.stat().st_size / 1e6:.0f} MB gzipped JSONL; {version.num_rows:,} rows registered, "
            f"{len(result.skipped)} skipped), then "
            "`Registry.load` of that version from a fresh Registry (a datasets.Dataset; importing the datasets "
            f"library, once per process, took {libraries:.1f} s more and is not in the figure). Wall-clock seconds; "
            f"this process's CPU seconds were {imported_cpu:.1f} and {loaded_cpu:.2f} (more wall than CPU: other "
            "work on the machine, or waiting on the disk). No peer: the targets are absolute."
        ],
        "details": {
            "pairs": count,
            "rows": version.num_rows,
            "import_s": imported,
            "load_s": loaded,
            "import_cpu_s": imported_cpu,
            "load_cpu_s": loaded_cpu,
            "datasets_import_s": libraries,
        },
    }


# 6. The labeling server


def label(ctx: Context) -> dict:
    import label_load

    if ctx.quick:
        argv = ["--annotators", "1,5", "--seconds", "3", "--seed-votes", "2000", "--spare-items", "500", "--no-kill"]
    else:
        argv = ["--annotators", "1,20,50", "--no-kill"]
    args = label_load.parser().parse_args(argv)
    label_load.quiet_client_threads()
    measured = label_load.measure(args)
    if measured["not_measured"]:
        raise RuntimeError(measured["not_measured"])
    targets = {20: ("p95", "ours < 150"), 50: ("votes/s", "ours >= 50")}  # issue 18's
    figures = []
    for row in measured["rows"]:
        n = row["n"]
        goal = targets.get(n, (None, None))
        p95 = goal[1] if goal[0] == "p95" else None
        rate = goal[1] if goal[0] == "votes/s" else None
        figures.append(figure(f"vote latency p50, N = {n}", row["p50"], unit="ms"))
        figures.append(figure(f"vote latency p95, N = {n}", row["p95"], unit="ms", target=p95))
        figures.append(figure(f"votes/s, N = {n}", row["rate"], target=rate))
    notes = [
        f"benchmarks/label_load.py without its kill -9 check: {args.seed_votes:,} votes stored before, N simulated "
        f"annotators voting through the page's events for {args.seconds:g} s each, think time uniform in [0, "
        f"{2 * args.think:g}] s; clients and server on this machine. Targets from the hardening issue (18)."
    ]
    errors = [error for row in measured["rows"] for error in row["errors"]]
    if errors:
        notes.append(f"{len(errors)} client errors, the first: {errors[0]}")
    return {"figures": figures, "notes": notes, "details": {"rows": measured["rows"]}}


# 7. The demo (opt-in)


def demo(ctx: Context, timeout: float = 3 * 3600) -> dict:
    """`make demo` on a fresh workspace, timed until `align serve` prints its URL; then stopped."""
    venv = Path(sys.prefix)
    workspace = ctx.scratch("demo") / "workspace"
    stamp = venv / ".align-installed"
    command = ["make", "-o", str(stamp), "demo", f"VENV={venv}", f"DEMO_WORKSPACE={workspace}", f"DATA={DATA}"]
    log = ctx.scratch("demo") / "make-demo.log"
    began = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        url, serving = None, False
        try:
            for line in process.stdout:
                out.write(line)
                serving |= "== 5/5" in line
                found = re.search(r"https?://[\w.:\-/]+", line) if serving else None
                if found:
                    url = found.group(0)
                    break
                if time.perf_counter() - began > timeout:
                    break
        finally:
            seconds = time.perf_counter() - began
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGINT)  # the process group this call started
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    if url is None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"make demo printed no serve URL (exit {process.returncode}); {log} ends:\n{tail}")
    return {
        "figures": [figure("make demo to the serve URL", seconds / 60, unit="min", target="ours < 15")],
        "notes": [
            f"`make demo` with the installed venv ({venv}; the installs are skipped, so a fresh clone adds them), a "
            f"fresh workspace and the shared data, until it printed {url}. The demo's quality targets are checked by "
            "its own pipeline report, not here."
        ],
        "details": {"seconds": seconds, "url": url, "log": str(log)},
    }
