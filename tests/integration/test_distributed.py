"""The training stages under `accelerate launch` with two processes on this CPU (gloo), on tiny models.

Each launch is a real `accelerate launch --multi_gpu --num_processes 2 -m align STAGE` in a subprocess (accelerate's
`--cpu` flag starts one process only; without a GPU align/distributed.py keeps the processes on the CPU). SFT, RM
and DPO with two processes train on the same global batches as one process (the recipe's per-device batch is
split), so their losses and the trained weights match a one-process run within float noise (TOLERANCE). PPO's
processes are watched through a sitecustomize hook (HOOK) that records each process's prompts and trainable
weights after every update, and can make one process crash.
"""

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_dpo import TEST_WORDS, TRAIN_WORDS, pairs
from test_rm import marker_rows

from align import cli
from align.cli.stages import free_port
from align.config import build_config, split_global_batch
from align.dpo import DPOStageConfig, run_dpo
from align.errors import AlignError
from align.models import load_model
from align.ppo import PPOStageConfig, run_ppo
from align.registry import Registry
from align.runs import read_live
from align.sft import SFTStageConfig, run_sft
from reward.model import RewardModel
from reward.train import RewardStageConfig, run_rm

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).parent / "accelerate"
TOLERANCE = 1e-4  # losses of one and two processes on the same global batches: float noise of the gradient sums
WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]


def launch(workspace: Path, *args: str, hook: Path | None = None, env: dict | None = None):
    """`accelerate launch` two processes of `python -m align --workspace WORKSPACE ARGS...` and wait for them."""
    port = free_port()  # so that launches of parallel test runs do not meet
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    command += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    command += ["-m", "align", "--workspace", str(workspace), *args]
    path = os.pathsep.join(str(p) for p in (hook, ROOT) if p)
    environment = os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"} | (env or {})
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


def write_recipe(folder: Path, values: dict) -> Path:
    import yaml

    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def losses(run) -> list[float]:
    return [entry["loss"] for entry in read_live(run.dir) if "loss" in entry]


# SFT, RM, DPO: two processes train what one does, and register it once


def sft_case(registry, tiny_model_dir, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
        for w in WORDS
    ]
    registry.register(rows, name="words", kind="sft")
    recipe = {"model": str(tiny_model_dir), "dataset": "words", "eval_dataset": "words", "max_steps": 4}
    return SFTStageConfig, run_sft, recipe | {"learning_rate": 1e-2}


def rm_case(registry, tiny_model_dir, tmp_path):
    registry.register(marker_rows(48, seed=1), name="marker-train", kind="preference")
    registry.register(marker_rows(16, seed=2), name="marker-test", kind="preference")
    recipe = {"model": str(tiny_model_dir), "dataset": "marker-train", "eval_dataset": "marker-test"}
    # reply_mean pooling scores through add_feature_scoring: the path DDP missed when the decoder was called directly
    return (
        RewardStageConfig,
        run_rm,
        recipe | {"max_steps": 4, "learning_rate": 5e-3, "max_length": 64, "pooling": "reply_mean"},
    )


def dpo_case(registry, tiny_model_dir, tmp_path):
    registry.register(pairs(TRAIN_WORDS), name="prefs", kind="preference")
    registry.register(pairs(TEST_WORDS), name="prefs-test", kind="preference")
    recipe = {"model": str(tiny_model_dir), "dataset": "prefs", "eval_dataset": "prefs-test", "max_steps": 4}
    return DPOStageConfig, run_dpo, recipe | {"learning_rate": 5e-3, "beta": 0.5, "max_length": 64}


SHARED = {
    "per_device_train_batch_size": 4,  # two processes: 2 each, the same global batch of 4
    "per_device_eval_batch_size": 4,
    "logging_steps": 1,
    "save_steps": 100,
    "report_to": "none",
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "lora_dropout": 0.0,  # dropout masks depend on how a batch is split
    "seed": 0,
    "bf16": False,
}


