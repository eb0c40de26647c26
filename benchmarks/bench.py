"""One benchmark command: every stage against its peer, measured in one run, into one table.

    make bench                                    # = python benchmarks/bench.py: every row, full size
    python benchmarks/bench.py --quick            # tiny models, a few examples: a smoke run of every row's path
    python benchmarks/bench.py --rows gemm,registry   # some rows only
    python benchmarks/bench.py --resume           # skip the rows today's results file already holds
    python benchmarks/bench.py --resume --date 2026-12-01   # go on with that day's file
    python benchmarks/bench.py --demo             # also `make demo` to the serve URL (long)
    python benchmarks/bench.py --readme           # the README's performance table from the latest results file

Writes benchmarks/results/DATE-MACHINE.json (every figure, its peer's figure measured in the same run, their
ratio, the target and whether it is met) and the .md beside it (the same as a table, with how each row was measured
and, where a target is missed, what was tried). MACHINE comes from the CPU model (/proc/cpuinfo); --quick writes
DATE-MACHINE-quick.* instead, which --readme never reads. The file is rewritten after every row, so a run that
stops keeps what it measured, and --resume goes on from there.

The rows, in order (benchmarks/bench_rows.py; each a function, a failing row is recorded with its error and the
others still run): the machine's matmul peak first (every training row's MFU is against it), then SFT, RM and
DPO against TRL's trainers (each trainer in its own process, taking steps in turn: benchmarks/lockstep.py), PPO
against TRL 1.9.2's PPOTrainer, generation against plain batched generate, the registry's import and load, and the
labeling server's vote latency. Run it with nothing else on the machine: every other process skews both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import bench_rows  # noqa: E402
from bench_report import latest_results, readme_block, replace_block, write_results  # noqa: E402
from flops import allowed_cpus, cpu_model, machine_slug  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


@dataclass
class Row:
    name: str
    title: str
    run: callable
    tried: str = ""  # what was done for the target so far: printed in the .md when it is missed


ROWS = [
    Row("gemm", "Matmul peak", bench_rows.gemm),
    Row(
        "sft", "SFT", bench_rows.sft,
        "the recipe's departures from TRL's defaults: batches grouped by length, no gradient checkpointing "
        "(both run TRL's SFTTrainer).",
    ),
    Row(
        "rm", "Reward model", bench_rows.rm,
        "the head on layer 24 of 30 (the top 6 layers dropped), LoRA on the top 2 kept layers only (the backward "
        "pass stops there), batches grouped by length, no gradient checkpointing.",
    ),
    Row(
        "dpo", "DPO", bench_rows.dpo,
        "the prompt run once for both replies, only reply tokens through the LM head, batches grouped by length, no "
        "gradient checkpointing, torch_threads auto; `python benchmarks/dpo_benchmark.py --levers` measures each.",
    ),
    Row(
        "ppo", "PPO", bench_rows.ppo,
        "one base with every role as an adapter, the LoRA folded into the weights for sampling, forward passes on "
        "chunks without shared padding, policy and value backward passes one after the other, 2 rollouts per forward, "
        "dropout off. Not yet tried (issue 20's levers): bf16 sampling where native, log-probs of the sampled tokens "
        "without a full-vocabulary fp32 log-softmax kept for backward, one forward for policy and value, shorter "
        "padded prompts.",
    ),
    Row(
        "generation", "Generation", bench_rows.generation,
        "prompts sorted by length so a batch pads little; adapters folded into the weights before sampling.",
    ),
    Row("registry", "Registry import and load", bench_rows.registry, "nothing yet beyond the importer as it is."),
    Row(
        "label", "Labeling server", bench_rows.label,
        "indexes, a tally, votes that skip Gradio's queue (README, 'Labeling under load').",
    ),
]  # fmt: skip
DEMO = Row("demo", "make demo", bench_rows.demo, "nothing in this issue yet.")


def results_path(folder: Path, date: str, machine: str, quick: bool) -> Path:
    return folder / f"{date}-{machine}{'-quick' if quick else ''}.json"


def environment(argv: list[str]) -> dict:
    import torch
    import transformers
    import trl

    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    return {
        "command": " ".join(["python benchmarks/bench.py", *argv]),
        "commit": commit,
        "started": now(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "cpus": allowed_cpus(),
        "threads": torch.get_num_threads(),
        "load_start": round(os.getloadavg()[0], 2),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_row(row: Row, ctx) -> dict:
    """The row's figures, or its failure with the error: never raises (but Ctrl-C stops the run)."""
    began = time.perf_counter()
    try:
        out = row.run(ctx)
        record = {"status": "ok", "figures": out["figures"], "notes": out.get("notes", [])}
        record["details"] = out.get("details", {})
    except (Exception, SystemExit) as exc:  # SystemExit: a benchmark script's own "cannot" (e.g. too few pairs)
        lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
        record = {"status": "failed", "error": "".join(lines[-12:]).rstrip(), "figures": [], "notes": []}
    return {"title": row.title, "seconds": time.perf_counter() - began, "tried": row.tried} | record


