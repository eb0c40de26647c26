"""Stage configs: a YAML recipe plus `--key value` overrides mapped strictly onto a dataclass.

Each stage config is TRL's config class plus our fields (model, dataset, eval_dataset, output_name, ...).
Unknown keys are errors with a suggestion; values are converted to the field's type and checked, so a bad
recipe fails at parse time, naming the field and the value, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path

from align.errors import AlignError
from align.models import DTYPE_NAMES


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise AlignError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise AlignError(f"{path}: not valid YAML: {exc}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise AlignError(f"{path}: a recipe must be a mapping of config keys to values")
    return values


def parse_overrides(arguments: list[str]) -> dict:
    """['--max_steps', '10', '--packing', '--lr-scheduler-type', 'cosine'] -> {'max_steps': '10', ...}.

    Values stay strings here; `build_config` converts them by the field's type. A flag with no value is true.
    """
    values: dict = {}
    index = 0
    while index < len(arguments):
        flag = arguments[index]
        if not flag.startswith("--") or len(flag) < 3:
            raise AlignError(f"unexpected argument {flag!r}: config overrides are written --key value")
        key, equals, value = flag[2:].partition("=")
        key = key.replace("-", "_")
        if equals:
            index += 1
        elif index + 1 < len(arguments) and not arguments[index + 1].startswith("--"):
            value = arguments[index + 1]
            index += 2
        else:
            value = "true"
            index += 1
        values[key] = value
    return values


def build_config(cls, values: dict, *, source: str = "config"):
    """Make `cls(**values)` strictly: unknown keys and values of the wrong type fail, naming the field."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    clean = {}
    for key, value in values.items():
        if key not in fields:
            hint = _did_you_mean(key, fields, "'{}'")
            raise AlignError(f"{source}: unknown config key '{key}'{hint}")
        clean[key] = coerce(key, value, hints.get(key), source)
    try:
        return cls(**clean)
    except (ValueError, TypeError) as exc:
        raise AlignError(f"{source}: {exc}") from None


def check_overrides(cls, overrides: dict) -> None:
    """Command-line overrides checked on their own, before they join the recipe, so that a mistake in one is
    blamed on the command line and not on the recipe file: an unknown key (with the closest known one) or a value
    of the wrong type."""
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    hints = typing.get_type_hints(cls)
    for key, value in overrides.items():
        if key not in fields:
            hint = _did_you_mean(key, fields, "--{}")
            raise AlignError(f"unknown option --{key} on the command line{hint}")
        coerce(key, value, hints.get(key), "command line")


def _did_you_mean(key: str, known, spelled: str) -> str:
    """' (did you mean X?)' with the known key closest to `key`, written as `spelled` formats it; else ''."""
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {spelled.format(close[0])}?)" if close else ""


def load_config(cls, config_path: str | Path | None, overrides: list[str] | dict | None = None):
    """A recipe file (optional) plus command-line overrides -> a validated config object."""
    values = read_yaml(config_path) if config_path else {}
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    values.update(extra)
    return build_config(cls, values, source=str(config_path) if config_path else "command line")


def coerce(key: str, value, annotation, source: str):
    """Convert a YAML or command-line value to the field's type; strings from the CLI are parsed."""
    if annotation is None:
        return value
    options = _union_members(annotation)
    if value is None:
        if type(None) in options:
            return None
        raise AlignError(f"{source}: config key '{key}' needs a value (got null)")
    simple = [option for option in options if option in (bool, int, float, str)]
    if not simple:
        return value  # lists, dicts, enums: the config class checks them itself
    if isinstance(value, bool):
        if bool in simple:
            return value
    elif isinstance(value, int) and (int in simple or float in simple):
        return value if int in simple else float(value)
    elif isinstance(value, float) and float in simple:
        return value
    elif isinstance(value, str):
        text = value.strip()
        if bool in simple and text.lower() in ("true", "false", "yes", "no", "1", "0"):
            return text.lower() in ("true", "yes", "1")
        if int in simple:
            try:
                return int(text)
            except ValueError:
                pass
        if float in simple:
            try:
                return float(text)
            except ValueError:
                pass
        if str in simple or len(simple) < len(options):
            return value
    elif len(simple) < len(options):
        return value  # e.g. a list given for a `list[str] | str` field
    wanted = " or ".join(option.__name__ for option in simple)
    raise AlignError(f"{source}: config key '{key}' must be {wanted} (got {value!r})")


def _union_members(annotation) -> tuple:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return typing.get_args(annotation)
    if origin is typing.Literal:
        return (type(typing.get_args(annotation)[0]),)
    return (origin or annotation,)


