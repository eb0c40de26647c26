"""The DPO stage end to end on a tiny model built in the test: real TRL trainer, real PEFT adapters, real registry.

Synthetic preferences with a rule a model can learn in a few steps: for every prompt the chosen reply starts
with "yes", the rejected one with "no". Held-out pairs use other words, so accuracy there means the rule was
learned, not the pairs.
"""

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback
from trl.trainer.utils import use_adapter

from align.config import build_config
from align.dpo import DPOStageConfig, main, recorded_agreement, resolve_label_smoothing, run_dpo
from align.dpo_trainer import PairCollator, add_pair_scoring, pair_logps, smoothing_from_agreement, tokenize_pairs
from align.errors import AlignError
from align.registry import Registry

TRAIN_WORDS = ["apple", "pear", "plum", "fig", "kiwi", "lime", "date", "lemon"]
TEST_WORDS = ["melon", "grape", "peach", "mango"]


def pairs(words, **extra):
    return [
        {
            "prompt": [{"role": "user", "content": f"is {w} ok?"}],
            "chosen": [{"role": "assistant", "content": f"yes {w}"}],
            "rejected": [{"role": "assistant", "content": f"no {w}"}],
        }
        | extra
        for w in words
    ]


@pytest.fixture
def registry(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "ws")
    registry.register(pairs(TRAIN_WORDS), name="prefs", kind="preference")
    registry.register(pairs(TEST_WORDS), name="prefs-test", kind="preference")
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
        "dataset": "prefs",
        "eval_dataset": "prefs-test",
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
    return build_config(DPOStageConfig, base | values)


class KeepModel(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def eval_batch(registry, tokenizer_source):
    from align.models import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_source))
    examples, _ = tokenize_pairs(registry.rows("prefs-test"), tokenizer, max_length=64, min_prompt_length=4)
    return PairCollator(tokenizer.pad_token_id)(examples)


def logps_of(model, batch):
    with torch.no_grad():
        return torch.cat(pair_logps(model, batch))


def test_dpo_from_the_sft_adapter(registry, tiny_model_dir, monkeypatch, assert_base_unchanged):
    loads = {"base": 0, "adapter": 0}
    base_load, adapter_load = AutoModelForCausalLM.from_pretrained, PeftModel.load_adapter

    def count_base(*args, **kwargs):
        loads["base"] += 1
        return base_load(*args, **kwargs)

    def count_adapter(*args, **kwargs):  # every read of adapter weights from disk goes through load_adapter
        loads["adapter"] += 1
        return adapter_load(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", count_base)
    monkeypatch.setattr(PeftModel, "load_adapter", count_adapter)
    keep = KeepModel()
    artifact = run_dpo(config(model="adapter:sft"), registry, callbacks=[keep])
    monkeypatch.undo()

    # Nothing loaded twice: one base model, one read of the SFT adapter; the reference is an adapter on it.
    assert loads == {"base": 1, "adapter": 1}
    model = keep.model
    assert set(model.peft_config) == {"default", "ref"}

    # The implicit reward learned the rule: chance before (the policy is the reference), right after.
    run = registry.get_run(artifact.run_id)
    metrics = run.metrics
    assert metrics["eval_reward_accuracy_before"] == 0.5 and metrics["eval_reward_margin_before"] == 0.0
    assert metrics["eval_reward_accuracy"] == 1.0 and metrics["eval_reward_margin"] > 0.5
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.2
    assert metrics["train_pairs"] == 8 and metrics["train_pairs_dropped"] == 0

    # The reference is really frozen: its log-probs equal the SFT adapter's, loaded fresh, after training.
    batch = eval_batch(registry, tiny_model_dir)
    sft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), registry.resolve_artifact("adapter:sft").path
    ).eval()
    add_pair_scoring(sft.get_base_model())
    model.eval()
    with use_adapter(model, "ref"):
        reference_after = logps_of(model, batch)
    torch.testing.assert_close(reference_after, logps_of(sft, batch), atol=1e-5, rtol=0)
    assert not torch.allclose(logps_of(model, batch), reference_after, atol=1e-3)  # the policy moved

    # Base weights did not move.
    assert_base_unchanged(model, tiny_model_dir)

    # The output: the policy adapter alone, on the SFT adapter's base, with lineage to both inputs.
    assert artifact.ref == "adapter:dpo@1" and artifact.base_model == str(tiny_model_dir)
    assert (artifact.path / "adapter_model.safetensors").is_file() and not (artifact.path / "ref").exists()
    roles = {
        (role, parent.ref if hasattr(parent, "ref") else str(parent)) for role, parent in registry.parents(artifact)
    }
    assert {("init", "adapter:sft@1"), ("reference", "adapter:sft@1"), ("train", "prefs@1")} <= roles
    assert ("eval", "prefs-test@1") in roles and ("base-model", str(tiny_model_dir)) in roles
    dpo = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), artifact.path).eval()
    add_pair_scoring(dpo.get_base_model())
    torch.testing.assert_close(logps_of(dpo, batch), logps_of(model, batch), atol=1e-5, rtol=0)

    # The report, with the held-out table and plots.
    report = (run.dir / "report.md").read_text()
    assert "implicit-reward accuracy" in report and "| 0.5000 | 1.0000 |" in report
    for plot in ("loss.png", "reward_accuracy.png", "rewards.png", "logps.png", "eval_margins.png"):
        assert (run.dir / plot).is_file(), plot


