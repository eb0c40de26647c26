"""Load a reward model and score text with it.

    from reward.model import RewardModel

    rm = RewardModel.load("rm:hh-rm")                       # or a base model: an untrained head, seeded
    rm.score(prompts, completions)                          # -> list[float], one per (prompt, completion)
    rm.score_heads(prompts, completions)                    # -> {head: list[float]}: preference + attributes
    rm.score(prompts, completions, weights={"helpfulness": 1.0, "harmlessness": 2.0})   # their weighted sum

A prompt is a list of messages ({"role", "content"}) ending with a user turn, or a plain string. A completion
is the reply: a list of assistant messages, or a plain string (with a conversational prompt it becomes one
assistant message). The reward model renders each pair with its own chat template and tokenizer, so a policy
with another tokenizer works: what passes between them is text, never token ids.

A reward model trained with `num_layers` keeps that many of its base's layers and one trained with
`pooling: reply_mean` reads the mean of the reply's tokens (reward/features.py); both are in the artifact's
meta, so every scorer reads the artifact the way it was trained. So are the `objectives` of a multi-objective
reward model (reward/objectives.py): its score head has one output per head, the preference head first.

Long pairs are cut from the left of the prompt to the model's `max_length` (the one it was trained with), as in
training; a reply longer than that keeps its end. Batches are sorted by length, so little compute goes to pads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from align.errors import AlignError
from align.truncation import TruncationStats, encode_rows
from reward.features import POOLINGS, keep_layers, pooled_scores
from reward.objectives import PREFERENCE, check_reward_weights, head_names, weighted_sum

DEFAULT_MAX_LENGTH = 256  # the rm stage's default, so an untrained head reads the same text as a trained model
SCORING_BATCH = 8  # sequences per forward pass: `rm eval`, `rm score` and the rm stage's own held-out evaluation


def load_scorer(
    ref: str,
    registry: Any = None,
    *,
    seed: int = 0,
    dtype: Any = None,
    device_map: Any = None,
    objectives: tuple[str, ...] | list[str] = (),
):
    """(model, tokenizer, artifact or None): a sequence classifier in eval mode, one output per head.

    `rm:NAME[@V]` loads a trained reward model (base + LoRA adapter + its saved score head, with the heads its
    meta names). Any base model reference gives that model with a fresh score head drawn with `seed` (one output,
    plus one per attribute of `objectives`): the exact model reward training starts from (LoRA's B matrices start
    at zero), so it is the honest "untrained" baseline.
    """
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from align.models import ModelRefError, load_model, load_tokenizer, parse_dtype, resolve_model

    artifact = None
    if ref.startswith("rm:"):
        artifact = (registry or _default_registry()).resolve_artifact(ref)
        heads = head_names(artifact.meta.get("objectives"))
        with suppress_seqcls_warning():  # the head is missing from the base checkpoint: the adapter holds it
            model, tokenizer = load_model(ref, registry, dtype=dtype, device_map=device_map, num_labels=len(heads))
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
        heads = head_names(objectives)
        kwargs = {"dtype": parse_dtype(dtype), "use_safetensors": True, "num_labels": len(heads)}
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
    name_heads(model, heads)
    model.eval()
    return model, tokenizer, artifact


def name_heads(model, heads: tuple[str, ...]) -> None:
    """The classifier's labels are the heads' names (its config's id2label), in output order."""
    model.config.id2label = dict(enumerate(heads))
    model.config.label2id = {name: index for index, name in enumerate(heads)}


def load_saved_scorer(
    base_ref: str,
    folder,
    registry: Any = None,
    *,
    dtype: Any = None,
    num_layers: int | None = None,
    objectives: tuple[str, ...] | list[str] = (),
):
    """(model, tokenizer) of a reward model saved in `folder` (adapter + score head) on `base_ref`, loaded exactly
    as a registered `rm:` artifact is: what the rm stage evaluates before it registers the artifact."""
    from pathlib import Path

    from trl.trainer.reward_trainer import suppress_seqcls_warning

    from align.models import ResolvedModel, load_model, resolve_model

    base = resolve_model(base_ref, registry)
    resolved = ResolvedModel(f"{base_ref} + {folder}", base.base, Path(folder), "rm")
    heads = head_names(objectives)
    with suppress_seqcls_warning():
        model, tokenizer = load_model(resolved, registry, dtype=dtype, num_labels=len(heads))
    if num_layers:
        keep_layers(model, num_layers)
    name_heads(model, heads)
    return model, tokenizer


def _default_registry():
    from align.registry import Registry

    return Registry()


@dataclass
class PairScores:
    """The scores of preference rows, in row order, with the reply lengths (tokens) the metrics need: the
    preference head's in `chosen` and `rejected`, each attribute head's in `attributes` (name -> (chosen,
    rejected))."""

    chosen: list[float]
    rejected: list[float]
    chosen_lengths: list[int]
    rejected_lengths: list[int]
    tie: list[bool]
    stats: TruncationStats
    extra: dict = field(default_factory=dict)
    attributes: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)


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
        objectives: tuple[str, ...] | list[str] = (),
    ):
        if pooling not in POOLINGS:
            raise AlignError(f"pooling must be one of {', '.join(POOLINGS)} (got {pooling!r})")
        self.model = model
        self.heads = head_names(objectives)  # output order: the preference head, then one per attribute
        self.objectives = self.heads[1:]
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
            objectives=(artifact.meta.get("objectives") or ()) if artifact is not None else (),
        )

    def score(
        self,
        prompts: Sequence[list[dict] | str],
        completions: Sequence[list[dict] | str],
        *,
        progress: bool = False,
        weights: Mapping[str, float] | None = None,
    ) -> list[float]:
        """One reward per (prompt, completion), in order: the preference head's score, or with `weights` (head ->
        weight) the weighted sum of the heads named (reward/objectives.py)."""
        if weights is not None:
            check_reward_weights(weights, self.heads, self.ref)
            return weighted_sum(self.score_heads(prompts, completions, progress=progress), weights)
        return self.score_heads(prompts, completions, progress=progress)[PREFERENCE]

    def score_heads(
        self, prompts: Sequence[list[dict] | str], completions: Sequence[list[dict] | str], *, progress: bool = False
    ) -> dict[str, list[float]]:
        """Every head's score per (prompt, completion): {head: scores}, the preference head first."""
        if len(prompts) != len(completions):
            raise AlignError(f"score() got {len(prompts)} prompts but {len(completions)} completions")
        rows = [{"prompt": p, "reply": c} for p, c in zip(prompts, completions)]
        encoded, self.last_stats = encode_rows(
            self.tokenizer, rows, self.max_length, reply_fields=("reply",), overflow="cut"
        )
        starts = [len(item.prompt_ids) for item in encoded]
        found = self.head_scores_ids([item.sequence(0) for item in encoded], progress=progress, reply_starts=starts)
        return {name: [scores[index] for scores in found] for index, name in enumerate(self.heads)}

    def score_pairs(self, rows: Sequence[dict], *, progress: bool = False) -> PairScores:
        """Scores of preference rows' chosen and rejected replies; the pair shares its (cut) prompt."""
        encoded, stats = encode_rows(self.tokenizer, rows, self.max_length, overflow="cut", progress=progress)
        sequences = [item.sequence(0) for item in encoded] + [item.sequence(1) for item in encoded]
        starts = [len(item.prompt_ids) for item in encoded] * 2
        found = self.head_scores_ids(sequences, progress=progress, reply_starts=starts)
        n = len(rows)
        head = [[scores[index] for scores in found] for index in range(len(self.heads))]
        return PairScores(
            chosen=head[0][:n],
            rejected=head[0][n:],
            chosen_lengths=[len(item.reply_ids[0]) for item in encoded],
            rejected_lengths=[len(item.reply_ids[1]) for item in encoded],
            tie=[bool(row.get("tie")) for row in rows],
            stats=stats,
            attributes={name: (head[i][:n], head[i][n:]) for i, name in enumerate(self.heads) if i},
        )

    def evaluate(self, rows: Sequence[dict], *, progress: bool = False) -> tuple[dict, PairScores]:
        """Accuracy, margin, calibration and length bias on preference rows (see reward.metrics); with attribute
        heads, each head's accuracy on the pairs whose rubric scores differ (under "heads")."""
        from reward.metrics import head_metrics, pair_metrics

        scores = self.score_pairs(rows, progress=progress)
        metrics = pair_metrics(
            scores.chosen, scores.rejected, scores.chosen_lengths, scores.rejected_lengths, scores.tie
        )
        metrics["truncation"] = scores.stats.summary()
        if self.objectives:
            metrics |= head_metrics(rows, scores, self.objectives)
        return metrics, scores

    def score_ids(
        self, sequences: Sequence[list[int]], *, progress: bool = False, reply_starts: Sequence[int] | None = None
    ) -> list[float]:
        """The preference head's scores of token-id sequences (see head_scores_ids)."""
        return [scores[0] for scores in self.head_scores_ids(sequences, progress=progress, reply_starts=reply_starts)]

    def head_scores_ids(
        self, sequences: Sequence[list[int]], *, progress: bool = False, reply_starts: Sequence[int] | None = None
    ) -> list[list[float]]:
        """Every head's score of token-id sequences (this model's tokenizer), batched longest first, returned in
        order. `reply_starts`: where each sequence's reply begins, which reply_mean pooling needs."""
        import torch
        from tqdm.auto import tqdm

        if self.pooling == "reply_mean" and reply_starts is None:
            raise AlignError(f"{self.ref} reads the mean of the reply's tokens: score_ids needs reply_starts")
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
        scores: list[list[float]] = [[] for _ in sequences]
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
                        batch_scores = self.model(
                            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
                        ).logits
                    batch_scores = batch_scores.reshape(len(batch), -1).float()
                    if batch_scores.shape[1] != len(self.heads):
                        raise AlignError(
                            f"{self.ref} gives {batch_scores.shape[1]} scores per reply, but its heads are "
                            f"{', '.join(self.heads)}: its artifact's meta and its score head disagree"
                        )
                    for row, index in enumerate(batch):
                        scores[index] = batch_scores[row].tolist()
        finally:
            self.model.train(was_training)
        return scores
