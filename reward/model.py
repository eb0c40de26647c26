"""Load a reward model and score text with it.

    from reward.model import RewardModel

    rm = RewardModel.load("rm:hh-rm")                       # or a base model: an untrained head, seeded
    rm.score(prompts, completions)                          # -> list[float], one per (prompt, completion)

A prompt is a list of messages ({"role", "content"}) ending with a user turn, or a plain string. A completion
is the reply: a list of assistant messages, or a plain string (with a conversational prompt it becomes one
assistant message). The reward model renders each pair with its own chat template and tokenizer, so a policy
with another tokenizer works: what passes between them is text, never token ids.

A reward model trained with `num_layers` keeps that many of its base's layers and one trained with
`pooling: reply_mean` reads the mean of the reply's tokens (reward/features.py); both are in the artifact's
meta, so every scorer reads the artifact the way it was trained.

Long pairs are cut from the left of the prompt to the model's `max_length` (the one it was trained with), as in
training; a reply longer than that keeps its end. Batches are sorted by length, so little compute goes to pads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from align.errors import AlignError
from align.truncation import TruncationStats, encode_rows
from reward.features import POOLINGS, keep_layers, pooled_scores

DEFAULT_MAX_LENGTH = 256  # the rm stage's default, so an untrained head reads the same text as a trained model
SCORING_BATCH = 8  # sequences per forward pass: `rm eval`, `rm score` and the rm stage's own held-out evaluation


def load_scorer(ref: str, registry: Any = None, *, seed: int = 0, dtype: Any = None, device_map: Any = None):
    """(model, tokenizer, artifact or None): a 1-label sequence classifier in eval mode.

    `rm:NAME[@V]` loads a trained reward model (base + LoRA adapter + its saved score head). Any base model
    reference gives that model with a fresh score head drawn with `seed`: the exact model reward training
    starts from (LoRA's B matrices start at zero), so it is the honest "untrained" baseline.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from align.models import ModelRefError, load_model, load_tokenizer, parse_dtype, resolve_model

    artifact = None
    if ref.startswith("rm:"):
        with suppress_seqcls_warning():  # the head is missing from the base checkpoint: the adapter holds it
            model, tokenizer = load_model(ref, registry, dtype=dtype, device_map=device_map)
        artifact = (registry or _default_registry()).resolve_artifact(ref)
        if artifact.meta.get("num_layers"):
            keep_layers(model, artifact.meta["num_layers"])
    elif ref.startswith("adapter:"):
        raise AlignError(
            f"{ref} is a policy adapter, not a reward model: name a reward model (rm:NAME) or a base model "
            "(for an untrained head)"
        )
    else:
        resolved = resolve_model(ref, registry)
        tokenizer = load_tokenizer(resolved)
        kwargs = {"dtype": parse_dtype(dtype), "use_safetensors": True, "num_labels": 1}
        if device_map is not None:
            kwargs["device_map"] = device_map
        torch.manual_seed(seed)  # the new head's weights
        try:
            with suppress_seqcls_warning():
                model = AutoModelForSequenceClassification.from_pretrained(resolved.base, **kwargs)
        except OSError as e:
            raise ModelRefError(f"cannot load {resolved.describe()}: {str(e).splitlines()[0]}") from e
    # The head reads the last token that is not padding: the pad id must be the tokenizer's, as in training.
    model.config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    return model, tokenizer, artifact


def load_saved_scorer(base_ref: str, folder, registry: Any = None, *, dtype: Any = None, num_layers: int | None = None):
    """(model, tokenizer) of a reward model saved in `folder` (adapter + score head) on `base_ref`, loaded exactly
    as a registered `rm:` artifact is: what the rm stage evaluates before it registers the artifact."""
    from pathlib import Path

    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from align.models import ResolvedModel, load_model, resolve_model

    base = resolve_model(base_ref, registry)
    resolved = ResolvedModel(f"{base_ref} + {folder}", base.base, Path(folder), "rm")
    with suppress_seqcls_warning():
        model, tokenizer = load_model(resolved, registry, dtype=dtype)
    if num_layers:
        keep_layers(model, num_layers)
    return model, tokenizer


def _default_registry():
    from align.registry import Registry

    return Registry()


@dataclass
class PairScores:
    """The scores of preference rows, in row order, with the reply lengths (tokens) the metrics need."""

    chosen: list[float]
    rejected: list[float]
    chosen_lengths: list[int]
    rejected_lengths: list[int]
    tie: list[bool]
    stats: TruncationStats
    extra: dict = field(default_factory=dict)


class RewardModel:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_length: int = DEFAULT_MAX_LENGTH,
        batch_size: int = SCORING_BATCH,
        ref: str = "model",
        pooling: str = "last",
    ):
        if pooling not in POOLINGS:
            raise AlignError(f"pooling must be one of {', '.join(POOLINGS)} (got {pooling!r})")
        self.model = model
        self.pooling = pooling
        self.ref = ref
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.last_stats: TruncationStats | None = None  # truncation counts of the last score() call
        model.config.pad_token_id = tokenizer.pad_token_id

    @classmethod
    def load(
        cls,
        ref: str,
        registry: Any = None,
        *,
        max_length: int | None = None,
        batch_size: int = SCORING_BATCH,
        seed: int = 0,
        dtype: Any = None,
        device_map: Any = None,
    ) -> RewardModel:
        """A registered reward model (`rm:NAME[@V]`) or a base model with an untrained head (see load_scorer)."""
        model, tokenizer, artifact = load_scorer(ref, registry, seed=seed, dtype=dtype, device_map=device_map)
        trained_length = artifact.meta.get("max_length") if artifact is not None else None
        return cls(
            model,
            tokenizer,
            max_length=max_length or trained_length or DEFAULT_MAX_LENGTH,
            batch_size=batch_size,
            ref=artifact.ref if artifact is not None else ref,
            pooling=artifact.meta.get("pooling", "last") if artifact is not None else "last",
        )

    def score(
        self,
        prompts: Sequence[list[dict] | str],
        completions: Sequence[list[dict] | str],
        *,
        progress: bool = False,
    ) -> list[float]:
        """One reward per (prompt, completion), in order."""
        if len(prompts) != len(completions):
            raise AlignError(f"score() got {len(prompts)} prompts but {len(completions)} completions")
        rows = [{"prompt": p, "reply": c} for p, c in zip(prompts, completions)]
        encoded, self.last_stats = encode_rows(
            self.tokenizer, rows, self.max_length, reply_fields=("reply",), overflow="cut"
        )
        starts = [len(item.prompt_ids) for item in encoded]
        return self.score_ids([item.sequence(0) for item in encoded], progress=progress, reply_starts=starts)

    def score_pairs(self, rows: Sequence[dict], *, progress: bool = False) -> PairScores:
        """Scores of preference rows' chosen and rejected replies; the pair shares its (cut) prompt."""
        encoded, stats = encode_rows(self.tokenizer, rows, self.max_length, overflow="cut", progress=progress)
        sequences = [item.sequence(0) for item in encoded] + [item.sequence(1) for item in encoded]
        starts = [len(item.prompt_ids) for item in encoded] * 2
        scores = self.score_ids(sequences, progress=progress, reply_starts=starts)
        n = len(rows)
        return PairScores(
            chosen=scores[:n],
            rejected=scores[n:],
            chosen_lengths=[len(item.reply_ids[0]) for item in encoded],
            rejected_lengths=[len(item.reply_ids[1]) for item in encoded],
            tie=[bool(row.get("tie")) for row in rows],
            stats=stats,
        )

    def evaluate(self, rows: Sequence[dict], *, progress: bool = False) -> tuple[dict, PairScores]:
        """Accuracy, margin, calibration and length bias on preference rows (see reward.metrics)."""
        from reward.metrics import pair_metrics

        scores = self.score_pairs(rows, progress=progress)
        metrics = pair_metrics(
            scores.chosen, scores.rejected, scores.chosen_lengths, scores.rejected_lengths, scores.tie
        )
        metrics["truncation"] = scores.stats.summary()
        return metrics, scores

    def score_ids(
        self, sequences: Sequence[list[int]], *, progress: bool = False, reply_starts: Sequence[int] | None = None
    ) -> list[float]:
        """Scores of token-id sequences (this model's tokenizer), batched longest first, returned in order.
        `reply_starts`: where each sequence's reply begins, which reply_mean pooling needs."""
        import torch
        from tqdm.auto import tqdm

        if self.pooling == "reply_mean" and reply_starts is None:
            raise AlignError(f"{self.ref} reads the mean of the reply's tokens: score_ids needs reply_starts")
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
        scores = [0.0] * len(sequences)
        pad = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        try:
            with torch.inference_mode():
                for batch in tqdm(batches, desc="scoring", unit="batch", disable=not progress):
                    width = len(sequences[batch[0]])
                    input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
                    for row, index in enumerate(batch):
                        ids = sequences[index]
                        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                        attention_mask[row, : len(ids)] = 1
                    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                    if self.pooling == "reply_mean":
                        starts = torch.tensor([reply_starts[index] for index in batch], dtype=torch.long)
                        batch_scores = pooled_scores(self.model, input_ids, attention_mask, starts)
                    else:
                        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
                        batch_scores = logits[:, 0]
                    for row, index in enumerate(batch):
                        scores[index] = float(batch_scores[row])
        finally:
            self.model.train(was_training)
        return scores
