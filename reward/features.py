"""Cached frozen-layer features: run the frozen lower layers once, then train only the top ones, epoch after epoch.

With LoRA on the top N layers of a reward model (`lora_top_layers: N`), the layers below are frozen: every epoch
they compute the same hidden states again. Here they run once per pair; the states entering the first trainable
layer are kept in memory, and each training step runs only the top layers (plus the final norm and the score
head) on them. The arithmetic is the same as a full forward pass (causal attention: a token's state never
depends on padding), so the trained adapter is an ordinary one, saved and scored by the whole model as usual.

    states = frozen_states(model, sequences, cut=20)        # list of [length, hidden] tensors, one per sequence
    with top_layers_only(model, cut=20):                     # the model now holds layers 20.. only
        scores = score_states(model, batch_states, attention_mask)

Two more choices about what the score head reads, used by the rm stage and by every scorer of its artifacts:

    keep_layers(model, 24)                    # the decoder keeps its bottom 24 layers: the head reads layer 24
    pooled_scores(model, input_ids, attention_mask, reply_starts)   # the head on the mean of the reply's states

A trainer calls both through `model(...)` (`add_feature_scoring`), so that DDP's wrapper sees the forward pass.

The model is a sequence classifier (`AutoModelForSequenceClassification`, optionally wrapped by PEFT) whose
decoder stack has `layers` and a final `norm`, as Llama-style models do (SmolLM2, Llama, Mistral, Qwen2).
This module knows nothing of the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch

from align.errors import AlignError


def classifier(model):
    """The transformers sequence classifier inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_stack(model, *, uniform: bool = True):
    """The decoder stack (e.g. LlamaModel): the module holding `layers` and the final `norm`. `uniform`: refuse
    a stack that mixes attention types (cached states assume every layer sees the same mask)."""
    stack = classifier(model).base_model
    if not isinstance(getattr(stack, "layers", None), torch.nn.ModuleList) or not hasattr(stack, "norm"):
        raise AlignError(
            f"cached frozen-layer features, num_layers and reply_mean pooling need a decoder with `layers` and a "
            f"final `norm` ({type(stack).__name__} has not)"
        )
    layer_types = getattr(stack.config, "layer_types", None)
    if uniform and layer_types and len(set(layer_types)) > 1:
        raise AlignError(
            f"{type(stack).__name__} mixes attention types across layers ({sorted(set(layer_types))}); "
            "cached frozen-layer features support uniform layers only: set cache_frozen_layers: false"
        )
    return stack


@contextmanager
def _layers(stack, layers, norm):
    saved_layers, saved_norm = stack.layers, stack.norm
    stack.layers, stack.norm = layers, norm
    try:
        yield stack
    finally:
        stack.layers, stack.norm = saved_layers, saved_norm


@contextmanager
def top_layers_only(model, cut: int):
    """Within the block, the decoder holds its layers from `cut` up (the same module objects, LoRA included)."""
    stack = decoder_stack(model)
    with _layers(stack, torch.nn.ModuleList(list(stack.layers)[cut:]), stack.norm):
        yield model


