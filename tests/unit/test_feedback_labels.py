"""Thumbs votes, both-bad votes and (when asked) pairwise votes as KTO's feedback rows; rubric scores per vote and
their aggregates. Expected rows and numbers are worked out by hand in the comments."""

import json

import pytest

from align.cli import main as align_main
from align.errors import AlignError
from align.labels import (
    LabelError,
    LabelStore,
    Vote,
    aggregate_feedback,
    check_rubric,
    from_labels,
    item_rows,
    label_items,
    rubric_scores,
)
from align.registry import Registry


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def candidate_row(index: int, count: int) -> dict:
    return {
        "prompt": [{"role": "user", "content": f"question {index}"}],
        "completions": [reply(f"answer {index}.{j}") for j in range(count)],
        "sources": [f"model-{j}" for j in range(count)],
    }


ROWS = [candidate_row(0, 3), candidate_row(1, 2)]  # thumbs items: 0-2 are row 0's completions, 3-4 row 1's


def vote(id, item, annotator, mode, shown, choice, scores=None) -> Vote:
    return Vote(id, item, annotator, mode, tuple(shown), choice, scores=scores)


HAND_VOTES = [
    vote(1, 1, "alice", "thumbs", [1], "up"),  # row 0 answer 1: up ...
    vote(2, 1, "bob", "thumbs", [1], "down"),  # ... and down: split, unless dave's pairwise vote counts
    vote(3, 3, "alice", "thumbs", [0], "down"),  # row 1 answer 0: undesirable
    vote(4, 4, "alice", "thumbs", [1], "up", {"helpfulness": 4}),  # row 1 answer 1: desirable (two ups)
    vote(5, 4, "bob", "thumbs", [1], "up", {"helpfulness": 5}),
    vote(6, 2, "bob", "thumbs", [2], "skip"),  # nothing
    vote(7, 0, "carol", "pairwise", [2, 0], "both-bad"),  # row 0 answers 2 and 0: undesirable
    vote(8, 1, "carol", "pairwise", [1, 0], "A", {"helpfulness:A": 2, "helpfulness:B": 1, "honesty:A": 3}),
    vote(9, 0, "dave", "pairwise", [0, 1], "B"),  # with pairwise votes: row 0 answer 1 up, answer 0 down
    vote(10, 1, "erin", "pairwise", [0, 1], "tie"),  # a tie says nothing about either reply
]


def as_row(row: int, completion: int, label: bool) -> dict:
    return {"prompt": ROWS[row]["prompt"], "completion": ROWS[row]["completions"][completion], "label": label}


def test_thumbs_items_are_every_completion_row_by_row():
    assert label_items(ROWS, "thumbs", "hash") == [(0,), (1,), (2,), (0,), (1,)]
    assert item_rows(ROWS, "thumbs") == [0, 0, 0, 1, 1]
    assert item_rows(ROWS, "pairwise") == [0, 1]


def test_thumbs_and_both_bad_votes_become_feedback_rows_by_hand():
    result = aggregate_feedback(ROWS, HAND_VOTES)
    assert result.rows == [as_row(0, 0, False), as_row(0, 2, False), as_row(1, 0, False), as_row(1, 1, True)]
    assert (result.completions, result.desirable, result.undesirable, result.split) == (5, 1, 3, 1)
    assert result.sources == {"thumbs": 5, "both-bad": 2}


def test_pairwise_votes_count_when_asked():
    result = aggregate_feedback(ROWS, HAND_VOTES, include_pairwise=True)
    # Row 0 answer 1: alice up, bob down, dave chose it: 2 to 1, desirable. Row 1: carol chose answer 1 over 0.
    assert result.rows == [
        as_row(0, 0, False),
        as_row(0, 1, True),
        as_row(0, 2, False),
        as_row(1, 0, False),
        as_row(1, 1, True),
    ]
    assert (result.split, result.sources) == (0, {"thumbs": 5, "both-bad": 2, "pairwise": 4})
    assert aggregate_feedback(ROWS, HAND_VOTES, include_pairwise=True, min_votes=2).rows == [
        as_row(0, 0, False),
        as_row(0, 1, True),
        as_row(1, 0, False),
        as_row(1, 1, True),
    ]


def test_the_later_vote_of_one_annotator_counts():
    votes = [vote(1, 0, "alice", "thumbs", [0], "up"), vote(2, 0, "alice", "pairwise", [0, 1], "both-bad")]
    assert aggregate_feedback(ROWS, votes).rows == [as_row(0, 0, False), as_row(0, 1, False)]


def test_rubric_scores_per_completion_and_attribute_by_hand():
    found = rubric_scores(ROWS, HAND_VOTES)
    # Row 1 answer 1: alice 4, bob 5 (thumbs), carol 2 (shown as A); answer 0: carol 1 (shown as B).
    assert found["items"] == [
        {"row": 1, "completion": 0, "attribute": "helpfulness", "mean": 1.0, "n": 1, "spread": 0.0},
        {"row": 1, "completion": 1, "attribute": "helpfulness", "mean": 11 / 3, "n": 3, "spread": 3.0},
        {"row": 1, "completion": 1, "attribute": "honesty", "mean": 3.0, "n": 1, "spread": 0.0},
    ]
    # Pairs of scores on one reply: (4, 5), (4, 2), (5, 2): none equal, one within a point.
    assert found["attributes"]["helpfulness"] == {
        "scores": 4,
        "completions": 2,
        "mean": 3.0,
        "exact_agreement": 0.0,
        "within_one": pytest.approx(1 / 3),
    }
    assert found["attributes"]["honesty"]["exact_agreement"] is None
    assert rubric_scores(ROWS, [vote(1, 0, "a", "pairwise", [0, 1], "A", {"free-form": 0.5})]) == {}