@pytest.mark.parametrize("stage, case", [("sft", sft_case), ("rm", rm_case), ("dpo", dpo_case)])
def test_two_processes_train_what_one_does_and_register_it_once(stage, case, tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "ws")
    config_class, run_stage, values = case(registry, tiny_model_dir, tmp_path)
    values = SHARED | values
    alone = run_stage(build_config(config_class, values), registry)
    runs, artifacts = len(registry.list_runs()), len(registry.list_artifacts())

    done = launch(tmp_path / "ws", stage, "--config", str(write_recipe(tmp_path, values)))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "global batch 4 = 2 per device x 2 processes x 1 accumulation step" in done.stdout
    registry = Registry(tmp_path / "ws")
    assert len(registry.list_runs()) == runs + 1 and len(registry.list_artifacts()) == artifacts + 1
    run = registry.list_runs()[-1]
    together = registry.resolve_artifact(run.outputs[0])
    assert run.status == "completed" and together.run_id == run.id and together.version == alone.version + 1

    solo_run = registry.get_run(alone.run_id)
    assert len(losses(run)) == len(losses(solo_run)) == 4
    assert losses(run) == pytest.approx(losses(solo_run), abs=TOLERANCE)
    first, second = (
        load_file(alone.path / "adapter_model.safetensors"),
        load_file(together.path / "adapter_model.safetensors"),
    )
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(second[name], first[name], atol=TOLERANCE, rtol=TOLERANCE, msg=name)
    # The artifact loads as any other does
    if stage == "rm":
        scorer = RewardModel.load(together.ref, registry=registry)
        assert len(scorer.score([[{"role": "user", "content": "hi"}]], [[{"role": "assistant", "content": "yo"}]])) == 1
    else:
        model, _ = load_model(together.ref, registry)
        assert model.get_base_model().config.hidden_size == 32


def test_kto_under_two_processes_registers_one_run_and_one_adapter(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "ws")
    rows = []
    for word in WORDS:
        prompt = [{"role": "user", "content": f"is {word} ok?"}]
        for reply, label in ((f"yes {word}", True), (f"no {word}", False)):
            rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": reply}], "label": label})
    registry.register(rows, name="fb", kind="feedback")
    values = SHARED | {"model": str(tiny_model_dir), "dataset": "fb", "eval_split": 0.25, "max_steps": 2}
    done = launch(tmp_path / "ws", "kto", "--config", str(write_recipe(tmp_path, values)))
    assert done.returncode == 0, done.stderr[-4000:]
    registry = Registry(tmp_path / "ws")
    runs = registry.list_runs()
    assert [run.stage for run in runs] == ["kto"] and runs[0].status == "completed"
    assert [artifact.ref for artifact in registry.list_artifacts()] == runs[0].outputs
    model, _ = load_model(runs[0].outputs[0], registry)
    assert model.get_base_model().config.hidden_size == 32


