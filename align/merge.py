"""Merge a LoRA adapter into its base: full safetensors weights that plain transformers loads.

    align merge adapter:dpo --out merged/dpo
    align merge adapter:sft@2 --out merged/sft --dtype bf16 --name sft-merged

The merged folder (config, safetensors weights, tokenizer, generation config) loads with
`AutoModelForCausalLM.from_pretrained(DIR)` and is registered as `model:NAME-merged@V` (kind "model") with lineage
to the adapter. The adapter folder is only read: it stays loadable with `PeftModel.from_pretrained`. Before the
merged weights are written, the merged model's logits are checked against the adapter model's on a probe text.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from align.errors import AlignError
from align.models import load_model, parse_dtype, resolve_model
from align.registry import Registry

# Largest |logit difference| accepted between the adapter model and the merged one (fp32), relative to the largest
# |logit|: summation order alone moves SmolLM2's logits (up to ~30) by ~1e-4, a wrong merge moves them by ~1.
TOLERANCE = 1e-5
PROBE = [{"role": "user", "content": "Name three colours and say why the sky is blue."}]


def merge_adapter(
    registry: Registry,
    ref: str,
    out: str | os.PathLike,
    *,
    name: str | None = None,
    dtype: str = "auto",
    register: bool = True,
):
    """Write the merged model to `out` and register it. Returns (folder, artifact or None, max logit difference)."""
    import json

    import torch

    if not ref.startswith("adapter:"):
        raise AlignError(f"align merge takes an adapter reference (adapter:NAME[@V]), not {ref!r}")
    adapter = registry.resolve_artifact(ref)
    resolved = resolve_model(adapter.ref, registry)
    config = json.loads((resolved.adapter_path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise AlignError(f"{adapter.ref} is a {config.get('peft_type')} adapter; only LoRA adapters merge into weights")
    out = Path(out).expanduser().resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise AlignError(f"--out {out} already exists and is not an empty folder: choose a new folder")
    name = name or f"{adapter.name}-merged"
    save_dtype = _save_dtype(resolved.base, dtype)

    # Merge in fp32 whatever the base's dtype, so the check below measures the merge, not rounding.
    model, tokenizer = load_model(resolved, dtype="fp32")
    probe = tokenizer.apply_chat_template(PROBE, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        adapter_logits = model(**probe).logits
        merged = model.merge_and_unload()
        difference = (merged(**probe).logits - adapter_logits).abs().max().item()
    allowed = TOLERANCE * max(1.0, adapter_logits.abs().max().item())
    if not difference <= allowed:
        raise AlignError(
            f"merging {adapter.ref} changed the logits by {difference:.2e} (more than {allowed:.1e}): a bug"
        )

    # Write into a private folder next to `out`, then rename: a reader never sees half a model.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.to(save_dtype).save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    artifact = None
    if register:
        artifact = registry.register_artifact(
            "model",
            name,
            out,
            base_model=adapter.base_model,
            parents=[(adapter, "merged-from")],
            meta={
                "merged_from": adapter.ref,
                "dtype": str(save_dtype).replace("torch.", ""),
                "max_logit_diff": difference,
            },
        )
    return out, artifact, difference


def _save_dtype(base: str, dtype: str):
    """--dtype, or with auto the dtype the base checkpoint was saved in (fp32 when it does not say)."""
    import torch
    from transformers import AutoConfig

    if dtype != "auto":
        return parse_dtype(dtype)
    saved = getattr(AutoConfig.from_pretrained(base), "dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) else torch.float32
