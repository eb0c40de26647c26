"""The reward-model stage on the real embedded SmolLM2 and a few hundred real HH-harmless pairs.

Quality is measured by benchmarks/rm_benchmark.py, not here: this test only checks that the recipe runs end to
end on the real model and data, and prints the held-out accuracy it reached.
"""

from pathlib import Path

import pytest

from align.config import load_config
from align.registry import Registry
from reward.model import RewardModel
from reward.train import RewardStageConfig, run_rm

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"
RECIPE = ROOT / "recipes" / "rm" / "smollm2-135m-lora.yaml"


@pytest.mark.skipif(not HH.is_file(), reason=f"the shared HH data is not at {HH}")
def test_the_recipe_trains_on_hh_pairs_and_reports(tmp_path, capsys):
    registry = Registry(tmp_path / "ws")
    source, _ = registry.import_file(HH, name="hh-harmless")
    rows = registry.rows(source)
    registry.register(rows[:240], name="hh-small-train", kind="preference", parents=[source])
    registry.register(rows[240:320], name="hh-small-test", kind="preference", parents=[source])
    overrides = {"dataset": "hh-small-train", "eval_dataset": "hh-small-test", "report_to": "none"}
    artifact = run_rm(load_config(RewardStageConfig, RECIPE, overrides), registry)

    run = registry.get_run(artifact.run_id)
    assert run.status == "completed" and (run.dir / "report.md").is_file()
    assert (run.dir / "reliability.png").is_file()
    assert run.metrics["eval_pairs"] == 80 and run.metrics["train_pairs"] + run.metrics["train_dropped"] == 240
    rm = RewardModel.load(artifact.ref, registry)
    assert rm.max_length == 256 and len(rm.score([rows[0]["prompt"]], [rows[0]["chosen"]])) == 1
    with capsys.disabled():
        print(
            f"\nrm on 240 HH pairs: held-out accuracy {run.metrics['eval_accuracy']:.3f} on 80 pairs, "
            f"ECE {run.metrics['eval_ece']:.3f}, {run.metrics['train_runtime_s']:.0f} s of training"
        )
