"""recipes/accelerate/: every launcher config loads with accelerate's own loader, uses only keys `accelerate launch`
knows, and opens with the command that uses it."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

CONFIGS = Path(__file__).resolve().parents[2] / "recipes" / "accelerate"
EXPECTED = {
    "cpu-2-processes.yaml": (DistributedType.MULTI_GPU, 2, 1),  # the multi-process launcher; no GPU: gloo on CPU
    "ddp.yaml": (DistributedType.MULTI_GPU, 4, 1),
    "fsdp.yaml": (DistributedType.FSDP, 4, 1),
    "deepspeed-zero2.yaml": (DistributedType.DEEPSPEED, 4, 1),
    "deepspeed-zero3.yaml": (DistributedType.DEEPSPEED, 4, 1),
    "two-nodes.yaml": (DistributedType.MULTI_GPU, 8, 2),
}


def test_the_folder_holds_the_documented_configs():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_config_loads_with_accelerates_loader(name):
    path = CONFIGS / name
    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig)
    assert (config.distributed_type, config.num_processes, config.num_machines) == EXPECTED[name]
    # Nested settings reach `accelerate launch` as its own options (fsdp_config.fsdp_x -> --fsdp_x,
    # deepspeed_config.x -> --x): each must be one it has
    options = vars(launch_command_parser().parse_args(["script.py"]))
    nested = {**config.fsdp_config, **config.deepspeed_config}
    assert set(nested) <= set(options), sorted(set(nested) - set(options))
    assert (config.distributed_type == DistributedType.FSDP) == bool(config.fsdp_config)
    assert config.deepspeed_config.get("zero_stage") == {"deepspeed-zero2.yaml": 2, "deepspeed-zero3.yaml": 3}.get(name)
    first_lines = path.read_text(encoding="utf-8").splitlines()[:6]
    command = f"accelerate launch --config_file recipes/accelerate/{name} -m align "
    assert any(line.lstrip("# ").startswith(command) for line in first_lines), f"{name} must open with its command"
