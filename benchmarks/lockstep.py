"""Trainers measured side by side, each in its own process, taking their training steps in turn.

    results = run_lockstep({"trl": ("sft_benchmark:contestant", {...}), "ours": (...)}, log_dir)
    results["ours"]  # {"items", "seconds", "cpu_seconds", "flops", "steps", "threads", "peak_rss_gb", ...}

Each contestant is a function `contestant(spec: dict, callback) -> dict` in a benchmarks/ module: it builds its
trainer (or a whole stage that takes `callbacks`), adds `callback` and trains; it returns at least {"items": N}, the
examples (samples or pairs) its training went through. It runs in a process of its own (this file with --worker),
so its peak RSS is its own, and the processes take turns: they are built one after the other, then the parent lets
contestant 1 take one optimizer step while the others wait, then contestant 2, and so on, as
benchmarks/dpo_benchmark.py interleaves its trainers in one process. A burst of load from another process on the
machine then hits every contestant alike, and only one of them computes at a time.

The callback pauses the trainer inside `Trainer.train` (on_train_begin, and on_step_end until the last step), so
what is timed is the training loop itself: every step's collation, forward, backward, optimizer and scheduler step
and logging; building, tokenizing and the stage's evaluation and saving are not. Per step it reports the seconds,
this process's CPU seconds and the FLOPs the formula of benchmarks/flops.py counts (hooks on the model, active only
inside the step). The worker's stdout carries one JSON line per event; everything the trainer prints goes to its
stderr, which the parent writes to a log file.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent


class WorkerFailed(RuntimeError):
    pass


# The parent


class Worker:
    """One contestant's process, built and paused at the start of its training loop."""

    def __init__(self, name: str, spec: str, args: dict, log: Path, env: dict | None = None):
        self.name, self.log = name, log
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", spec, "--args", json.dumps(args)]
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = os.environ | {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"} | (env or {})
        with open(log, "w") as stderr:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=ROOT, env=env
            )
        self.ready = self.read("ready")
        self.steps_left = self.ready["steps"]
        self.steps: list[dict] = []

    def read(self, event: str) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-25:])
            raise WorkerFailed(f"{self.name} stopped (exit {code}) before '{event}'; its log {self.log} ends:\n{tail}")
        message = json.loads(line)
        if message.get("event") != event:
            raise WorkerFailed(f"{self.name}: expected '{event}', got {message}")
        return message

    def step(self) -> dict:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        self.steps.append(self.read("step"))
        self.steps_left -= 1
        return self.steps[-1]

    def finish(self) -> dict:
        done = self.read("done")
        self.process.wait()
        return done

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def run_lockstep(contestants: dict, log_dir: Path, progress=print) -> dict:
    """{name: (module:function, spec)} -> {name: summary}: built in order, then one step each in turn."""
    workers: list[Worker] = []
    results = {}
    try:
        for name, (function, spec) in contestants.items():
            began = time.perf_counter()
            workers.append(Worker(name, function, spec, log_dir / f"{name}.log"))
            progress(f"    built {name} in {time.perf_counter() - began:.0f} s ({workers[-1].steps_left} steps)")
        number = 0
        while any(worker.steps_left for worker in workers):
            number += 1
            took = []
            for worker in workers:
                if worker.steps_left:
                    took.append(f"{worker.name} {worker.step()['seconds']:.1f}s")
                    if not worker.steps_left:
                        results[worker.name] = summary(worker, worker.finish())
            progress(f"    step {number}: {'  '.join(took)}")
    finally:
        for worker in workers:
            worker.close()
    return results


def summary(worker: Worker, done: dict) -> dict:
    steps = worker.steps
    return done | {
        "steps": len(steps),
        "seconds": sum(step["seconds"] for step in steps),
        "cpu_seconds": sum(step["cpu"] for step in steps),
        "flops": sum(step["flops"] for step in steps),
        "threads": steps[-1]["threads"] if steps else None,
        "bf16": steps[-1]["bf16"] if steps else False,
        "step_seconds": [round(step["seconds"], 3) for step in steps],
    }


# The worker


def lockstep_callback(channel, commands):
    """The TrainerCallback that pauses `Trainer.train` for the parent and reports each step."""
    import torch
    from flops import FlopCounter
    from transformers import TrainerCallback

    class Lockstep(TrainerCallback):
        def __init__(self):
            self.counter = None
            self.started = self.cpu = 0.0

        def send(self, message: dict) -> None:
            channel.write(json.dumps(message) + "\n")
            channel.flush()

        def wait(self) -> None:
            if commands.readline().strip() != "go":
                raise SystemExit("the benchmark stopped")
            self.counter.take()
            self.counter.active = True
            self.started, self.cpu = time.perf_counter(), time.process_time()

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.counter = FlopCounter(model)
            self.send({"event": "ready", "steps": state.max_steps, "threads": torch.get_num_threads()})
            self.wait()

        def on_step_end(self, args, state, control, **kwargs):
            seconds, cpu = time.perf_counter() - self.started, time.process_time() - self.cpu
            self.counter.active = False
            flops = self.counter.take()
            self.send(
                {
                    "event": "step",
                    "seconds": seconds,
                    "cpu": cpu,
                    "flops": flops,
                    "threads": torch.get_num_threads(),
                    "bf16": bool(getattr(args, "bf16", False)),
                }
            )
            if state.global_step < state.max_steps:
                self.wait()

    return Lockstep()


def worker(function: str, spec: dict) -> None:
    channel = os.fdopen(os.dup(1), "w")  # the protocol; the trainer's own prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    module, name = function.split(":")
    contestant = getattr(importlib.import_module(module), name)
    info = contestant(spec, lockstep_callback(channel, sys.stdin))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    channel.write(json.dumps({"event": "done", "peak_rss_gb": peak} | info) + "\n")
    channel.flush()


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(ROOT)]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", required=True, metavar="MODULE:FUNCTION")
    parser.add_argument("--args", required=True, help="the contestant's spec, as JSON")
    options = parser.parse_args()
    worker(options.worker, json.loads(options.args))
