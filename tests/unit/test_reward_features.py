"""Cached frozen-layer features give the same scores and gradients as the whole model (tiny Llama, fp32)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForSequenceClassification

from align.errors import AlignError
from reward.features import frozen_states, pad_states, score_states, top_layers_only

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
