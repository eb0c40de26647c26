"""Candidate generation on tiny models: determinism, the row schema, several models, lineage."""

import json

import pytest

from align.errors import AlignError
from align.generate import SamplingSettings, generate_candidates
from align.registry import Registry


@pytest.fixture
def registry(tmp_path, tiny_model_dir):
    import peft
    from transformers import AutoModelForCausalLM

    registry = Registry(tmp_path / "ws")
    prompts = [{"prompt": [{"role": "user", "content": f"question {i}" + " more" * i}]} for i in range(5)]
    registry.register(prompts, name="qs", kind="prompts")
    # A second model: a LoRA adapter with non-zero weights on the tiny base, registered as an artifact.
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / "adapter")
    registry.register_artifact("adapter", "tuned", tmp_path / "adapter", base_model=str(tiny_model_dir))
    return registry


SETTINGS = SamplingSettings(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=7, batch_size=2)


def test_two_models_n_completions_each_with_sources_and_settings(registry, tiny_model_dir):
    version = generate_candidates(
        registry, ["adapter:tuned", str(tiny_model_dir)], "qs", n=3, name="cands", settings=SETTINGS
    )
    assert (version.ref, version.kind, version.num_rows) == ("cands@1", "candidates", 5)
    rows = registry.rows(version)
    for index, row in enumerate(rows):
        assert row["prompt"] == [{"role": "user", "content": f"question {index}" + " more" * index}]
        assert len(row["completions"]) == 6
        assert row["sources"] == ["adapter:tuned@1"] * 3 + [str(tiny_model_dir)] * 3
        assert all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in row["completions"])
        settings = json.loads(row["generation"])
        assert settings == {
            "n": 3, "max_new_tokens": 6, "temperature": 1.0, "top_p": 1.0, "seed": 7, "batch_size": 2, "dtype": "fp32"
        }  # fmt: skip
    # Lineage: the prompts, the adapter artifact, the base model and the run.
    roles = {
        (role, getattr(parent, "ref", getattr(parent, "stage", parent))) for role, parent in registry.parents(version)
    }
    assert roles == {
        ("model", "adapter:tuned@1"),
        ("model", str(tiny_model_dir)),
        ("produced-by", "generate"),
        ("prompts", "qs@1"),
    }


def test_same_seed_same_candidates_other_seed_other_candidates(registry, tiny_model_dir):
    first = generate_candidates(registry, [str(tiny_model_dir)], "qs", n=2, name="c", settings=SETTINGS)
    again = generate_candidates(registry, [str(tiny_model_dir)], "qs", n=2, name="c", settings=SETTINGS)
    assert again.ref == first.ref == "c@1"  # identical rows: content addressing gives back the same version
    other = SamplingSettings(max_new_tokens=6, temperature=1.0, top_p=1.0, seed=8, batch_size=2)
    third = generate_candidates(registry, [str(tiny_model_dir)], "qs", n=2, name="c", settings=other)
    assert third.ref == "c@2"
    assert registry.rows(first) != registry.rows(third)


def test_the_weights_dtype_follows_the_hardware_unless_given(registry, tiny_model_dir, monkeypatch):
    import align.generate
    import align.models

    assert SETTINGS.resolved().dtype == "fp32"  # conftest: a machine without native bf16
    monkeypatch.setattr(align.models, "bf16_is_fast", lambda: True)
    assert SETTINGS.resolved().dtype == "bf16"
    assert SamplingSettings(dtype="fp32").resolved().dtype == "fp32"
    loaded = []
    real_load = align.generate.load_model
    monkeypatch.setattr(align.generate, "load_model", lambda *a, **k: loaded.append(k["dtype"]) or real_load(*a, **k))
    version = generate_candidates(registry, [str(tiny_model_dir)], "qs", n=2, name="bf", limit=2, settings=SETTINGS)
    assert loaded == ["bf16"]
    assert all(json.loads(row["generation"])["dtype"] == "bf16" for row in registry.rows(version))
    with pytest.raises(AlignError, match="--dtype must be one of"):
        SamplingSettings(dtype="int8")


def test_limit_takes_the_first_prompts(registry, tiny_model_dir):
    version = generate_candidates(registry, [str(tiny_model_dir)], "qs", n=2, name="few", limit=2, settings=SETTINGS)
    assert [r["prompt"][0]["content"] for r in registry.rows(version)] == ["question 0", "question 1 more"]


def test_bad_requests_fail_before_generating(registry, tiny_model_dir):
    model = str(tiny_model_dir)
    registry.register(
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
        name="chat",
        kind="sft",
    )
    with pytest.raises(AlignError, match="at least two completions"):
        generate_candidates(registry, [model], "qs", n=1, name="x")
    with pytest.raises(AlignError, match="holds 'sft' rows, but prompts rows are needed"):
        generate_candidates(registry, [model], "chat", n=2, name="x")
    with pytest.raises(AlignError, match="no artifact 'adapter:nope'"):
        generate_candidates(registry, [model, "adapter:nope"], "qs", n=1, name="x")
    with pytest.raises(AlignError, match="--temperature"):
        SamplingSettings(temperature=-1)
    assert registry.list_runs() == []


def test_adapters_are_merged_for_generation_without_changing_outputs(registry):
    import torch

    from align.generate import merged_for_inference
    from align.models import load_model

    adapter_model, _ = load_model("adapter:tuned", registry)
    ids = torch.tensor([[5, 9, 13, 21]])
    expected = adapter_model(input_ids=ids).logits
    merged = merged_for_inference(adapter_model)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)