# Through the store and the registry


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "ws")
    registry.register(ROWS, name="cands", kind="candidates")
    yield registry
    registry.close()


def test_thumbs_store_votes_undo_and_refusals(registry):
    store = LabelStore(registry, "cands", mode="thumbs", overlap=1, seed=0)
    assert len(store.items) == 5
    first = store.current("alice")
    assert first.item == 0 and first.shown == (0,)
    with pytest.raises(LabelError, match="choice 'A' is not one of up, down, skip"):
        store.vote("alice", first.lease, "A")
    store.vote("alice", first.lease, "down", reason="rude")
    second = store.current("alice")
    assert (second.item, second.shown) == (1, (1,))
    undone, again = store.undo("alice")
    assert undone.vote.choice == "down" and undone.vote.reason == "rude" and again.item == 0
    store.vote("alice", again.lease, "up")
    for _ in range(4):
        store.vote("alice", store.current("alice").lease, "down")
    assert store.current("alice").status == "done"
    version, result, numbers = from_labels(registry, "cands", name="fb", kind="feedback")
    assert version.kind == "feedback" and [row["label"] for row in registry.rows(version)] == [
        True,
        False,
        False,
        False,
        False,
    ]
    assert version.meta["completions"]["labels_by_source"] == {"thumbs": 5}
    parents = {role: parent for role, parent in registry.parents(version)}
    assert parents["candidates"].ref == "cands@1" and parents["votes"].startswith("comparisons:")
    with pytest.raises(AlignError, match="no pairwise or rank votes on cands@1"):
        from_labels(registry, "cands", name="prefs")  # thumbs votes make no pairs


def test_rubric_scores_are_checked_and_stored(registry):
    store = LabelStore(registry, "cands", overlap=1, seed=0, rubric="helpfulness,honesty")
    held = store.current("alice")
    with pytest.raises(LabelError, match=r"score 'helpfulness:A' must be a whole number from 1 to 5 \(got 6\)"):
        store.vote("alice", held.lease, "A", scores={"helpfulness:A": 6})
    with pytest.raises(LabelError, match=r"must be a whole number from 1 to 5 \(got 2.5\)"):
        store.vote("alice", held.lease, "A", scores={"honesty:B": 2.5})
    with pytest.raises(LabelError, match="score 'helpfulness' is not asked for here"):
        store.vote("alice", held.lease, "A", scores={"helpfulness": 3})
    store.vote("alice", held.lease, "both-bad", scores={"helpfulness:A": 1, "honesty:B": 5})
    stored = registry.db.execute("SELECT scores FROM comparisons").fetchone()[0]
    assert json.loads(stored) == {"helpfulness:A": 1, "honesty:B": 5}

    thumbs = LabelStore(registry, "cands", mode="thumbs", overlap=1, seed=0, rubric=["helpfulness"])
    with pytest.raises(LabelError, match=r"score 'helpfulness' must be a whole number from 1 to 5 \(got 0\)"):
        thumbs.vote("alice", thumbs.current("alice").lease, "up", scores={"helpfulness": 0})
    thumbs.vote("alice", thumbs.current("alice").lease, "up", scores={"helpfulness": 4})
    version, _, _ = from_labels(registry, "cands", name="fb", kind="feedback")
    rubric = version.meta["rubric"]
    assert {(item["attribute"], item["row"], item["completion"], item["mean"]) for item in rubric["items"]} == {
        ("helpfulness", 0, held.shown[0], 1.0),
        ("honesty", 0, held.shown[1], 5.0),
        ("helpfulness", 0, 0, 4.0),
    }

    with pytest.raises(AlignError, match="--rubric names an attribute twice"):
        check_rubric("a,b,a")
    with pytest.raises(AlignError, match="--rubric takes attribute names"):
        check_rubric("help fulness")


def test_from_labels_feedback_on_the_command_line(registry, capsys):
    pairwise = LabelStore(registry, "cands", overlap=1, seed=0)
    pairwise.vote("alice", pairwise.current("alice").lease, "A")
    workspace = ["--workspace", str(registry.root)]
    code = align_main(["data", "from-labels", "cands", "--name", "fb", "--kind", "feedback", *workspace])
    err = capsys.readouterr().err
    assert code == 2 and "no feedback rows from 1 votes on cands@1" in err and "--include-pairwise" in err
    argv = ["data", "from-labels", "cands", "--name", "fb", "--kind", "feedback", "--include-pairwise", *workspace]
    assert align_main(argv) == 0
    out = capsys.readouterr().out
    assert "fb@1  2 rows  kind=feedback" in out and "1 desirable, 1 undesirable" in out
    code = align_main(["data", "from-labels", "cands", "--name", "p", "--include-pairwise", *workspace])
    assert code == 2 and "it goes with --kind feedback" in capsys.readouterr().err