def config_to_dict(config) -> dict:
    """The config as plain YAML-able values (what a run records)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if hasattr(value, "value") and not isinstance(value, (int, float, str)):
            value = value.value  # enums
        if isinstance(value, (str, int, float, bool, type(None), list, dict)):
            out[field.name] = value
        else:
            out[field.name] = str(value)
    return out


# Fields every stage shares, and the adapter fields of the stages that train one. Stage configs are
# `@dataclass class XStageConfig(StageFields, AdapterFields, trl.XConfig)`: TRL's fields plus these.

PEFT_METHODS = ("lora", "ia3", "prompt-tuning", "none")


@dataclasses.dataclass
class StageFields:
    model: str = dataclasses.field(default="smollm2-135m", metadata={"help": "model reference to start from"})
    dataset: str | None = dataclasses.field(default=None, metadata={"help": "registry dataset, NAME or NAME@V"})
    eval_dataset: str | None = dataclasses.field(
        default=None,
        metadata={"help": "registry dataset to evaluate on; default: a seeded split of `dataset`"},
    )
    eval_split: float = dataclasses.field(
        default=0.1,
        metadata={"help": "share of `dataset` held out for evaluation when eval_dataset is not set"},
    )
    output_name: str | None = dataclasses.field(default=None, metadata={"help": "name the output is registered under"})

    def check_stage_fields(self) -> None:
        from align.registry import check_name, parse_ref

        if not self.dataset:
            raise ValueError("config key 'dataset' is required: a registry dataset, NAME or NAME@V")
        for key in ("dataset", "eval_dataset"):
            value = getattr(self, key)
            if value is not None:
                try:
                    parse_ref(value)
                except AlignError as exc:
                    raise ValueError(f"config key '{key}': {exc}") from None
        if not self.model or not isinstance(self.model, str):
            raise ValueError(f"config key 'model' must be a model reference (got {self.model!r})")
        if not 0 < self.eval_split < 1:
            raise ValueError(f"config key 'eval_split' must be between 0 and 1 (got {self.eval_split!r})")
        # bf16 mixed precision (autocast; the weights stay in torch_dtype) when unset: on where the hardware runs
        # bf16 natively (a bf16 GPU, a CPU with AMX or AVX-512 BF16), off elsewhere. TRL turns it on
        # unconditionally, which fails without a GPU; this way one recipe runs fast on a CPU and on a GPU.
        if getattr(self, "bf16", False) is None:
            from align.models import bf16_is_fast

            self.bf16 = not getattr(self, "fp16", False) and bf16_is_fast()
        if getattr(self, "bf16", False) and hasattr(self, "use_cpu"):
            import torch

            # transformers refuses bf16 without a GPU unless told the run is on the CPU
            self.use_cpu = self.use_cpu or not torch.cuda.is_available()
        if self.output_name is not None:
            try:
                check_name(self.output_name, "output")
            except AlignError as exc:
                raise ValueError(f"config key 'output_name': {exc}") from None
        self.report_to = checked_report_to(self.report_to)  # every stage config has its loggers' `report_to`
        if hasattr(self, "per_device_train_batch_size"):  # a Trainer's config
            split_global_batch(self)


def split_global_batch(config) -> None:
    """Under a launcher with N processes, keep the recipe's global batch (per_device_train_batch_size x
    gradient_accumulation_steps, as one process trains it): N processes take fewer accumulation steps when
    gradient_accumulation_steps divides by N (each device's batch stays the size the recipe chose for its memory),
    else smaller batches per device. A recipe whose batch does not split into N equal parts is refused."""
    from align.distributed import world_size

    processes = world_size()
    per_device, steps = config.per_device_train_batch_size, config.gradient_accumulation_steps
    if processes == 1:
        return
    if steps % processes == 0:
        config.gradient_accumulation_steps = steps // processes
    elif per_device % processes == 0:
        config.per_device_train_batch_size = per_device // processes
    else:
        raise ValueError(
            f"the recipe's global batch, per_device_train_batch_size {per_device} x gradient_accumulation_steps "
            f"{steps}, does not split across {processes} processes: make one of them a multiple of {processes} (or "
            f"launch a number of processes that divides one of them)"
        )


def tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def checked_report_to(report_to: None | str | list[str]) -> None | str | list[str]:
    """`report_to` as a stage uses it: the default, tensorboard, becomes none where TensorBoard is not installed,
    and a name with no logging integration is refused at parse time."""
    if report_to == "tensorboard" and not tensorboard_installed():
        return "none"
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        get_reporting_integration_callbacks(report_to)
    except ValueError as exc:
        raise ValueError(f"config key 'report_to': {exc}") from None
    return report_to


@dataclasses.dataclass
class AdapterFields:
    peft: str = dataclasses.field(
        default="lora", metadata={"help": "lora | ia3 | prompt-tuning | none (full fine-tuning)"}
    )
    lora_r: int = dataclasses.field(default=16, metadata={"help": "LoRA rank: more capacity, more memory"})
    lora_alpha: int = dataclasses.field(default=32, metadata={"help": "LoRA scaling (alpha / r)"})
    lora_dropout: float = dataclasses.field(default=0.05)
    lora_target_modules: list[str] | str = dataclasses.field(
        default="all-linear",
        metadata={"help": "'all-linear' or a list of module names (q_proj, v_proj, ...)"},
    )
    num_virtual_tokens: int = dataclasses.field(default=20, metadata={"help": "prompt tuning: soft prompt length"})
    load_in_4bit: bool = dataclasses.field(
        default=False, metadata={"help": "QLoRA: a 4-bit base model (needs CUDA and bitsandbytes)"}
    )
    torch_dtype: str = dataclasses.field(default="auto", metadata={"help": "auto | fp32 | bf16 | fp16 for the base"})

    def check_adapter_fields(self) -> None:
        if self.peft not in PEFT_METHODS:
            raise ValueError(f"config key 'peft' must be one of {', '.join(PEFT_METHODS)} (got {self.peft!r})")
        for key in ("lora_r", "lora_alpha", "num_virtual_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"config key '{key}' must be at least 1 (got {getattr(self, key)!r})")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"config key 'lora_dropout' must be in [0, 1) (got {self.lora_dropout!r})")
        self.lora_target_modules = checked_target_modules(self.lora_target_modules)
        if self.torch_dtype not in DTYPE_NAMES:
            raise ValueError(f"config key 'torch_dtype' must be auto, fp32, bf16 or fp16 (got {self.torch_dtype!r})")
        if self.load_in_4bit:
            if self.peft != "lora":
                raise ValueError("config key 'load_in_4bit' (QLoRA) needs peft: lora")
            check_qlora_available()


MODULE_NAMES = re.compile(r"[\w.,\s]+")  # q_proj or q_proj,v_proj (the command line's list): no regex
MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.\w+)*")  # q_proj, self_attn.q_proj, layers.0.mlp.down_proj


def checked_target_modules(value):
    """`lora_target_modules` as PEFT takes it: 'all-linear'; module names, matched against the end of each
    module's full name (a list, or comma-separated on the command line: q_proj,v_proj); or a regular expression
    matched against full module names (anything else that is a string). Refused here, naming the value, rather
    than minutes later when the adapter is built: a number, a name no module can have, a broken expression."""
    wanted = (
        "config key 'lora_target_modules' must be 'all-linear', module names (a list, or q_proj,v_proj on the "
        "command line) or a regular expression over full module names"
    )
    if value == "all-linear":
        return value
    if isinstance(value, str) and not MODULE_NAMES.fullmatch(value.strip()):
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{wanted} (got {value!r}, not a valid regular expression: {exc})") from None
        return value
    names = [name.strip() for name in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list) or not names:
        raise ValueError(f"{wanted} (got {value!r})")
    for name in names:
        # a module name starts with a letter; a numbered entry (layers.5) is a block of layers, not a linear layer
        if not isinstance(name, str) or not MODULE_NAME.fullmatch(name) or name.rsplit(".", 1)[-1].isdigit():
            raise ValueError(f"{wanted} (got {value!r}: {name!r} is not the name of a layer)")
    return names


def check_qlora_available() -> None:
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ValueError(
            "config key 'load_in_4bit' (QLoRA) needs a CUDA GPU, and this machine has none: "
            "set load_in_4bit: false to train a LoRA adapter on a full-precision base"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("config key 'load_in_4bit' (QLoRA) needs bitsandbytes: pip install bitsandbytes")


def peft_config_for(config: AdapterFields, task_type: str = "CAUSAL_LM"):
    """The PEFT config the `peft` field selects, or None for full fine-tuning."""
    import peft

    if config.peft == "none":
        return None
    if config.peft == "lora":
        return peft.LoraConfig(
            task_type=task_type,
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
        )
    if config.peft == "ia3":
        return peft.IA3Config(task_type=task_type)
    return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=config.num_virtual_tokens)


def quantization_config_for(config):
    """QLoRA's 4-bit NF4 base (bf16 compute, double quantization) when `load_in_4bit` is set, else None."""
    if not config.load_in_4bit:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
