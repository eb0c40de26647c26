"""Stage configs: strict YAML + --key value overrides, and every recipe under recipes/ parses."""

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from align.config import build_config, load_config, parse_overrides, read_yaml
from align.errors import AlignError
from align.pipeline import stage_config_class

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@dataclass
class Toy:
    name: str = "x"
    steps: int = 1
    rate: float = 0.1
    flag: bool = False
    maybe: int | None = None
    modules: list[str] | str = "all-linear"

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"config key 'steps' must be at least 0 (got {self.steps})")


def test_overrides_parse_key_value_pairs_flags_and_dashes():
    assert parse_overrides(["--max-steps", "10", "--packing", "--lr=0.5", "--name", "a"]) == {
        "max_steps": "10",
        "packing": "true",
        "lr": "0.5",
        "name": "a",
    }


def test_override_without_dashes_is_refused():
    with pytest.raises(AlignError, match="--key value"):
        parse_overrides(["max_steps", "10"])


def test_values_are_converted_to_the_field_type():
    toy = build_config(Toy, {"steps": "7", "rate": "2e-4", "flag": "true", "maybe": "3", "name": "n"})
    assert (toy.steps, toy.rate, toy.flag, toy.maybe, toy.name) == (7, 2e-4, True, 3, "n")
    assert build_config(Toy, {"rate": 1}).rate == 1.0
    assert build_config(Toy, {"maybe": None}).maybe is None
    assert build_config(Toy, {"modules": ["q_proj", "v_proj"]}).modules == ["q_proj", "v_proj"]


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(AlignError, match=r"unknown config key 'stepz' \(did you mean 'steps'\?\)"):
        build_config(Toy, {"stepz": 3}, source="r.yaml")


@pytest.mark.parametrize(
    ("key", "value"),
    [("steps", "many"), ("steps", 1.5), ("rate", "fast"), ("flag", "perhaps"), ("name", 3), ("steps", None)],
)
def test_wrong_type_names_the_field_and_value(key, value):
    with pytest.raises(AlignError) as error:
        build_config(Toy, {key: value}, source="r.yaml")
    assert f"'{key}'" in str(error.value) and "r.yaml" in str(error.value)


def test_post_init_errors_become_align_errors_naming_the_source():
    with pytest.raises(AlignError, match=r"r.yaml: config key 'steps' must be at least 0"):
        build_config(Toy, {"steps": -1}, source="r.yaml")


def test_yaml_file_and_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 3\nrate: 0.5\n")
    toy = load_config(Toy, recipe, ["--steps", "9"])
    assert (toy.steps, toy.rate) == (9, 0.5)
    recipe.write_text("- a list\n")
    with pytest.raises(AlignError, match="mapping"):
        read_yaml(recipe)
    recipe.write_text("steps: [unclosed\n")
    with pytest.raises(AlignError, match="not valid YAML"):
        read_yaml(recipe)
    with pytest.raises(AlignError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")


def test_every_recipe_parses_into_its_stage_config():
    from align.sweep import SweepConfig

    recipes = sorted(RECIPES.rglob("*.yaml"))
    assert recipes, "no recipes found"
    for path in recipes:
        stage = path.relative_to(RECIPES).parts[0]
        if stage == "accelerate":
            continue  # launcher configs, not stage recipes: tests/unit/test_accelerate_recipes.py
        config = load_config(SweepConfig if stage == "sweep" else stage_config_class(stage), path)
        assert getattr(config, "dataset", True), path
        first_lines = path.read_text().splitlines()[:4]
        assert any(f"align {stage} --config recipes/" in line for line in first_lines), (
            f"{path} must open with its command"
        )


def test_sft_config_rejects_bad_values_at_parse_time():
    from align.sft import SFTStageConfig

    with pytest.raises(AlignError, match="'peft' must be one of"):
        build_config(SFTStageConfig, {"dataset": "d", "peft": "adapters"})
    with pytest.raises(AlignError, match="'dataset' is required"):
        build_config(SFTStageConfig, {})
    with pytest.raises(AlignError, match="'output_name'"):
        build_config(SFTStageConfig, {"dataset": "d", "output_name": "../evil"})
    with pytest.raises(AlignError, match="'eval_split'"):
        build_config(SFTStageConfig, {"dataset": "d", "eval_split": 1.5})


def test_qlora_on_a_machine_without_cuda_fails_clearly(monkeypatch):
    import torch

    from align.sft import SFTStageConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AlignError, match=r"'load_in_4bit' \(QLoRA\) needs a CUDA GPU"):
        build_config(SFTStageConfig, {"dataset": "d", "load_in_4bit": True})


@pytest.mark.hardware_bf16
def test_bf16_defaults_to_what_the_hardware_supports(monkeypatch):
    import torch

    from align.ppo import PPOStageConfig
    from align.sft import SFTStageConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # a CPU without native bf16: fp32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    assert build_config(SFTStageConfig, {"dataset": "d"}).bf16 is False
    # a CPU with AVX-512 BF16: bf16 autocast, and transformers is told the run is on the CPU
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    config = build_config(SFTStageConfig, {"dataset": "d"})
    assert config.bf16 is True and config.use_cpu is True
    ppo = {"dataset": "p", "reward_model": "rm:rm"}
    assert build_config(PPOStageConfig, ppo).bf16 is True
    # what a recipe says wins
    assert build_config(SFTStageConfig, {"dataset": "d", "bf16": False}).bf16 is False
    assert build_config(PPOStageConfig, ppo | {"bf16": False}).bf16 is False
    assert build_config(SFTStageConfig, {"dataset": "d", "fp16": True, "use_cpu": True}).bf16 is False


def test_report_to_is_checked_at_parse_time_and_tensorboard_falls_back_to_none(monkeypatch):
    import align.config
    from align.ppo import PPOStageConfig
    from align.sft import SFTStageConfig

    with pytest.raises(AlignError, match="r.yaml: config key 'report_to': nowhere is not supported"):
        build_config(SFTStageConfig, {"dataset": "d", "report_to": "nowhere"}, source="r.yaml")
    monkeypatch.setattr(align.config, "tensorboard_installed", lambda: False)
    assert build_config(SFTStageConfig, {"dataset": "d"}).report_to == []  # none, as TrainingArguments spells it
    assert build_config(PPOStageConfig, {"dataset": "d", "reward_model": "rm:r"}).report_to == "none"


def test_lora_target_modules_are_checked_at_parse_time():
    """A value PEFT would refuse only when the adapter is built, minutes later, is refused here, naming it."""
    from align.sft import SFTStageConfig

    for value in ("5", 5, [], ["q_proj", 7], "layers.5", "q_proj,", "(q_proj"):
        wanted = rf"r.yaml: config key 'lora_target_modules' must be .* \(got {re.escape(repr(value))}"
        with pytest.raises(AlignError, match=wanted):
            build_config(SFTStageConfig, {"dataset": "d", "lora_target_modules": value}, source="r.yaml")
    with pytest.raises(AlignError, match="command line: config key 'lora_target_modules'.*got '5'"):
        load_config(SFTStageConfig, None, ["--dataset", "d", "--lora_target_modules", "5"])

    def modules(value):
        return build_config(SFTStageConfig, {"dataset": "d", "lora_target_modules": value}).lora_target_modules

    assert modules("all-linear") == "all-linear"
    assert modules(["q_proj", "self_attn.v_proj"]) == ["q_proj", "self_attn.v_proj"]
    assert modules("q_proj, v_proj") == ["q_proj", "v_proj"]  # the command line's list
    assert modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"  # anything else is PEFT's regular expression
