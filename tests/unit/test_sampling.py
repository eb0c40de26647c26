"""What a killed generation leaves and what picks it up: the reply journal, batch seeds, sampling that skips the
batches saved, and the newest complete Trainer checkpoint."""

import json

import pytest

from align.errors import AlignError
from align.runs import last_checkpoint
from align.sampling import ReplyJournal, SamplingSettings, batch_seed, sample


def test_the_journal_keeps_what_was_appended_and_drops_a_line_cut_short(tmp_path):
    path = tmp_path / "replies.jsonl"
    journal = ReplyJournal(path)
    assert journal.saved("a") == {}
    journal.append("a", {0: ["x", "y"], 3: ["é"]})
    journal.append("b", {1: ["z"]})
    with open(path, "a", encoding="utf-8") as out:
        out.write('{"source": "a", "replies": {"5": ["cut')  # a kill in the middle of a write
    again = ReplyJournal(path)
    assert again.saved("a") == {0: ["x", "y"], 3: ["é"]} and again.saved("b") == {1: ["z"]}
    again.append("a", {5: ["whole"]})  # starts on a line of its own: the cut line is gone
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [line["source"] for line in lines] == ["a", "b", "a"]
    assert ReplyJournal(path).saved("a") == {0: ["x", "y"], 3: ["é"], 5: ["whole"]}


def test_a_journal_line_that_is_not_a_cut_short_one_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "replies.jsonl"
    path.write_text('{"source": "a", "replies": {"0": ["x"]}}\nnot json\n', encoding="utf-8")
    with pytest.raises(AlignError, match=r"replies.jsonl, line 2: not a journal line"):
        ReplyJournal(path)


def test_each_seed_and_batch_has_its_own_seed():
    seeds = {batch_seed(seed, batch) for seed in range(20) for batch in range(20)}
    assert len(seeds) == 400 and batch_seed(3, 4) == batch_seed(3, 4)


PROMPTS = [[{"role": "user", "content": "q" * (i + 1)}] for i in range(5)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from align.models import load_model

    return load_model(str(tiny_model_dir))


def test_sampling_skips_the_batches_saved_and_samples_the_rest_as_before(tiny):
    model, tokenizer = tiny
    settings = SamplingSettings(max_new_tokens=5, temperature=1.0, top_p=1.0, seed=3, batch_size=2)
    batches = []
    straight = sample(model, tokenizer, PROMPTS, 2, settings, on_batch=batches.append)
    assert [sorted(batch) for batch in batches] == [[0, 1], [2, 3], [4]]  # by length, then in batches of two
    assert straight == [batch[i] for batch in batches for i in sorted(batch)]

    # The first batch saved: the same replies, without sampling it again.
    resumed_batches = []
    resumed = sample(model, tokenizer, PROMPTS, 2, settings, done=batches[0], on_batch=resumed_batches.append)
    assert resumed == straight and resumed_batches == batches[1:]
    # Nothing left to sample: the model is not even called.
    done = {i: replies for batch in batches for i, replies in batch.items()}
    assert sample(None, tokenizer, PROMPTS, 2, settings, done=done) == straight

    other = sample(model, tokenizer, PROMPTS, 2, SamplingSettings(**{**vars(settings), "seed": 4}))
    assert other != straight


def test_the_last_complete_checkpoint_is_resumed_from(tmp_path):
    assert last_checkpoint(tmp_path) is None
    for step in (2, 10, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 10}')
    (tmp_path / "checkpoint-12" / "trainer_state.json").write_text('{"global_st')  # a kill cut this save short
    (tmp_path / "checkpoint-x").mkdir()
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # 10 after 2 (numbers, not text), not 12