def test_num_processes_launches_accelerate_itself(tmp_path, tiny_model_dir):
    """`align sft --num-processes 2`: the stage starts the launch, and it trains and registers as the launch does."""
    registry = Registry(tmp_path / "ws")
    config_class, _, values = sft_case(registry, tiny_model_dir, tmp_path)
    recipe = write_recipe(tmp_path, SHARED | values | {"max_steps": 2})
    environment = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "align", "--workspace", str(tmp_path / "ws"), "sft", "--config", str(recipe)]
    done = subprocess.run(
        [*command, "--num-processes", "2", "--output_name", "two"], env=environment, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "running: " in done.stdout and "--num_processes 2" in done.stdout
    port = int(re.search(r"--main_process_port (\d+)", done.stdout).group(1))  # a free one, not always 29500
    assert 1024 < port < 65536
    assert "global batch 4 = 2 per device x 2 processes x 1 accumulation step" in done.stdout
    registry = Registry(tmp_path / "ws")
    runs = registry.list_runs()
    assert [run.status for run in runs] == ["completed"]
    assert runs[0].outputs == ["adapter:two@1"] and runs[0].config["output_name"] == "two"


def test_num_processes_refuses_bad_counts_and_keys_before_launching(monkeypatch, tmp_path, capsys):
    workspace = ["--workspace", str(tmp_path / "ws")]
    assert cli.main([*workspace, "sft", "--num-processes", "0"]) == 2
    assert "--num-processes must be 1 or more (got 0)" in capsys.readouterr().err
    assert cli.main([*workspace, "sft", "--num-processes", "2", "--learning_rat", "1"]) == 2
    assert "learning_rat" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main([*workspace, "dpo", "--num-processes", "2"]) == 2
    assert "drop it when running under accelerate launch" in capsys.readouterr().err


# PPO: data-parallel rollouts, identical weights, a crash, and --resume

# Loaded at start-up by every process of a launch (PYTHONPATH): records each process's prompts and trainable
# weights per update in ALIGN_TEST_HOOK_DIR, and crashes process ALIGN_TEST_CRASH_RANK at update ALIGN_TEST_CRASH_AT.
HOOK = """
import os
if os.environ.get("RANK") is not None and os.environ.get("ALIGN_TEST_HOOK_DIR"):
    import json
    from pathlib import Path
    from safetensors.torch import save_file
    import align.ppo_core as core

    folder, rank = Path(os.environ["ALIGN_TEST_HOOK_DIR"]), int(os.environ["RANK"])
    original_rollout, original_update = core.rollout, core.ppo_update

    def rollout(model, tokenizer, prompts, config, reward_fn, *, do_sample=True):
        if do_sample:
            with open(folder / f"prompts-{rank}.jsonl", "a") as out:
                out.write(json.dumps(prompts) + "\\n")
        return original_rollout(model, tokenizer, prompts, config, reward_fn, do_sample=do_sample)

    crash = (int(os.environ.get("ALIGN_TEST_CRASH_RANK", -1)), int(os.environ.get("ALIGN_TEST_CRASH_AT", -1)))

    def ppo_update(roles, optimizer, kl, moments, train_prompts, config, reward_fn, update):
        if (rank, update + 1) == crash:
            raise RuntimeError(f"simulated crash of process {rank} at update {update + 1}")
        stats = original_update(roles, optimizer, kl, moments, train_prompts, config, reward_fn, update)
        save_file(roles.trainable_state(), str(folder / f"weights-{rank}-{update + 1}.safetensors"))
        return stats

    core.rollout, core.ppo_update = rollout, ppo_update
"""


@pytest.fixture
def ppo_workspace(tmp_path, tiny_policy_dir):
    import peft
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    registry = Registry(tmp_path / "ws")
    prompts = [{"prompt": [{"role": "user", "content": f"write something {i}"}]} for i in range(12)]
    registry.register(prompts, name="prompts", kind="prompts")
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    sft = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    sft.save_pretrained(tmp_path / "sft")
    registry.register_artifact("adapter", "sft", tmp_path / "sft", base_model=str(tiny_policy_dir))
    scorer = AutoModelForSequenceClassification.from_pretrained(tiny_policy_dir, num_labels=1)
    lora = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules="all-linear", init_lora_weights=False, modules_to_save=["score"]
    )
    peft.get_peft_model(scorer, lora).save_pretrained(tmp_path / "rm")
    registry.register_artifact("rm", "tiny-rm", tmp_path / "rm", base_model=str(tiny_policy_dir))
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(HOOK, encoding="utf-8")
    (tmp_path / "seen").mkdir()
    return registry


PPO_RECIPE = {
    "model": "adapter:sft",
    "reward_model": "rm:tiny-rm",
    "dataset": "prompts",
    "eval_split": 0.25,
    "num_updates": 3,
    "batch_size": 4,  # two processes: 2 prompts each per update
    "mini_batch_size": 2,
    "response_length": 8,
    "temperature": 1.0,
    "learning_rate": 1e-2,
    "kl_coef": 0.01,
    "eval_prompts": 3,
    "lora_r": 4,
    "lora_dropout": 0.0,
    "save_steps": 1,
    "report_to": "none",
    "bf16": False,
}


