"""Candidate generation: every model writes N completions per prompt, for people to compare.

    align generate --models adapter:sft,smollm2-135m --prompts seed-prompts --n 2 --name seed-cands

Sampling is batched with the KV cache, prompts sorted by length so a batch pads little. Under `--seed` the
output is the same every time. The result is a `candidates` version whose rows name the source of each
completion and the sampling settings, with lineage to the prompts and the models.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace

from align.errors import AlignError
from align.models import DTYPE_NAMES, load_model, resolve_model
from align.registry import Registry
from align.registry.registry import ARTIFACT_KINDS


@dataclass
class SamplingSettings:
    max_new_tokens: int = 128
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    batch_size: int = 8
    # The weights' dtype while generating. None: bf16 where bf16 is native on a CPU (AMX or AVX-512 BF16), where
    # decoding, bound by reading every weight for every token, runs ~1.6x faster; fp32 on other CPUs; the
    # checkpoint's own dtype on a GPU. Runs record the dtype they used.
    dtype: str | None = None

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise AlignError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise AlignError(f"--temperature must be 0 (greedy) or more (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise AlignError(f"--top-p must be in (0, 1] (got {self.top_p})")
        if self.batch_size < 1:
            raise AlignError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.dtype not in (None, *DTYPE_NAMES):
            raise AlignError(f"--dtype must be one of {', '.join(DTYPE_NAMES)} (got {self.dtype!r})")

    def resolved(self) -> SamplingSettings:
        """These settings with the dtype this machine will use, as runs record it."""
        from align.models import bf16_is_fast

        if self.dtype is not None:
            return self
        import torch

        dtype = "auto" if torch.cuda.is_available() else "bf16" if bf16_is_fast() else "fp32"
        return replace(self, dtype=dtype)


def sample(
    model, tokenizer, prompts: list[list[dict]], n: int, settings: SamplingSettings, progress=None
) -> list[list[str]]:
    """N sampled replies per prompt (a list of messages), in prompt order. Deterministic for a given seed."""
    import torch

    tokenizer.padding_side = "left"  # generation continues from the right edge
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    replies: list[list[str]] = [[] for _ in texts]
    torch.manual_seed(settings.seed)
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    if settings.temperature == 0:
        sampling = {"do_sample": False}
    for start in range(0, len(order), settings.batch_size):
        batch = order[start : start + settings.batch_size]
        encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = encoded.to(model.device)
        began = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=settings.max_new_tokens,
                num_return_sequences=n,
                use_cache=True,
                pad_token_id=tokenizer.pad_token_id,
                **sampling,
            )
        new_tokens = output[:, encoded["input_ids"].shape[1] :]
        decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for position, index in enumerate(batch):
            replies[index] = [text.strip() for text in decoded[position * n : (position + 1) * n]]
        if progress is not None:
            produced = int((new_tokens != tokenizer.pad_token_id).sum())
            progress.update(len(batch))
            progress.set_postfix(tok_s=f"{produced / max(time.perf_counter() - began, 1e-6):.1f}")
    return replies


def merged_for_inference(model):
    """Fold a LoRA/IA3 adapter into its (freshly loaded) base: the same outputs, without the adapter's
    extra matmuls on every decoding step. Prompt-tuning adapters cannot be merged and stay as they are."""
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is not None and not peft_config.is_prompt_learning:
        return model.merge_and_unload()
    return model


def generate_candidates(
    registry: Registry,
    models: list[str],
    prompts_ref: str,
    *,
    n: int,
    name: str,
    limit: int | None = None,
    settings: SamplingSettings | None = None,
):
    """Generate, then register a `candidates` version. Returns it."""
    from tqdm.auto import tqdm

    settings = (settings or SamplingSettings()).resolved()
    if not models:
        raise AlignError("give at least one model: --models REF1[,REF2,...]")
    if n < 1:
        raise AlignError(f"--n must be at least 1 (got {n})")
    if n * len(models) < 2:
        raise AlignError("candidates need at least two completions per prompt: raise --n or add a model to --models")
    if len(set(models)) != len(models):
        raise AlignError(f"a model is listed twice in --models: {', '.join(models)}")
    prompts_version = registry.resolve(prompts_ref, kind="prompts")
    for ref in models:
        resolve_model(ref, registry)  # fail before any generation
    # Pin registry artifacts to their version, so each completion names exactly the model that wrote it.
    models = [registry.resolve_artifact(ref).ref if ref.split(":", 1)[0] in ARTIFACT_KINDS else ref for ref in models]
    prompts = [row["prompt"] for row in registry.rows(prompts_version)]
    if limit is not None:
        if limit < 1:
            raise AlignError(f"--limit must be at least 1 (got {limit})")
        prompts = prompts[:limit]

    run = registry.start_run(
        "generate",
        config={"models": models, "prompts": prompts_version.ref, "n": n, "limit": limit, **asdict(settings)},
        inputs=[prompts_version.ref, *models],
        seed=settings.seed,
    )
    try:
        per_model = []
        with tqdm(total=len(prompts) * len(models), unit="prompt", desc="generating") as progress:
            for ref in models:
                progress.set_description(f"generating with {ref}")
                model, tokenizer = load_model(ref, registry, dtype=settings.dtype)
                model = merged_for_inference(model)
                per_model.append(sample(model, tokenizer, prompts, n, settings, progress))
                del model
        generation = json.dumps({"n": n, **asdict(settings)}, sort_keys=True)
        rows = []
        for index, prompt in enumerate(prompts):
            completions, sources = [], []
            for ref, replies in zip(models, per_model):
                for reply in replies[index]:
                    completions.append([{"role": "assistant", "content": reply}])
                    sources.append(ref)
            rows.append({"prompt": prompt, "completions": completions, "sources": sources, "generation": generation})
        parents = [(prompts_version, "prompts")]
        for ref in models:
            parents.append((ref if ":" in ref else f"base:{ref}", "model"))
        version = registry.register(
            rows,
            name=name,
            kind="candidates",
            parents=parents,
            run=run,
            meta={"models": models, "n": n, **asdict(settings)},
        )
        registry.finish_run(
            run,
            outputs=[version.ref],
            metrics={"prompts": len(prompts), "completions": len(prompts) * n * len(models)},
        )
        return version
    except BaseException as exc:
        registry.finish_run(run, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
