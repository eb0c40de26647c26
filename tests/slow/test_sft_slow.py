"""Slow: SFT of the real embedded SmolLM2 on the self-instruct seed tasks for one epoch."""

from pathlib import Path

import pytest

from align.config import load_config
from align.registry import Registry
from align.sft import SFTStageConfig, run_sft

ROOT = Path(__file__).resolve().parents[2]
SEEDS = ROOT.parent / "shared" / "data" / "self-instruct-seed-tasks.jsonl"


@pytest.mark.slow
def test_one_epoch_of_lora_sft_lowers_the_eval_loss(tmp_path):
    registry = Registry(tmp_path / "ws")
    registry.import_file(SEEDS, name="seed-tasks")
    recipe = ROOT / "recipes" / "sft" / "smollm2-135m-lora.yaml"
    config = load_config(SFTStageConfig, recipe, ["--report_to", "none", "--save_steps", "1000"])
    artifact = run_sft(config, registry)
    run = registry.get_run(artifact.run_id)
    assert run.status == "completed" and run.metrics["steps"] >= 19  # one epoch of ~157 rows at batch 8
    assert run.metrics["eval_loss"] < run.metrics["eval_loss_before"]
    assert (run.dir / "report.md").is_file()