def test_ppo_is_data_parallel_survives_a_crash_and_resumes(tmp_path, ppo_workspace):
    recipe = write_recipe(tmp_path, PPO_RECIPE)
    seen = tmp_path / "seen"
    hook_env = {"ALIGN_TEST_HOOK_DIR": str(seen), "ALIGN_TEST_CRASH_RANK": "1", "ALIGN_TEST_CRASH_AT": "3"}

    # Process 1 crashes at update 3: the launch fails, the run is marked failed, nothing is registered.
    crashed = launch(tmp_path / "ws", "ppo", "--config", str(recipe), hook=tmp_path / "hook", env=hook_env)
    assert crashed.returncode != 0
    assert "simulated crash of process 1 at update 3" in crashed.stderr
    registry = Registry(tmp_path / "ws")
    (run,) = registry.list_runs()
    assert run.status == "failed" and run.error, run
    assert sorted(a.ref for a in registry.list_artifacts()) == ["adapter:sft@1", "rm:tiny-rm@1"]
    assert (run.dir / "checkpoints" / "update-1").is_dir()

    # Each process rolled out its own share of each update's prompts: together, the draw one process makes.
    train_prompts = [row["prompt"] for row in registry.rows(run.inputs[0])]
    shares = [
        [json.loads(line) for line in (seen / f"prompts-{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)
    ]
    for update in (0, 1):
        picker = random.Random(0 * 100003 + update)
        drawn = [train_prompts[picker.randrange(len(train_prompts))] for _ in range(4)]
        assert shares[0][update] == drawn[0::2] and shares[1][update] == drawn[1::2]
    assert shares[0][:2] != shares[1][:2]
    # ... and after every update both hold the same weights, bit for bit
    for update in (1, 2):
        first, second = (load_file(seen / f"weights-{rank}-{update}.safetensors") for rank in (0, 1))
        assert all(torch.equal(first[name], second[name]) for name in first)
    before = load_file(seen / "weights-0-1.safetensors")
    after = load_file(seen / "weights-0-2.safetensors")
    assert any(not torch.equal(before[name], after[name]) for name in before if ".default." in name)

    # --resume continues the failed run with two processes and registers one adapter
    hook_env.pop("ALIGN_TEST_CRASH_RANK")
    resumed = launch(tmp_path / "ws", "ppo", "--resume", hook=tmp_path / "hook", env=hook_env)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    registry = Registry(tmp_path / "ws")
    (run,) = registry.list_runs()
    assert run.status == "completed"
    (adapter,) = [a for a in registry.list_artifacts() if a.run_id == run.id]
    assert adapter.ref == "adapter:ppo@1"
    history = json.loads((run.dir / "metrics.json").read_text())["history"]
    assert [h["update"] for h in history] == [1, 2, 3]
    first, second = (load_file(seen / f"weights-{rank}-3.safetensors") for rank in (0, 1))
    assert all(torch.equal(first[name], second[name]) for name in first)
    saved = load_file(adapter.path / "adapter_model.safetensors")
    assert saved and all(torch.equal(saved[name], first[name.replace(".weight", ".default.weight")]) for name in saved)


def test_rloo_through_trl_registers_one_adapter(tmp_path, ppo_workspace):
    values = PPO_RECIPE | {"algo": "rloo", "num_generations": 2, "num_updates": 2, "output_name": "rloo"}
    done = launch(tmp_path / "ws", "ppo", "--config", str(write_recipe(tmp_path, values)))
    assert done.returncode == 0, done.stderr[-4000:]
    registry = Registry(tmp_path / "ws")
    (run,) = registry.list_runs()
    assert run.status == "completed" and run.outputs == ["adapter:rloo@1"]
    assert sorted(a.ref for a in registry.list_artifacts()) == ["adapter:rloo@1", "adapter:sft@1", "rm:tiny-rm@1"]
    model, _ = load_model("adapter:rloo", registry)
    assert "default" in model.peft_config


# What a launch refuses, checked without launching: the world size a launcher sets is WORLD_SIZE


def test_a_command_that_runs_in_one_process_refuses_a_launcher(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["--workspace", str(tmp_path / "ws"), "runs", "list"]) == 2
    assert "`align runs` runs in one process" in capsys.readouterr().err
    assert cli.main(["--workspace", str(tmp_path / "ws"), "rm", "eval", "--rm", "rm:x", "--data", "d"]) == 2


def test_the_global_batch_is_split_across_processes_or_refused(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("WORLD_SIZE", "2")
    fewer_steps = SimpleNamespace(per_device_train_batch_size=3, gradient_accumulation_steps=4)
    split_global_batch(fewer_steps)
    assert (fewer_steps.per_device_train_batch_size, fewer_steps.gradient_accumulation_steps) == (3, 2)
    smaller = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=1)
    split_global_batch(smaller)
    assert (smaller.per_device_train_batch_size, smaller.gradient_accumulation_steps) == (2, 1)
    with pytest.raises(ValueError, match="per_device_train_batch_size 3 x gradient_accumulation_steps 1, does not"):
        split_global_batch(SimpleNamespace(per_device_train_batch_size=3, gradient_accumulation_steps=1))
    with pytest.raises(AlignError, match="'mini_batch_size' \\(3\\) is split across the 2 processes"):
        build_config(PPOStageConfig, PPO_RECIPE | {"batch_size": 6, "mini_batch_size": 3})


def test_our_ppo_loop_refuses_fsdp_and_deepspeed_before_registering(monkeypatch, ppo_workspace):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(AlignError, match="does not run under FSDP"):
        run_ppo(build_config(PPOStageConfig, PPO_RECIPE), ppo_workspace)
    assert ppo_workspace.list_runs() == [] and [v.name for v in ppo_workspace.list_datasets()] == ["prompts"]
