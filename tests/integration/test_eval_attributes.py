"""`align eval` judged by a reward model with attribute heads: each attribute's mean score and win rate per row,
with intervals and verdicts, in the metrics, the report and the printed summary."""

import json

import numpy as np
import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from align.cli import main
from align.eval_metrics import win_outcomes
from align.registry import Registry
from reward.objectives import unscaled

HEADS = ["helpfulness", "harmlessness"]
PROMPTS = [{"prompt": [{"role": "user", "content": f"what is {i} plus {i}?"}]} for i in range(6)]


@pytest.fixture
def registry(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "ws")
    registry.register(PROMPTS, name="qs", kind="prompts")
    torch.manual_seed(0)
    tuned = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    tuned.save_pretrained(tmp_path / "adapter")
    registry.register_artifact("adapter", "tuned", tmp_path / "adapter", base_model=str(tiny_model_dir))
    torch.manual_seed(3)
    scorer = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1 + len(HEADS))
    scorer.score.weight.data.normal_(0, 1.0)  # heads far enough apart that the rows' replies score differently
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules="all-linear", modules_to_save=["score"])
    peft.get_peft_model(scorer, lora).save_pretrained(tmp_path / "rm")
    meta = {"objectives": HEADS}
    registry.register_artifact("rm", "multi", tmp_path / "rm", base_model=str(tiny_model_dir), meta=meta)
    yield registry
    registry.close()


def test_each_attribute_gets_its_win_rate_with_an_interval_and_a_verdict(registry, tiny_model_dir, capsys):
    tiny = str(tiny_model_dir)
    code = main(
        ["--workspace", str(registry.root), "eval", "--models", f"{tiny},adapter:tuned", "--prompts", "qs",
         "--rm", "rm:multi", "--bootstrap", "100", "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "3"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    [run] = registry.list_runs()
    metrics = json.loads((run.dir / "metrics.json").read_text())
    assert metrics["attributes"] == HEADS
    version = registry.resolve("eval-qs")
    rewards = np.array(version.meta["rewards"])  # the preference head's, [prompt][row]
    for index, name in enumerate([tiny, "adapter:tuned@1"]):
        entry = metrics["rows"][name]
        assert entry["reward"]["value"] == pytest.approx(rewards[:, index].mean())
        for attribute in HEADS:
            raw = np.array(version.meta["attribute_rewards"][attribute])  # each head's own output, [prompt][row]
            found = entry["attributes"][attribute]
            assert found["score"]["value"] == pytest.approx(np.mean([unscaled(v) for v in raw[:, index]]))
            if index == 0:
                assert "win_rate" not in found  # the baseline is not compared with itself
                continue
            win = found["win_rate"]
            assert win["value"] == pytest.approx(win_outcomes(raw[:, 1], raw[:, 0]).mean())
            assert win["low"] <= win["value"] <= win["high"]
            assert f"{attribute} win rate vs {tiny} {win['value']:.3f} [{win['low']:.3f}, {win['high']:.3f}]: " in out
    verdicts = ("better", "worse", "no detectable difference")
    assert any(f"harmlessness win rate vs {tiny} " in line and line.endswith(verdicts) for line in out.splitlines())
    report = (run.dir / "report.md").read_text()
    assert "## Attributes" in report and f"| helpfulness win rate vs {tiny} |" in report
    assert (run.dir / "attribute_win_rates.png").read_bytes()[:4] == b"\x89PNG"
    assert "(attribute_win_rates.png)" in report


def test_a_reward_model_without_attribute_heads_adds_nothing(registry, tiny_model_dir, capsys):
    tiny = str(tiny_model_dir)
    code = main(
        ["--workspace", str(registry.root), "eval", "--models", f"{tiny},adapter:tuned", "--prompts", "qs",
         "--rm", tiny, "--bootstrap", "20", "--max-new-tokens", "4", "--seed", "3"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    [run] = registry.list_runs()
    assert "attributes" not in run.metrics and "attributes" not in run.metrics["rows"][tiny]
    assert "## Attributes" not in (run.dir / "report.md").read_text()
    assert "attribute_rewards" not in registry.resolve("eval-qs").meta
