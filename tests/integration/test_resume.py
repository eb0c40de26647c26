"""Every stage survives a kill: `align STAGE` runs as a subprocess on a tiny model, is killed with SIGKILL mid-run
(no handler runs: the run is left marked running, and shows as interrupted), `align STAGE --resume` finishes it,
and what it registers is what an uninterrupted run with the same seed registers.

A tiny run is over in moments, so rather than race it the subprocess runs the CLI with one function wrapped: once
that function has returned N times (a checkpoint saved, a batch of replies written to the journal) the process
touches a marker file and waits there, and the test, polling for the marker, kills it.

Tolerances. `generate` and `eval` are bit-exact: the replies are the same, so the resumed run registers the very
version the uninterrupted one does (content addressing), with equal metrics. The trainers continue from a
checkpoint (weights, optimizer, scheduler, RNG state); their adapters are compared within atol 1e-5 / rtol 1e-4
(conftest's assert_same_adapter) and their metrics within a relative 1e-4. On one thread they come out
bit-identical; the tolerance is there because the killed steps ran in another process, whose torch thread count
(and so the order of float sums) may differ from this one's.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from align import cli
from align.registry import Registry
from align.runs import read_live

REPO = Path(__file__).resolve().parents[2]

# `python -c PAUSED_CLI MODULE:ATTRIBUTE N MARKER ALIGN_ARGS...`: the align CLI, paused for good once
# MODULE.ATTRIBUTE has returned N times.
PAUSED_CLI = """
import importlib, sys, time
from pathlib import Path

target, calls, marker = sys.argv[1:4]
module_name, _, attribute = target.partition(":")
owner = importlib.import_module(module_name)
*parents, name = attribute.split(".")
for parent in parents:
    owner = getattr(owner, parent)
wrapped = getattr(owner, name)
returned = []

def pause_after(*args, **kwargs):
    result = wrapped(*args, **kwargs)
    returned.append(1)
    if len(returned) == int(calls):
        Path(marker).touch()
        time.sleep(3600)
    return result

