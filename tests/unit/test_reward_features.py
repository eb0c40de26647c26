"""Cached frozen-layer features give the same scores and gradients as the whole model (tiny Llama, fp32)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from align.errors import AlignError
from reward.features import (
    _right_padded,
    frozen_states,
    keep_layers,
    pad_states,
    pooled_scores,
    reply_mean,
    score_states,
    top_layers_only,
)

CUT = 2


def tiny_rm(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=0,
    )
    model = LlamaForSequenceClassification(config)
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        layers_to_transform=[2, 3],
        layers_pattern="layers",
        modules_to_save=["score"],
        init_lora_weights=False,  # random B: the adapter already changes the scores
    )
    return get_peft_model(model, lora).eval()


SEQUENCES = [[5, 9, 3, 7, 1, 2], [4, 4, 8], [9, 1, 12, 30, 31, 7, 7, 2, 5], [3]]


def full_scores(model):
    scores = []
    for ids in SEQUENCES:  # one at a time: no padding at all
        scores.append(model(input_ids=torch.tensor([ids])).logits[0, 0])
    return torch.stack(scores)


def test_cached_scores_equal_the_whole_model():
    model = tiny_rm()
    expected = full_scores(model).detach()
    states = frozen_states(model, SEQUENCES, CUT, pad_token_id=0, batch_size=3)
    assert [tuple(s.shape) for s in states] == [(len(ids), 32) for ids in SEQUENCES]
    batch, mask = pad_states(states)
    with top_layers_only(model, CUT), torch.no_grad():
        cached = score_states(model, batch, mask)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
    # the decoder holds all its layers again afterwards
    assert len(model.get_base_model().model.layers) == 4


def test_cached_gradients_equal_the_whole_model():
    model = tiny_rm()
    model.train()
    full_scores(model).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    states = frozen_states(model, SEQUENCES, CUT, pad_token_id=0)
    batch, mask = pad_states(states)
    with top_layers_only(model, CUT):
        score_states(model, batch, mask).sum().backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert expected.keys() == got.keys() and len(got) > 2
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_the_cut_must_fall_inside_the_model():
    with pytest.raises(AlignError, match="inside the model's 4 layers"):
        frozen_states(tiny_rm(), SEQUENCES, 4, pad_token_id=0)


def test_reply_mean_averages_the_reply_tokens_only():
    hidden = torch.tensor(
        [[[1.0, 0.0], [2.0, 2.0], [4.0, 6.0], [8.0, 10.0]], [[1.0, 1.0], [3.0, 5.0], [9.0, 9.0], [7.0, 7.0]]]
    )
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])  # the second row is padded after 2 tokens
    pooled = reply_mean(hidden, attention_mask, torch.tensor([2, 1]))
    # row 0: tokens 2 and 3 -> ([4, 6] + [8, 10]) / 2; row 1: token 1 only (tokens 2, 3 are padding)
    torch.testing.assert_close(pooled, torch.tensor([[6.0, 8.0], [3.0, 5.0]]))


def test_pooled_scores_read_the_reply_mean_of_the_kept_layers():
    """keep_layers(model, 3) + reply_mean = the head on the mean of norm(layer 3's states) over the reply."""
    model = tiny_rm()
    ids, start = SEQUENCES[2], 4
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[3]
        stack = model.get_base_model().model
        expected = model.get_base_model().score(stack.norm(hidden)[0, start:].mean(dim=0))[0]
        keep_layers(model, 3)
        assert len(stack.layers) == 3 and model.get_base_model().config.num_hidden_layers == 3
        # padded in a batch with a longer and a shorter sequence: the same score
        batch = [ids, SEQUENCES[0], SEQUENCES[1]]
        input_ids, mask = _right_padded(batch, 0)
        got = pooled_scores(model, input_ids, mask, torch.tensor([start, 2, 1]))
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(AlignError, match="'num_layers' must be between 1 and the model's 3 layers"):
        keep_layers(model, 4)


def test_cached_reply_mean_scores_equal_the_whole_model():
    model = tiny_rm()
    starts = torch.tensor([3, 1, 5, 0])
    input_ids, mask = _right_padded(SEQUENCES, 0)
    with torch.no_grad():
        expected = pooled_scores(model, input_ids, mask, starts)
    batch, mask = pad_states(frozen_states(model, SEQUENCES, CUT, pad_token_id=0))
    with top_layers_only(model, CUT), torch.no_grad():
        cached = score_states(model, batch, mask, starts)
    torch.testing.assert_close(cached, expected, atol=1e-5, rtol=1e-5)