def frozen_states(
    model, sequences: Sequence[list[int]], cut: int, *, pad_token_id: int, batch_size: int = 8, progress=None
) -> list[torch.Tensor]:
    """The hidden states entering layer `cut`, one [length, hidden] fp32 tensor per token-id sequence, in order.

    Sequences run longest first in right-padded batches; `progress` is an optional callable(done, total).
    """
    stack = decoder_stack(model)
    if not 0 < cut < len(stack.layers):
        raise AlignError(f"the cut must fall inside the model's {len(stack.layers)} layers (got {cut})")
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]), reverse=True)
    states: list[torch.Tensor | None] = [None] * len(sequences)
    with _layers(stack, torch.nn.ModuleList(list(stack.layers)[:cut]), torch.nn.Identity()), torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = _right_padded([sequences[i] for i in batch], pad_token_id)
            hidden = stack(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
            for row, index in enumerate(batch):
                states[index] = hidden.last_hidden_state[row, : len(sequences[index])].float().cpu().clone()
            if progress is not None:
                progress(min(start + batch_size, len(order)), len(order))
    return states


def score_states(
    model, states: torch.Tensor, attention_mask: torch.Tensor, reply_starts: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores of right-padded cached states [batch, width, hidden]: the top layers, the norm, the head on the
    last real token (or, given `reply_starts`, on the mean of the reply's tokens). Call it inside
    `top_layers_only(model, cut)`."""
    stack = decoder_stack(model)
    hidden = stack(inputs_embeds=states, attention_mask=attention_mask, use_cache=False).last_hidden_state
    if reply_starts is not None:
        return classifier(model).score(reply_mean(hidden, attention_mask, reply_starts)).squeeze(-1)
    last = attention_mask.sum(dim=1) - 1
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return classifier(model).score(pooled).squeeze(-1)


# What the head reads


POOLINGS = ("last", "reply_mean")


def reply_mean(hidden: torch.Tensor, attention_mask: torch.Tensor, reply_starts: torch.Tensor) -> torch.Tensor:
    """The mean of each row's states from its reply's first token to its last real one: [batch, hidden].

    A causal model's prompt states are the same for every reply to a prompt, so only the reply tells two replies
    apart; averaging its tokens reads all of it instead of the last token only."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    mask = (positions[None, :] >= reply_starts[:, None].to(hidden.device)) & attention_mask.bool()
    mask = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def pooled_scores(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, reply_starts: torch.Tensor
) -> torch.Tensor:
    """Scores [batch] of right-padded token ids with the head on the mean of each reply's final states."""
    stack = decoder_stack(model, uniform=False)
    hidden = stack(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    head = classifier(model).score
    return head(reply_mean(hidden, attention_mask, reply_starts).to(head.weight.dtype)).squeeze(-1)


def add_feature_scoring(model) -> None:
    """Let `model(...)` return the scores of `pooled_scores` and `score_states`, so a trainer's forward pass goes
    through the model it was given, wrappers included:

        model(input_ids=..., attention_mask=..., reply_start=...)                        # reply_mean pooling
        model(inputs_embeds=STATES, attention_mask=..., cached_states=True[, reply_start=...])   # cached states

    Both return scores [batch]. Under DistributedDataParallel a forward pass that reaches the decoder around the
    wrapper leaves the gradients unsynchronised: each process would train its own copy. PEFT passes the keywords
    through to the classifier, which `model` is or wraps."""
    import types

    scorer = classifier(model)
    if getattr(scorer, "_align_feature_scoring", False):
        return
    original_forward = scorer.forward

    def forward(self, *args, reply_start=None, cached_states=False, **kwargs):
        if cached_states:
            return score_states(self, kwargs["inputs_embeds"], kwargs["attention_mask"], reply_start)
        if reply_start is not None:
            return pooled_scores(self, kwargs["input_ids"], kwargs["attention_mask"], reply_start)
        return original_forward(*args, **kwargs)

    scorer.forward = types.MethodType(forward, scorer)
    scorer._align_feature_scoring = True


def keep_layers(model, count: int):
    """Keep the decoder's bottom `count` layers (the final norm stays): the score head then reads layer `count`'s
    states. Middle layers often carry more of what separates two replies than the last one, which is tuned to
    predict the next token, and a shorter stack costs less. Returns the model, changed in place."""
    stack = decoder_stack(model, uniform=False)
    total = len(stack.layers)
    if not 0 < count <= total:
        raise AlignError(f"config key 'num_layers' must be between 1 and the model's {total} layers (got {count})")
    if count < total:
        stack.layers = torch.nn.ModuleList(list(stack.layers)[:count])
        for config in {id(c): c for c in (stack.config, classifier(model).config)}.values():
            config.num_hidden_layers = count
            if getattr(config, "layer_types", None):
                config.layer_types = config.layer_types[:count]
    return model


def pad_states(states: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad [length, hidden] tensors into ([batch, width, hidden], attention_mask [batch, width])."""
    width = max(len(s) for s in states)
    batch = torch.zeros(len(states), width, states[0].shape[-1], dtype=states[0].dtype)
    attention_mask = torch.zeros(len(states), width, dtype=torch.long)
    for row, s in enumerate(states):
        batch[row, : len(s)] = s
        attention_mask[row, : len(s)] = 1
    return batch, attention_mask


def _right_padded(sequences: Sequence[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask
