"""Sampling replies from a model, in batches, in a way a killed run can pick up: what `align generate` and
`align eval` share. Nothing here knows of the registry.

    settings = SamplingSettings(max_new_tokens=64, seed=0)
    journal = ReplyJournal(run_dir / "replies.jsonl")          # what a killed run had already made
    replies = sample(model, tokenizer, prompts, 2, settings,
                     done=journal.saved("adapter:sft@1"), on_batch=lambda made: journal.append("adapter:sft@1", made))

Prompts are sorted by length so a batch pads little, and each batch draws from its own seed (the run's seed and
the batch's number), so what a batch samples does not depend on the batches before it: a run that skips the
batches a killed run saved samples the rest exactly as an uninterrupted run does.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from align.errors import AlignError
from align.models import DTYPE_NAMES


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


def batch_seed(seed: int, batch: int) -> int:
    """The seed batch number `batch` samples with: from both numbers, so no two (seed, batch) pairs share one."""
    import numpy as np

    return int(np.random.SeedSequence([seed, batch]).generate_state(1)[0])


def sample(
    model,
    tokenizer,
    prompts: list[list[dict]],
    n: int,
    settings: SamplingSettings,
    progress=None,
    *,
    done: dict[int, list[str]] | None = None,
    on_batch: Callable[[dict[int, list[str]]], None] | None = None,
) -> list[list[str]]:
    """N sampled replies per prompt (a list of messages), in prompt order. Deterministic for a given seed.

    `done` holds replies made before ({prompt index: replies}, from a killed run's journal): a batch whose prompts
    all have theirs is not sampled again. `on_batch` receives each batch sampled ({prompt index: replies}) as soon
    as it is made, to save it."""
    import torch

    done = done or {}
    tokenizer.padding_side = "left"  # generation continues from the right edge
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    replies: list[list[str]] = [done.get(i, []) for i in range(len(texts))]
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p}
    if settings.temperature == 0:
        sampling = {"do_sample": False}
    for number, start in enumerate(range(0, len(order), settings.batch_size)):
        batch = order[start : start + settings.batch_size]
        if all(index in done for index in batch):
            if progress is not None:
                progress.update(len(batch))
            continue
        encoded = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        encoded = encoded.to(model.device)
        began = time.perf_counter()
        torch.manual_seed(batch_seed(settings.seed, number))
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
        made = {
            index: [text.strip() for text in decoded[position * n : (position + 1) * n]]
            for position, index in enumerate(batch)
        }
        for index, texts_made in made.items():
            replies[index] = texts_made
        if on_batch is not None:
            on_batch(made)
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


class ReplyJournal:
    """Replies saved as they are made, so a killed run loses at most the batch it was sampling.

    An append-only JSONL file, one line per batch: {"source": KEY, "replies": {prompt index: [reply, ...]}}, KEY
    naming who wrote them (a model reference, an eval row). Each line is written with one call and flushed to disk
    before sampling goes on. Opening the journal again drops a last line that a kill cut short."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._saved: dict[str, dict[int, list[str]]] = {}
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if whole != data:  # a line cut short by a kill: drop it, so the next line starts on a line of its own
            with open(self.path, "r+b") as out:
                out.truncate(len(whole))
        for number, line in enumerate(whole.decode("utf-8").splitlines(), start=1):
            try:
                entry = json.loads(line)
                replies = {int(index): list(texts) for index, texts in entry["replies"].items()}
                source = str(entry["source"])
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise AlignError(f"{self.path}, line {number}: not a journal line ({exc}); move the file away") from exc
            self._saved.setdefault(source, {}).update(replies)

    def saved(self, source: str) -> dict[int, list[str]]:
        """{prompt index: replies} that `source` already made."""
        return dict(self._saved.get(source, {}))

    def append(self, source: str, replies: dict[int, list[str]]) -> None:
        line = json.dumps({"source": source, "replies": {str(i): r for i, r in replies.items()}}, ensure_ascii=False)
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        self._saved.setdefault(source, {}).update(replies)
