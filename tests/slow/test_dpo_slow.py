"""DPO on the real embedded SmolLM2-135M-Instruct: one epoch on a few hundred HH pairs, the recipe's settings."""

import json
import math
from pathlib import Path

import pytest

from align.dpo import main
from align.registry import Registry

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"
RECIPE = ROOT / "recipes" / "dpo" / "smollm2-135m-lora.yaml"


@pytest.mark.timeout(3600)  # 25 steps of 8 pairs: minutes on 2 idle cores, far longer on a busy machine
def test_one_epoch_on_hh_pairs_writes_the_report_with_held_out_metrics(tmp_path):
    if not DATA.is_file():
        pytest.skip(f"the shared HH data is not at {DATA}")
    registry = Registry(tmp_path / "ws")
    source, _ = registry.import_file(DATA, name="hh-harmless")
    train, test = registry.split(source.ref, test_size=0.1, seed=0)
    some = registry.register(registry.rows(train)[:200], name="hh-some", kind="preference", parents=[train])

    overrides = ["--model", "smollm2-135m", "--dataset", some.ref, "--eval_dataset", test.ref]
    overrides += ["--eval_limit", "32", "--report_to", "none", "--save_steps", "1000"]
    artifact = main(str(RECIPE), overrides, workspace=str(registry.root))

    run = registry.get_run(artifact.run_id)
    metrics = json.loads((run.dir / "metrics.json").read_text())
    assert run.status == "completed" and metrics == run.metrics
    assert metrics["steps"] == math.ceil(metrics["train_pairs"] / 8)  # one epoch, batch 8
    assert metrics["train_pairs"] + metrics["train_pairs_dropped"] == 200
    assert metrics["train_pairs_truncated"] > 0  # HH prompts are long: many were cut from the left
    assert metrics["eval_pairs"] == 32  # every held-out pair: long replies are cut, not dropped
    assert metrics["eval_reward_accuracy_before"] == 0.5  # the policy starts as the reference
    assert 0 <= metrics["eval_reward_accuracy"] <= 1 and math.isfinite(metrics["eval_reward_margin"])
    assert metrics["eval_logps_chosen"] != metrics["eval_logps_chosen_before"]  # the policy moved

    report = (run.dir / "report.md").read_text()
    assert "| held-out metric | before | after |" in report and "implicit-reward accuracy" in report
    for plot in ("loss.png", "reward_accuracy.png", "rewards.png", "logps.png", "eval_margins.png"):
        assert (run.dir / plot).is_file(), plot
    assert artifact.base_model == "smollm2-135m" and (artifact.path / "adapter_model.safetensors").is_file()