def summary_line(record: dict) -> str:
    if record["status"] != "ok":
        return f"FAILED after {record['seconds']:.0f} s: {record['error'].splitlines()[-1]}"
    parts = []
    for item in record["figures"][:4]:
        ratio = f" ({item['ratio']:.2f}x)" if item["ratio"] is not None else ""
        met = {True: ", met", False: ", NOT met"}.get(item["met"], "")
        parts.append(f"{item['metric']} {item['ours']:.4g}{ratio}{met}" if item["ours"] is not None else item["metric"])
    return f"ok in {record['seconds']:.0f} s: " + "; ".join(parts)


def write_readme(results_folder: Path = RESULTS, readme: Path = README) -> Path | None:
    path = latest_results(results_folder)
    results = json.loads(path.read_text(encoding="utf-8")) if path else None
    shown = str(path.relative_to(ROOT)) if path and path.is_relative_to(ROOT) else str(path)
    readme.write_text(replace_block(readme.read_text(encoding="utf-8"), readme_block(results, shown)), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and a few examples: the path, not speed")
    parser.add_argument("--rows", help=f"comma-separated, of {', '.join(r.name for r in ROWS + [DEMO])}")
    parser.add_argument("--resume", action="store_true", help="skip the rows today's results file holds as ok")
    parser.add_argument(
        "--date",
        help="with --resume: go on with the results file of this day (YYYY-MM-DD), for a run that crossed midnight",
    )
    parser.add_argument("--demo", action="store_true", help="also time `make demo` to its serve URL (long)")
    parser.add_argument("--readme", action="store_true", help="only rewrite the README's table from the latest file")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results folder (default benchmarks/results)")
    parser.add_argument("--import-pairs", type=int, help="the registry row's size (default 100,000; 2,000 quick)")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)

    if args.readme:
        path = write_readme(args.out)
        print(f"README.md: the performance table from {path}" if path else "README.md: no results file yet")
        return 0
    known = {row.name: row for row in ROWS + [DEMO]}
    names = args.rows.split(",") if args.rows else [row.name for row in ROWS] + (["demo"] if args.demo else [])
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown row {', '.join(unknown)}: choose from {', '.join(known)}")
    rows = [known[name] for name in names]

    cpu = cpu_model()
    date = datetime.now(timezone.utc).date().isoformat()
    if args.date:
        if not args.resume:
            parser.error("--date goes with --resume: a new run is dated the day it runs")
        try:
            date = datetime.strptime(args.date, "%Y-%m-%d").date().isoformat()
        except ValueError:
            parser.error(f"--date: expected YYYY-MM-DD, got {args.date!r}")
        if not results_path(args.out, date, machine_slug(cpu), args.quick).exists():
            parser.error(f"--date {date}: no results file of that day for this machine in {args.out}")
    path = results_path(args.out, date, machine_slug(cpu), args.quick)
    results = None
    if args.resume and path.exists():
        results = json.loads(path.read_text(encoding="utf-8"))
        resumed = environment(argv)
        results["environment"].setdefault("resumed", []).append(
            {k: resumed[k] for k in ("command", "commit", "started")}
        )
    if results is None:
        results = {"date": date, "machine": machine_slug(cpu), "cpu": cpu, "quick": args.quick, "rows": {}}
        results["environment"] = environment(argv)
    ctx = bench_rows.Context(quick=args.quick, folder=Path(tempfile.mkdtemp(prefix="bench-")), say=print)
    ctx.import_pairs = args.import_pairs
    gemm = results["rows"].get("gemm", {})
    if gemm.get("status") == "ok":  # a resumed run keeps the peak its first rows were measured against
        ctx.peaks = gemm["details"]["peaks"]
        ctx.bf16_native = gemm["details"]["bf16_native"]

    print(f"benchmark {date} on {cpu} -> {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    print(f"scratch {ctx.folder}; {'QUICK: tiny models, the figures mean nothing' if args.quick else 'full size'}")
    for number, row in enumerate(rows, start=1):
        done = results["rows"].get(row.name, {})
        if args.resume and done.get("status") == "ok":
            print(f"[{number}/{len(rows)}] {row.name}: kept from this file (--resume)")
            continue
        print(f"[{number}/{len(rows)}] {row.name}: {row.title} ...")
        record = run_row(row, ctx)
        results["rows"][row.name] = record
        print(f"[{number}/{len(rows)}] {row.name}: {summary_line(record)}")
        results["environment"] |= {"finished": now(), "load_end": round(os.getloadavg()[0], 2)}
        md = write_results(results, path)
    order = {name: index for index, name in enumerate(known)}
    results["rows"] = dict(sorted(results["rows"].items(), key=lambda item: order.get(item[0], len(order))))
    md = write_results(results, path)
    failed = [name for name, record in results["rows"].items() if record["status"] != "ok"]
    print(f"\n{md}" + (f"; failed: {', '.join(failed)}" if failed else "; every row ran"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