setattr(owner, name, pause_after)
from align.cli import main
sys.exit(main(sys.argv[4:]))
"""


def kill_mid_run(registry: Registry, argv: list[str], *, pause_after: str, calls: int, stage: str):
    """Run `align --workspace WS ARGV` in a subprocess until `pause_after` has returned `calls` times, SIGKILL it,
    and return its run: interrupted, with nothing registered."""
    marker = registry.root.parent / f"{stage}-paused"
    log_path = registry.root.parent / f"{stage}-killed.log"
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", PAUSED_CLI, pause_after, str(calls), str(marker)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*command, "--workspace", str(registry.root), *argv], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(
                    f"align {stage} ended (status {process.returncode}) before the kill:\n{log_path.read_text()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"align {stage} did not reach the kill point in 300 s:\n{log_path.read_text()}")
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)  # no handler runs, nothing is flushed or marked failed
        process.wait()
    [killed] = [run for run in registry.list_runs() if run.stage == stage]
    assert (killed.status, killed.shown_status) == ("running", "interrupted")
    assert [a.ref for a in registry.list_artifacts() if a.run_id == killed.id] == []  # nothing half-registered
    assert [v.ref for v in registry.list_datasets() if v.run_id == killed.id] == []
    return killed


def run_align(registry: Registry, *argv: str) -> None:
    """`align --workspace WS ARGV` in this process."""
    assert cli.main(["--workspace", str(registry.root), *argv]) == 0


def write_recipe(folder: Path, values: dict) -> str:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return str(path)


def produced_by(registry: Registry, run_id: str):
    [artifact] = [a for a in registry.list_artifacts() if a.run_id == run_id]
    return artifact


def assert_same_metrics(resumed: dict, straight: dict) -> None:
    """Every number but the timings, within a relative 1e-4."""
    numbers = {
        key: value
        for key, value in straight.items()
        if isinstance(value, (int, float)) and not any(word in key for word in ("seconds", "runtime", "per_second"))
    }
    assert numbers, "no metrics to compare"
    assert {key: resumed[key] for key in numbers} == pytest.approx(numbers, rel=1e-4, abs=1e-6, nan_ok=True)


def train_kill_resume(registry: Registry, stage: str, recipe: dict, *, pause_after: str, checkpoint: str):
    """Kill `align STAGE` after its first checkpoint, resume it, run it again uninterrupted (output_name
    'straight'); returns (resumed artifact, straight artifact)."""
    config = write_recipe(registry.root.parent, recipe)
    killed = kill_mid_run(registry, [stage, "--config", config], pause_after=pause_after, calls=1, stage=stage)
    checkpoints = killed.dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == [checkpoint]

    run_align(registry, stage, "--resume")
    resumed_run = registry.get_run(killed.id)
    assert resumed_run.status == "completed"
    # It went on from the checkpoint rather than starting over: each training step was logged once.
    logged = [entry["step"] for entry in read_live(killed.dir) if "loss" in entry or "loss/policy" in entry]
    assert logged == [1, 2, 3, 4]
    run_align(registry, stage, "--config", config, "--output_name", "straight")
    straight = registry.resolve_artifact(f"{produced_by(registry, killed.id).kind}:straight")
    assert_same_metrics(resumed_run.metrics, registry.get_run(straight.run_id).metrics)
    return produced_by(registry, killed.id), straight


# The trainers: a Trainer checkpoint (sft, rm, dpo) or our PPO loop's.

TRAINER_CHECKPOINT = "transformers:Trainer._save_checkpoint"
WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]
TRAINING = {
    "max_steps": 4,
    "save_steps": 2,
    "logging_steps": 1,
    "report_to": "none",
    "seed": 0,
    "bf16": False,  # spelled out: the subprocess does not get conftest's fp32 default
}


def test_sft_killed_then_resumed_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, assert_same_adapter):
    registry = Registry(tmp_path / "ws")
    rows = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
        for w in WORDS
    ]
    registry.register(rows, name="words", kind="sft")
    recipe = TRAINING | {
        "model": str(tiny_model_dir),
        "dataset": "words",
        "eval_dataset": "words",
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "gradient_checkpointing": False,
    }
    resumed, straight = train_kill_resume(
        registry, "sft", recipe, pause_after=TRAINER_CHECKPOINT, checkpoint="checkpoint-2"
    )
    assert resumed.ref == "adapter:sft@1"
    assert_same_adapter(resumed, straight)


def preference_rows(words: list[str]) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"is {w} ok?"}],
            "chosen": [{"role": "assistant", "content": f"yes {w}"}],
            "rejected": [{"role": "assistant", "content": f"no {w}"}],
        }
        for w in words
    ]


def test_rm_killed_then_resumed_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, assert_same_adapter):
    registry = Registry(tmp_path / "ws")
    registry.register(preference_rows(WORDS), name="prefs", kind="preference")
    registry.register(preference_rows(["melon", "grape", "peach", "mango"]), name="prefs-test", kind="preference")
    recipe = TRAINING | {
        "model": str(tiny_model_dir),
        "dataset": "prefs",
        "eval_dataset": "prefs-test",
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "max_length": 64,
        "gradient_checkpointing": False,
    }
    resumed, straight = train_kill_resume(
        registry, "rm", recipe, pause_after=TRAINER_CHECKPOINT, checkpoint="checkpoint-2"
    )
    assert resumed.ref == "rm:rm@1"
    assert_same_adapter(resumed, straight)


def lora_adapter(base_dir: Path, folder: Path, *, task_type: str | None = None, seed: int = 1) -> Path:
    """A LoRA with random (non-zero) weights on the tiny base: a stand-in for a trained adapter."""
    torch.manual_seed(seed)
    if task_type == "SEQ_CLS":
        model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=1)
        config = peft.LoraConfig(
            task_type="SEQ_CLS", r=4, target_modules="all-linear", init_lora_weights=False, modules_to_save=["score"]
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(base_dir)
        config = peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(folder)
    return folder


def test_dpo_killed_then_resumed_matches_an_uninterrupted_run(tmp_path, tiny_model_dir, assert_same_adapter):
    registry = Registry(tmp_path / "ws")
    registry.register(preference_rows(WORDS), name="prefs", kind="preference")
    registry.register(preference_rows(["melon", "grape", "peach", "mango"]), name="prefs-test", kind="preference")
    sft = lora_adapter(tiny_model_dir, tmp_path / "sft")
    registry.register_artifact("adapter", "sft", sft, base_model=str(tiny_model_dir))
    recipe = TRAINING | {
        "model": "adapter:sft",
        "dataset": "prefs",
        "eval_dataset": "prefs-test",
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "beta": 0.5,
        "max_length": 64,
        "lr_scheduler_type": "constant",
        "activation_checkpointing": False,
    }
    resumed, straight = train_kill_resume(
        registry, "dpo", recipe, pause_after=TRAINER_CHECKPOINT, checkpoint="checkpoint-2"
    )
    assert resumed.ref == "adapter:dpo@1"
    assert_same_adapter(resumed, straight)


def test_ppo_killed_then_resumed_matches_an_uninterrupted_run(tmp_path, tiny_policy_dir, assert_same_adapter):
    registry = Registry(tmp_path / "ws")
    prompts = [{"prompt": [{"role": "user", "content": f"write something {i}"}]} for i in range(12)]
    registry.register(prompts, name="prompts", kind="prompts")
    sft = lora_adapter(tiny_policy_dir, tmp_path / "sft")
    registry.register_artifact("adapter", "sft", sft, base_model=str(tiny_policy_dir))
    rm = lora_adapter(tiny_policy_dir, tmp_path / "rm", task_type="SEQ_CLS", seed=3)
    registry.register_artifact("rm", "tiny-rm", rm, base_model=str(tiny_policy_dir))
    recipe = {
        "model": "adapter:sft",
        "reward_model": "rm:tiny-rm",
        "dataset": "prompts",
        "eval_split": 0.25,
        "num_updates": 4,
        "save_steps": 2,
        "batch_size": 8,
        "mini_batch_size": 4,
        "response_length": 8,
        "temperature": 1.0,
        "learning_rate": 1e-2,
        "kl_coef": 0.01,
        "eval_prompts": 3,
        "lora_r": 4,
        "lora_dropout": 0.0,
        "report_to": "none",
        "seed": 0,
        "bf16": False,
    }
    resumed, straight = train_kill_resume(
        registry, "ppo", recipe, pause_after="align.ppo:save_checkpoint", checkpoint="update-2"
    )
    assert resumed.ref == "adapter:ppo@1"
    assert_same_adapter(resumed, straight)


# Generation: replies go to the run's journal batch by batch; a resumed run samples only the batches it lacks.

QUESTIONS = [{"prompt": [{"role": "user", "content": f"what is {i} plus {i}?" + " really" * i}]} for i in range(6)]
SAMPLING = ["--max-new-tokens", "6", "--temperature", "1.0", "--top-p", "1.0", "--seed", "7", "--batch-size", "2"]
SAMPLING += ["--dtype", "fp32"]
JOURNAL_APPEND = "align.sampling:ReplyJournal.append"


@pytest.fixture
def two_models(tmp_path, tiny_model_dir) -> Registry:
    """A workspace with six prompts, and two models: the tiny base and a LoRA adapter on it."""
    registry = Registry(tmp_path / "ws")
    registry.register(QUESTIONS, name="qs", kind="prompts")
    adapter = lora_adapter(tiny_model_dir, tmp_path / "adapter")
    registry.register_artifact("adapter", "tuned", adapter, base_model=str(tiny_model_dir))
    return registry


def journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_generate_killed_then_resumed_registers_what_an_uninterrupted_run_does(two_models, tiny_model_dir, monkeypatch):
    import align.generate

    registry, tiny = two_models, str(tiny_model_dir)
    argv = ["generate", "--models", f"{tiny},adapter:tuned", "--prompts", "qs", "--n", "2", "--name", "cands"]
    # Three batches of two prompts per model: killed once the second model's first batch is saved.
    killed = kill_mid_run(registry, [*argv, *SAMPLING], pause_after=JOURNAL_APPEND, calls=4, stage="generate")
    saved = journal_lines(killed.dir / "replies.jsonl")
    assert [line["source"] for line in saved] == [tiny] * 3 + ["adapter:tuned@1"]

    loaded = []
    real_load = align.generate.load_model
    monkeypatch.setattr(
        align.generate, "load_model", lambda ref, *a, **k: loaded.append(ref) or real_load(ref, *a, **k)
    )
    run_align(registry, "generate", "--resume")
    assert loaded == ["adapter:tuned@1"]  # the first model had finished: it is not even loaded again
    resumed = registry.get_run(killed.id)
    assert resumed.status == "completed" and len(journal_lines(killed.dir / "replies.jsonl")) == 6

    run_align(registry, *argv, *SAMPLING)
    straight = registry.list_runs()[-1]
    assert straight.id != killed.id
    # Bit-exact: the same rows, so content addressing hands the uninterrupted run the resumed run's version.
    assert resumed.outputs == straight.outputs == ["cands@1"]
    assert [v.ref for v in registry.list_datasets() if v.name == "cands"] == ["cands@1"]
    assert resumed.metrics == straight.metrics


def test_eval_killed_then_resumed_reports_what_an_uninterrupted_run_does(two_models, tiny_model_dir):
    registry, tiny = two_models, str(tiny_model_dir)
    argv = ["eval", "--models", f"{tiny},adapter:tuned", "--prompts", "qs", "--rm", tiny, "--bootstrap", "50"]
    # Two rows of three batches: killed in the second row, after its first batch.
    killed = kill_mid_run(registry, [*argv, *SAMPLING], pause_after=JOURNAL_APPEND, calls=4, stage="eval")
    generations = killed.dir / "generations"
    assert (generations / "00.json").is_file() and not (generations / "01.json").exists()
    assert len(journal_lines(generations / "replies.jsonl")) == 4

    run_align(registry, "eval", "--resume")
    resumed = registry.get_run(killed.id)
    assert resumed.status == "completed" and len(journal_lines(generations / "replies.jsonl")) == 6

    run_align(registry, *argv, *SAMPLING)
    straight = registry.list_runs()[-1]
    assert straight.id != killed.id
    assert resumed.outputs == straight.outputs == ["eval-qs@1"]  # bit-exact: the same rows, the same version
    assert resumed.metrics == straight.metrics
    assert "win_rate" in straight.metrics["rows"]["adapter:tuned@1"]
