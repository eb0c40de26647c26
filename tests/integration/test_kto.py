"""The KTO stage end to end on a tiny model built in the test: TRL's KTOTrainer, real PEFT adapters, real registry.

A synthetic marker task: for every prompt the desirable reply starts with "yes", the undesirable one with "no",
given as unpaired rows. Held-out rows use other words, so a margin there means the marker was learned.
"""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback
from trl.trainer.utils import use_adapter

from align.config import build_config, load_config
from align.errors import AlignError
from align.kto import KTOStageConfig, run_kto
from align.pipeline import PipelineConfig
from align.registry import Registry

TRAIN_WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]
TEST_WORDS = ["melon", "grape", "peach", "mango"]


def feedback(words):
    rows = []
    for w in words:
        prompt = [{"role": "user", "content": f"is {w} ok?"}]
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": f"yes {w}"}], "label": True})
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": f"no {w}"}], "label": False})
    return rows


@pytest.fixture
def registry(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "ws")
    registry.register(feedback(TRAIN_WORDS), name="fb", kind="feedback")
    registry.register(feedback(TEST_WORDS), name="fb-test", kind="feedback")
    # A stand-in for an SFT adapter: LoRA with random (non-zero) weights, so it differs from its base.
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.05)
    model.save_pretrained(tmp_path / "sft-adapter")
    registry.register_artifact("adapter", "sft", tmp_path / "sft-adapter", base_model=str(tiny_model_dir))
    return registry


def config(**values):
    base = {
        "dataset": "fb",
        "eval_dataset": "fb-test",
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 4,
        "learning_rate": 5e-3,
        "beta": 0.5,
        "max_steps": 12,
        "max_length": 64,
        "logging_steps": 2,
        "save_steps": 100,
        "report_to": "none",
        "lr_scheduler_type": "constant",
        "activation_checkpointing": False,
        "seed": 0,
    }
    return build_config(KTOStageConfig, base | values)


class KeepModel(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def reply_logps(model, tokenizer, rows):
    """Summed log-probs of each row's reply, computed here from scratch (prompt tokens masked)."""
    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=True)
        full = tokenizer.apply_chat_template(row["prompt"] + row["completion"], return_dict=True)
        ids = torch.tensor([full["input_ids"]])
        start = len(prompt["input_ids"])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        out.append(logps[start - 1 :].gather(-1, targets[start - 1 :, None]).sum().item())
    return torch.tensor(out)


def test_kto_from_the_sft_adapter_learns_the_marker(registry, tiny_model_dir, monkeypatch, assert_base_unchanged):
    from align.models import load_tokenizer

    loads = {"base": 0}
    base_load = AutoModelForCausalLM.from_pretrained

    def count_base(*args, **kwargs):
        loads["base"] += 1
        return base_load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", count_base)
    keep = KeepModel()
    artifact = run_kto(config(model="adapter:sft"), registry, callbacks=[keep])
    monkeypatch.undo()
    assert loads == {"base": 1}  # one base model: the reference is an adapter on it
    model = keep.model
    assert set(model.peft_config) == {"default", "ref"}

    # Before: the policy is the reference (rewards 0, accuracy 0.5). After: the marker separates held-out replies.
    run = registry.get_run(artifact.run_id)
    metrics = run.metrics
    assert metrics["eval_reward_accuracy_before"] == 0.5 and metrics["eval_reward_margin_before"] == 0.0
    assert metrics["eval_reward_margin"] > 0.5 and metrics["eval_reward_accuracy"] >= 0.875
    assert metrics["eval_reward_desirable"] > 0 > metrics["eval_reward_undesirable"]
    assert metrics["eval_logp_margin"] > metrics["eval_logp_margin_before"] + 0.1
    assert (metrics["train_desirable"], metrics["train_undesirable"], metrics["eval_rows"]) == (8, 8, 8)

    # The reference is really frozen: its log-probs equal the SFT adapter's, loaded fresh, after training.
    tokenizer = load_tokenizer(str(tiny_model_dir))
    rows = registry.rows("fb-test")
    sft = PeftModel.from_pretrained(base_load(tiny_model_dir), registry.resolve_artifact("adapter:sft").path).eval()
    model.eval()
    with use_adapter(model, "ref"):
        reference_after = reply_logps(model, tokenizer, rows)
    torch.testing.assert_close(reference_after, reply_logps(sft, tokenizer, rows), atol=1e-4, rtol=0)
    assert_base_unchanged(model, tiny_model_dir)

    # The metrics agree with log-probs computed from scratch on the saved adapter.
    saved = PeftModel.from_pretrained(base_load(tiny_model_dir), artifact.path).eval()
    rewards = 0.5 * (reply_logps(saved, tokenizer, rows) - reference_after)
    labels = torch.tensor([row["label"] for row in rows])
    margin = rewards[labels].mean() - rewards[~labels].mean()
    assert metrics["eval_reward_margin"] == pytest.approx(margin.item(), abs=1e-3)

    # The output: the policy adapter alone, on the SFT adapter's base, with lineage to its inputs; a report.
    assert artifact.ref == "adapter:kto@1" and artifact.base_model == str(tiny_model_dir)
    roles = {
        (role, parent.ref if hasattr(parent, "ref") else str(parent)) for role, parent in registry.parents(artifact)
    }
    assert {("init", "adapter:sft@1"), ("reference", "adapter:sft@1")} <= roles
    assert {("train", "fb@1"), ("eval", "fb-test@1")} <= roles
    report = (run.dir / "report.md").read_text()
    assert "KTO report" in report and "| reward margin (desirable - undesirable) | 0.0000 |" in report
    assert (run.dir / "eval_rewards_desirable.png").is_file() and (run.dir / "loss.png").is_file()


def test_kto_bad_input(registry):
    with pytest.raises(AlignError, match="must be at least 2 for loss_type kto"):
        config(per_device_train_batch_size=1)
    with pytest.raises(AlignError, match="'loss_type' must be one of kto, apo_zero_unpaired"):
        config(loss_type="sigmoid")
    with pytest.raises(AlignError, match="KTO trains a LoRA adapter"):
        config(peft="none")
    with pytest.raises(AlignError, match="'undesirable_weight' must be above 0"):
        config(undesirable_weight=0)
    with pytest.raises(AlignError, match="unknown config key 'label_smoothing'"):
        config(label_smoothing=0.1)
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    registry.register([{"messages": conversation}] * 4, name="sft-data", kind="sft")
    with pytest.raises(AlignError, match="sft-data.*'sft'"):
        run_kto(config(dataset="sft-data"), registry)
    only_good = [row for row in feedback(TRAIN_WORDS) if row["label"]]
    registry.register(only_good, name="good", kind="feedback")
    with pytest.raises(AlignError, match="train rows hold 8 desirable and 0 undesirable replies: KTO needs both"):
        run_kto(config(dataset="good"), registry)


def test_the_recipe_and_the_pipeline_block_parse():
    recipe = load_config(KTOStageConfig, "recipes/kto/smollm2-135m-lora.yaml")
    assert (recipe.model, recipe.loss_type, recipe.train_sampling_strategy) == ("adapter:sft", "kto", "sequential")
    pipeline = build_config(
        PipelineConfig,
        {"steps": ["import", "sft", "kto"], "kto": {"recipe": "recipes/kto/smollm2-135m-lora.yaml", "max_steps": 2}},
    )
    assert pipeline.steps == ["import", "sft", "kto"]
    with pytest.raises(AlignError, match="pipeline kto"):
        build_config(PipelineConfig, {"kto": {"beta": "high"}})
