"""The SFT stage end to end on a tiny model built in the test: real TRL trainer, real registry."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from align.config import build_config
from align.errors import AlignError
from align.models import load_model
from align.registry import Registry
from align.sft import SFTStageConfig, main, run_sft, to_prompt_completion

WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]


def word_rows():
    return [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
        for w in WORDS
    ]


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "ws")
    registry.register(word_rows(), name="words", kind="sft")
    return registry


def recipe(tiny_model_dir, **values) -> dict:
    """A short LoRA run on the tiny model, evaluated on its training rows; `values` override."""
    base = {
        "model": str(tiny_model_dir),
        "dataset": "words",
        "eval_dataset": "words",
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "max_steps": 4,
        "logging_steps": 1,
        "save_steps": 2,
        "report_to": "none",
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "gradient_checkpointing": False,
        "seed": 0,
    }
    return base | values


def config(tiny_model_dir, **values):
    return build_config(SFTStageConfig, recipe(tiny_model_dir, **values))


def test_multi_turn_rows_give_one_example_per_assistant_turn():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "a2"},
    ]
    rows = to_prompt_completion([{"messages": messages}])
    assert rows == [
        {"prompt": messages[:2], "completion": [messages[2]]},
        {"prompt": messages[:4], "completion": [messages[4]]},
    ]


class GrabFirstBatch(TrainerCallback):
    def on_train_begin(self, args, state, control, train_dataloader=None, processing_class=None, **kwargs):
        self.batch = next(iter(train_dataloader))
        self.tokenizer = processing_class


def test_loss_is_on_assistant_tokens_only(registry, tiny_model_dir):
    grab = GrabFirstBatch()
    run_sft(config(tiny_model_dir, max_steps=1), registry, callbacks=[grab])
    labels = grab.batch["labels"]
    trained = {grab.tokenizer.decode([t for t in row if t != -100]) for row in labels.tolist()}
    # Exactly the assistant replies (and the end-of-turn token that closes them) carry loss: not the prompt.
    assert all(text.split("<|im_end|>")[0] in {f"{w} {w}" for w in WORDS} for text in trained), trained
    assert not any("say" in text or "user" in text for text in trained)


def test_lora_moves_adapter_weights_not_base_weights_and_loss_falls(registry, tiny_model_dir, assert_base_unchanged):
    artifact = run_sft(config(tiny_model_dir, max_steps=30), registry)
    assert artifact.ref == "adapter:sft@1"
    assert (artifact.path / "adapter_model.safetensors").is_file()

    model, _ = load_model(artifact.ref, registry)
    assert_base_unchanged(model, tiny_model_dir)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "LoRA B starts at zero and must have moved"

    run = registry.get_run(artifact.run_id)
    assert run.status == "completed"
    # A memorisable set: the eval loss (on the training rows) falls clearly below where it started
    # (random tiny models start near ln(vocab) = 5.56 and drop ~0.4 nats in 30 LoRA steps).
    assert run.metrics["eval_loss"] < run.metrics["eval_loss_before"] - 0.25
    assert run.metrics["eval_perplexity"] == pytest.approx(torch.tensor(run.metrics["eval_loss"]).exp().item())
    assert (run.dir / "report.md").is_file() and (run.dir / "loss.png").is_file()
    roles = {role: parent for role, parent in registry.parents(artifact)}
    assert roles["train"].ref == "words@1" and roles["base-model"] == str(tiny_model_dir)


def test_resume_continues_from_the_last_checkpoint_and_matches_a_straight_run(
    tmp_path, tiny_model_dir, stop_after, assert_same_adapter
):
    straight_registry = Registry(tmp_path / "straight")
    straight_registry.register(word_rows(), name="words", kind="sft")
    straight = run_sft(config(tiny_model_dir), straight_registry)

    registry = Registry(tmp_path / "resumed")
    registry.register(word_rows(), name="words", kind="sft")
    values = recipe(tiny_model_dir)
    with pytest.raises(KeyboardInterrupt):
        run_sft(build_config(SFTStageConfig, values), registry, recipe=values, callbacks=[stop_after(2)])
    [killed] = registry.list_runs()
    assert killed.status == "failed" and (killed.dir / "checkpoints" / "checkpoint-2").is_dir()

    resumed = main(None, [], workspace=str(registry.root), resume=True)
    assert registry.get_run(resumed.run_id).id == killed.id
    assert_same_adapter(straight, resumed)


def test_full_fine_tuning_registers_a_loadable_model(registry, tiny_model_dir):
    artifact = run_sft(config(tiny_model_dir, peft="none", max_steps=2, output_name="full"), registry)
    assert artifact.ref == "model:full@1"
    model, _ = load_model("model:full", registry)
    before = load_file(tiny_model_dir / "model.safetensors")
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("method", ["ia3", "prompt-tuning"])
def test_other_peft_methods_train_and_register(registry, tiny_model_dir, method):
    artifact = run_sft(config(tiny_model_dir, peft=method, max_steps=2, output_name=method), registry)
    assert (artifact.path / "adapter_config.json").is_file()
    model, _ = load_model(artifact.ref, registry)
    assert model.peft_config["default"].peft_type.value.replace("_", "-").lower() in {"ia3", "prompt-tuning"}


def test_bad_inputs_fail_before_training_and_start_no_run(registry, tiny_model_dir):
    registry.register([{"prompt": [{"role": "user", "content": "q"}]}], name="just-prompts", kind="prompts")
    with pytest.raises(AlignError, match="holds 'prompts' rows, but sft rows are needed"):
        run_sft(config(tiny_model_dir, dataset="just-prompts"), registry)
    with pytest.raises(AlignError, match="no dataset 'nothing'"):
        run_sft(config(tiny_model_dir, dataset="nothing"), registry)
    with pytest.raises(AlignError, match="does not exist"):
        run_sft(config(tiny_model_dir, model=str(tiny_model_dir / "missing")), registry)
    with pytest.raises(AlignError, match="unknown config key 'lerning_rate'"):
        main(None, ["--dataset", "words", "--lerning_rate", "1"], workspace=str(registry.root))
    assert registry.list_runs() == []


def test_adapter_folder_loads_directly_with_peft(registry, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    artifact = run_sft(config(tiny_model_dir, max_steps=2), registry)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), artifact.path)
    via_registry, _ = load_model(artifact.ref, registry)
    ids = torch.tensor([[5, 6, 7, 8]])
    torch.testing.assert_close(model(input_ids=ids).logits, via_registry(input_ids=ids).logits)


def test_bf16_autocast_trains_on_a_cpu(registry, tiny_model_dir):
    # transformers refuses bf16 without a GPU unless the run is marked as a CPU run: the config does that
    config_ = config(tiny_model_dir, bf16=True, max_steps=2)
    assert config_.use_cpu
    artifact = run_sft(config_, registry)
    assert registry.get_run(artifact.run_id).metrics["steps"] == 2
    saved = load_file(artifact.path / "adapter_model.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in saved.values())  # mixed precision: fp32 weights


def test_packing_trains(registry, tiny_model_dir):
    artifact = run_sft(config(tiny_model_dir, packing=True, max_length=64, max_steps=2), registry)
    assert registry.get_run(artifact.run_id).metrics["steps"] == 2
