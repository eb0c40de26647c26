"""`align merge`: LoRA merged into plain safetensors weights, equal to the adapter model, adapter left intact."""

import hashlib

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from align.cli import main as cli_main
from align.errors import AlignError
from align.merge import merge_adapter
from align.registry import Registry


def make_adapter(folder, base_dir, config):
    torch.manual_seed(2)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)  # a trained-looking adapter: it changes the logits
    model.save_pretrained(folder)


@pytest.fixture
def registry(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "ws")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    make_adapter(tmp_path / "adapter", tiny_model_dir, lora)
    registry.register_artifact("adapter", "dpo", tmp_path / "adapter", base_model=str(tiny_model_dir))
    return registry


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_merged_weights_load_with_plain_transformers_and_match_the_adapter(registry, tiny_model_dir, tmp_path):
    adapter = registry.resolve_artifact("adapter:dpo")
    before = digest(adapter.path)
    out, artifact, difference = merge_adapter(registry, "adapter:dpo", tmp_path / "merged")

    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no PEFT
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter.path).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70, 2]])
    with torch.no_grad():
        expected, got, plain = with_adapter(ids).logits, merged(ids).logits, base(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert (expected - plain).abs().max() > 1e-2  # the adapter really changes the model
    assert difference <= 1e-4

    # Registered as a full model with lineage to the adapter; the adapter folder is untouched.
    assert artifact.ref == "model:dpo-merged@1" and artifact.base_model == str(tiny_model_dir)
    assert [(role, parent.ref) for role, parent in registry.parents(artifact) if hasattr(parent, "ref")] == [
        ("merged-from", "adapter:dpo@1")
    ]
    assert digest(adapter.path) == before


def test_cli_merge_registers_a_model_reference_and_refuses_a_used_folder(registry, tmp_path, capsys):
    workspace = str(registry.root)
    assert cli_main(["merge", "adapter:dpo@1", "--out", str(tmp_path / "m"), "--workspace", workspace]) == 0
    assert "model:dpo-merged@1" in capsys.readouterr().out
    from align.models import load_model

    model, _ = load_model("model:dpo-merged", Registry(workspace))  # a registry model reference now
    assert not isinstance(model, PeftModel)
    assert cli_main(["merge", "adapter:dpo", "--out", str(tmp_path / "m"), "--workspace", workspace]) == 2
    assert "already exists" in capsys.readouterr().err


def test_only_lora_adapters_merge(registry, tiny_model_dir, tmp_path):
    make_adapter(tmp_path / "ia3", tiny_model_dir, IA3Config(task_type="CAUSAL_LM"))
    registry.register_artifact("adapter", "ia3", tmp_path / "ia3", base_model=str(tiny_model_dir))
    with pytest.raises(AlignError, match="only LoRA adapters merge"):
        merge_adapter(registry, "adapter:ia3", tmp_path / "out")
    with pytest.raises(AlignError, match="takes an adapter reference"):
        merge_adapter(registry, str(tiny_model_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()