def test_dpo_from_a_base_model_uses_the_base_as_reference(registry, tiny_model_dir):
    keep = KeepModel()
    artifact = run_dpo(
        config(model=str(tiny_model_dir), share_prompt=False, precompute_ref_log_probs=True, output_name="dpo-base"),
        registry,
        callbacks=[keep],
    )
    metrics = registry.get_run(artifact.run_id).metrics
    assert metrics["eval_reward_accuracy_before"] == 0.5 and metrics["eval_reward_accuracy"] == 1.0
    assert artifact.base_model == str(tiny_model_dir)
    assert not any(role in ("init", "reference") for role, _ in registry.parents(artifact))

    model = keep.model.eval()
    assert set(model.peft_config) == {"default"}
    batch = eval_batch(registry, tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    add_pair_scoring(base)
    with model.disable_adapter():
        torch.testing.assert_close(logps_of(model, batch), logps_of(base, batch), atol=1e-5, rtol=0)


def test_the_shared_prompt_layout_gives_the_same_log_probs_as_separate_sequences(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager").eval()
    add_pair_scoring(model)
    add_pair_scoring(eager)
    examples = [
        {"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10], "rejected_ids": [11, 12, 13]},
        {"prompt_ids": [20, 21], "chosen_ids": [22, 23, 24, 25], "rejected_ids": [26]},
    ]

    def by_hand(prompt, reply):  # the plain way: full logits of prompt + reply, one sequence at a time
        with torch.no_grad():
            log_probs = model(torch.tensor([prompt + reply])).logits.log_softmax(-1)[0]
        return sum(log_probs[len(prompt) - 1 + k, token].item() for k, token in enumerate(reply))

    expected = [by_hand(e["prompt_ids"], e["chosen_ids"]) for e in examples]
    expected += [by_hand(e["prompt_ids"], e["rejected_ids"]) for e in examples]
    for share_prompt in (True, False):
        batch = PairCollator(0, share_prompt=share_prompt)(examples)
        assert batch["input_ids"].shape[0] == (2 if share_prompt else 4)
        assert logps_of(model, batch).tolist() == pytest.approx(expected, abs=1e-5)
        assert logps_of(eager, batch).tolist() == pytest.approx(expected, abs=1e-5)


def test_long_prompts_are_cut_from_the_left_and_dropped_rows_are_counted(tiny_tokenizer):
    rows = pairs(["fig"]) + [
        {
            "prompt": [{"role": "user", "content": "tell me a long story " * 5 + "END"}],
            "chosen": [{"role": "assistant", "content": "ok"}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
        {
            "prompt": [{"role": "user", "content": "hi"}],
            "chosen": [{"role": "assistant", "content": "x" * 80}],
            "rejected": [{"role": "assistant", "content": "no"}],
        },
    ]
    examples, counts = tokenize_pairs(rows, tiny_tokenizer, max_length=60, min_prompt_length=8)
    assert counts == {"rows": 3, "truncated": 1, "replies_cut": 0, "dropped": 1, "kept": 2}
    short, long = examples
    assert tiny_tokenizer.decode(short["prompt_ids"]).startswith("<|im_start|>user\nis fig ok?")
    prompt = tiny_tokenizer.decode(long["prompt_ids"])
    reply = tiny_tokenizer.decode(long["chosen_ids"])
    # The prompt lost its start and kept its end (the latest context); the reply is whole.
    assert not prompt.startswith("<|im_start|>") and prompt.endswith("END<|im_end|>\n<|im_start|>assistant\n")
    assert reply.startswith("ok<|im_end|>")
    assert len(long["prompt_ids"]) + max(len(long["chosen_ids"]), len(long["rejected_ids"])) == 60
    assert examples[0]["weight"] == 1.0 and examples[0]["margin"] == 0.0 and examples[0]["tie"] is False

    # Evaluation keeps every pair: the long reply keeps its first tokens, the prompt its last min_prompt_length
    examples, counts = tokenize_pairs(rows, tiny_tokenizer, max_length=60, min_prompt_length=8, overflow="cut")
    assert counts == {"rows": 3, "truncated": 2, "replies_cut": 1, "dropped": 0, "kept": 3}
    cut = examples[2]
    assert len(cut["prompt_ids"]) == 8 and len(cut["chosen_ids"]) == 52 and len(cut["rejected_ids"]) < 52
    assert tiny_tokenizer.decode(cut["prompt_ids"]) == "sistant\n"  # the last 8 tokens (bytes) of the prompt
    assert tiny_tokenizer.decode(cut["chosen_ids"]) == "x" * 52


def test_weights_margins_and_ties_train_and_ties_stay_out_of_accuracy(registry, tiny_model_dir):
    rows = pairs(TRAIN_WORDS[:4], weight=2.0, margin=0.2) + pairs(TRAIN_WORDS[4:], tie=True, weight=0.5)
    registry.register(rows, name="mixed", kind="preference")
    registry.register(pairs(TEST_WORDS[:2]) + pairs(TEST_WORDS[2:], tie=True), name="mixed-test", kind="preference")
    artifact = run_dpo(
        config(model="adapter:sft", dataset="mixed", eval_dataset="mixed-test", loss_type="ipo", max_steps=4),
        registry,
    )
    metrics = registry.get_run(artifact.run_id).metrics
    assert metrics["eval_ties"] == 2 and metrics["eval_pairs"] == 4
    assert 0 <= metrics["eval_reward_accuracy"] <= 1


def test_label_smoothing_auto_reads_the_agreement_in_the_lineage(registry):
    agreement = {"krippendorff_alpha": 0.6, "pairwise_agreement": 0.8, "annotators": 3, "votes": 30}
    labelled = registry.register(pairs(TRAIN_WORDS), name="labelled", kind="preference", meta={"agreement": agreement})
    train, _ = registry.split(labelled.ref, test_size=2, seed=0)
    assert recorded_agreement(registry, train)[1].ref == labelled.ref  # found on the parent
    value, note = resolve_label_smoothing(config(label_smoothing="auto", loss_type="robust"), registry, train)
    assert value == pytest.approx(smoothing_from_agreement(0.8)) and "0.800" in note and labelled.ref in note
    value, note = resolve_label_smoothing(config(label_smoothing="auto"), registry, registry.resolve("prefs"))
    assert value == 0.0 and "no annotator agreement" in note
    assert resolve_label_smoothing(config(label_smoothing=0.2), registry, train)[0] == 0.2
    single = registry.register(
        pairs(TEST_WORDS),
        name="single",
        kind="preference",
        meta={"agreement": agreement | {"pairwise_agreement": None}},
    )
    value, note = resolve_label_smoothing(config(label_smoothing="auto"), registry, single)
    assert value == 0.0 and "no pair was judged by two annotators" in note


def test_a_killed_run_resumes_from_its_checkpoint_and_matches_a_straight_run(
    registry, tiny_model_dir, stop_after, assert_same_adapter
):
    recipe = {
        "model": "adapter:sft",
        "dataset": "prefs",
        "eval_dataset": "prefs-test",
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "beta": 0.5,
        "max_steps": 4,
        "max_length": 64,
        "save_steps": 2,
        "report_to": "none",
        "lr_scheduler_type": "constant",
        "activation_checkpointing": False,
        "seed": 0,
    }
    straight = run_dpo(build_config(DPOStageConfig, recipe | {"output_name": "straight"}), registry)
    with pytest.raises(KeyboardInterrupt):
        run_dpo(build_config(DPOStageConfig, recipe), registry, recipe=recipe, callbacks=[stop_after(2)])
    killed = registry.list_runs()[-1]
    assert killed.status == "failed" and (killed.dir / "checkpoints" / "checkpoint-2").is_dir()

    resumed = main(None, [], workspace=str(registry.root), resume=True)
    assert resumed.run_id == killed.id and registry.get_run(killed.id).status == "completed"
    assert_same_adapter(straight, resumed)


def test_bad_inputs_fail_before_training_and_start_no_run(registry, tiny_model_dir, tmp_path):
    registry.register(
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
        name="chat",
        kind="sft",
    )
    with pytest.raises(AlignError, match="holds 'sft' rows, but preference rows are needed"):
        run_dpo(config(model="adapter:sft", dataset="chat"), registry)
    with pytest.raises(AlignError, match="no artifact 'adapter:nothing'"):
        run_dpo(config(model="adapter:nothing"), registry)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), IA3Config(task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "ia3")
    registry.register_artifact("adapter", "ia3", tmp_path / "ia3", base_model=str(tiny_model_dir))
    with pytest.raises(AlignError, match="IA3 adapter; DPO continues LoRA adapters only"):
        run_dpo(config(model="adapter:ia3"), registry)
    with pytest.raises(AlignError, match="unknown config key 'bta'"):
        main(None, ["--dataset", "prefs", "--bta", "0.2"], workspace=str(registry.root))
    assert registry.list_runs() == []
