"""RewardModel on a tiny model: the score is read at the right token, batching changes nothing, the untrained
head is seeded, and a policy with another tokenizer is scored on its text."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from align.errors import AlignError
from reward.model import RewardModel, load_scorer

PROMPTS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "user", "content": "tell me a long story about a fig tree"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}, {"role": "user", "content": "z?"}],
]
REPLIES = ["hello", "once upon a time there was a fig", "z!"]


@pytest.fixture
def scorer(tiny_model_dir):
    model, tokenizer, artifact = load_scorer(str(tiny_model_dir), seed=0)
    assert artifact is None and model.config.num_labels == 1
    return model, tokenizer


def manual_score(model, ids: list[int], position: int) -> float:
    """The head applied to the hidden state at `position`, computed without the model's own pooling."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state
        return float(model.score(hidden)[0, position, 0])


def test_the_score_is_read_at_the_last_real_token_even_when_pad_is_eos(scorer):
    model, tokenizer = scorer
    tokenizer.pad_token = tokenizer.eos_token  # as in SmolLM2: pad == eos == <|im_end|>
    rm = RewardModel(model, tokenizer, batch_size=3)
    assert model.config.pad_token_id == tokenizer.eos_token_id
    scores = rm.score(PROMPTS, REPLIES)
    for prompt, reply, score in zip(PROMPTS, REPLIES, scores):
        ids = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)
        ids = tokenizer(ids, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids[-2:]) == "<|im_end|>\n"  # ChatML ends with a newline, not with eos
        # right-padded in a batch with longer rows, the score is the one at the sequence's own last token
        assert score == pytest.approx(manual_score(model, ids, len(ids) - 1), abs=1e-5)


def test_a_sequence_ending_in_the_pad_token_is_read_before_it_consistently(scorer):
    model, tokenizer = scorer
    tokenizer.pad_token = tokenizer.eos_token
    rm = RewardModel(model, tokenizer, batch_size=2)
    # plain-text replies end with eos (== pad): the head reads the token before it, alone or padded in a batch
    prompts, replies = ["Q: hi\nA:", "Q: a much longer question\nA:"], [" yes", " a longer answer"]
    batched = rm.score(prompts, replies)
    alone = [rm.score([p], [r])[0] for p, r in zip(prompts, replies)]
    assert batched == pytest.approx(alone, abs=1e-5)
    ids = tokenizer("Q: hi\nA: yes<|im_end|>", add_special_tokens=False).input_ids
    assert batched[0] == pytest.approx(manual_score(model, ids, len(ids) - 2), abs=1e-5)


def test_scores_do_not_depend_on_batch_size_or_order(scorer):
    model, tokenizer = scorer
    one = RewardModel(model, tokenizer, batch_size=1).score(PROMPTS, REPLIES)
    many = RewardModel(model, tokenizer, batch_size=8).score(PROMPTS, REPLIES)
    reverse = RewardModel(model, tokenizer, batch_size=2).score(PROMPTS[::-1], REPLIES[::-1])
    assert many == pytest.approx(one, abs=1e-5)
    assert reverse[::-1] == pytest.approx(one, abs=1e-5)
    assert len(set(one)) == 3


def test_batches_are_sorted_by_length(scorer):
    model, tokenizer = scorer
    widths = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: widths.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        RewardModel(model, tokenizer, batch_size=2).score(PROMPTS * 2, REPLIES * 2)
    finally:
        hook.remove()
    assert [shape[0] for shape in widths] == [2, 2, 2]
    assert [shape[1] for shape in widths] == sorted((shape[1] for shape in widths), reverse=True)


def test_the_untrained_head_is_drawn_from_the_seed(tiny_model_dir):
    a, _, _ = load_scorer(str(tiny_model_dir), seed=0)
    b, _, _ = load_scorer(str(tiny_model_dir), seed=0)
    c, _, _ = load_scorer(str(tiny_model_dir), seed=1)
    assert torch.equal(a.score.weight, b.score.weight)
    assert not torch.equal(a.score.weight, c.score.weight)


def test_a_policy_with_another_tokenizer_is_scored_on_its_text(scorer):
    model, tokenizer = scorer
    rm = RewardModel(model, tokenizer)
    # The policy: a word-level tokenizer whose ids mean nothing to the reward model.
    words = ["<unk>", "once", "upon", "a", "time", "there", "was", "fig", "hello"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    policy = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    generated = policy("once upon a time there was a fig").input_ids  # what a policy's generate() returns
    assert generated != tokenizer("once upon a time there was a fig", add_special_tokens=False).input_ids

    seen = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    try:
        [score] = rm.score([PROMPTS[1]], [policy.decode(generated)])
    finally:
        hook.remove()
    expected = tokenizer.apply_chat_template(
        PROMPTS[1] + [{"role": "assistant", "content": REPLIES[1]}], tokenize=False
    )
    assert tokenizer.decode(seen[0][0]) == expected  # re-tokenized under the reward model's own template
    assert score == rm.score([PROMPTS[1]], [REPLIES[1]])[0]


def test_prompts_and_completions_must_pair_up_and_adapters_are_refused(scorer, tiny_model_dir):
    model, tokenizer = scorer
    with pytest.raises(AlignError, match="2 prompts but 1 completions"):
        RewardModel(model, tokenizer).score(PROMPTS[:2], REPLIES[:1])
    with pytest.raises(AlignError, match="policy adapter, not a reward model"):
        load_scorer("adapter:sft")
