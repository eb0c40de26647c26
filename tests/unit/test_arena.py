"""The arena's numbers by hand (Bradley-Terry, Elo, win rates, the seeded bootstrap) and its storage: votes, their
snapshot into candidates + comparisons, and preference data from them."""

import itertools
import json
import math
import sqlite3

import numpy as np
import pytest

from align.arena import (
    Games,
    arenas,
    battles,
    bootstrap_bradley_terry,
    bradley_terry,
    elo,
    games_from,
    leaderboard,
    leaderboard_text,
    plot_win_rates,
    record_battle,
    snapshot,
    to_elo_scale,
    win_rates,
)
from align.cli import main
from align.errors import AlignError
from align.labels import from_labels
from align.registry import Registry


def test_bradley_terry_two_models_by_hand():
    # A beats B 3 times of 4: P(A beats B) = 3/4 = sigmoid(bA - bB), so bA - bB = ln 3, centred: +-ln(3)/2.
    games = games_from([("A", "B", "left")] * 2 + [("B", "A", "right"), ("B", "A", "left")])
    strengths = bradley_terry(games, l2=0.0)
    assert strengths == pytest.approx([math.log(3) / 2, -math.log(3) / 2], abs=1e-8)
    # On the Elo scale: 400 * log10(3) = 190.85 points apart, the mean at 1000.
    ratings = to_elo_scale(strengths)
    assert ratings[0] - ratings[1] == pytest.approx(400 * math.log10(3), abs=1e-6)
    assert ratings.mean() == pytest.approx(1000)
    # The default prior pulls the two a little closer: 3 - 4 sigmoid(d) = 0.1 * d / 2 at d = 1.0310 (by hand).
    penalized = bradley_terry(games)
    assert penalized[0] - penalized[1] == pytest.approx(1.0310, abs=1e-3)


def test_ties_count_half_and_a_cycle_is_a_draw():
    tied = games_from([("A", "B", "left"), ("A", "B", "right"), ("A", "B", "tie"), ("B", "A", "both-bad")])
    assert bradley_terry(tied, l2=0.0) == pytest.approx([0, 0], abs=1e-9)
    # A beats B, B beats C, C beats A, each 3 of 4: by symmetry all three are equal.
    cycle = []
    for winner, loser in (("A", "B"), ("B", "C"), ("C", "A")):
        cycle += [(winner, loser, "left")] * 3 + [(winner, loser, "right")]
    assert bradley_terry(games_from(cycle), l2=0.0) == pytest.approx([0, 0, 0], abs=1e-8)


def known_order_votes() -> list[tuple[str, str, str]]:
    """Four models in a known order: in every pair the better one wins 3 games of 4, sides alternating."""
    votes = []
    order = ["best", "good", "fair", "poor"]
    for round_ in range(4):
        for better, worse in itertools.combinations(order, 2):
            won = round_ != 3
            if round_ % 2:
                votes.append((worse, better, "right" if won else "left"))
            else:
                votes.append((better, worse, "left" if won else "right"))
    return votes


def test_bradley_terry_and_elo_recover_a_known_order():
    board = leaderboard(known_order_votes(), rounds=200, seed=0)
    assert [row["model"] for row in board.rows] == ["best", "good", "fair", "poor"]
    assert [row["rank"] for row in board.rows] == [1, 2, 3, 4]
    ratings = [row["rating"] for row in board.rows]
    assert ratings == sorted(ratings, reverse=True)
    assert sum(ratings) / 4 == pytest.approx(1000)
    elos = [row["elo"] for row in board.rows]
    assert elos == sorted(elos, reverse=True)
    # Middle models are symmetric: good and fair sit at equal distance from 1000.
    assert ratings[1] - 1000 == pytest.approx(1000 - ratings[2], abs=1e-6)
    best = board.rows[0]
    assert (best["votes"], best["wins"], best["ties"], best["losses"]) == (12, 9, 0, 3)
    for row in board.rows:
        assert row["low"] <= row["rating"] <= row["high"]
    # Each model's likelihood equation holds: expected wins = actual wins (the MLE, checked without a solver).
    games = games_from(known_order_votes())
    b = bradley_terry(games, l2=0.0)
    for i, name in enumerate(games.models):
        expected = actual = 0.0
        for f, s, score in zip(games.first, games.second, games.score):
            if i in (f, s):
                mine = score if f == i else 1 - score
                other = s if f == i else f
                expected += 1 / (1 + math.exp(b[other] - b[i]))
                actual += mine
        assert expected == pytest.approx(actual, abs=1e-8), name


def test_elo_by_hand():
    games = games_from([("A", "B", "left"), ("B", "A", "left"), ("A", "B", "tie")])
    # Game 1: even ratings, expected 0.5: A 1016, B 984.
    assert elo(Games(games.models, games.first[:1], games.second[:1], games.score[:1])) == pytest.approx([1016, 984])
    # Game 2: B (984) beats A (1016): expected for B = 1 / (1 + 10^(32/400)) = 0.454078; B gains 32 * 0.545922.
    gain = 32 * (1 - 1 / (1 + 10 ** (32 / 400)))
    two = Games(games.models, games.first[:2], games.second[:2], games.score[:2])
    assert elo(two) == pytest.approx([1016 - gain, 984 + gain])
    # Game 3: a tie moves the higher-rated one down.
    a, b = 1016 - gain, 984 + gain
    change = 32 * (0.5 - 1 / (1 + 10 ** ((b - a) / 400)))
    assert elo(games) == pytest.approx([a + change, b - change])
    assert elo(games, k=16, initial=1500)[0] < 1500 + 16


def test_win_rate_matrix_by_hand():
    votes = [("A", "B", "left"), ("B", "A", "left"), ("A", "B", "left"), ("A", "B", "tie"), ("B", "C", "both-bad")]
    rates, counts = win_rates(games_from(votes))
    # A vs B: A won 2, lost 1, tied 1 of 4 -> 2.5 / 4.
    assert rates[0, 1] == pytest.approx(2.5 / 4)
    assert rates[1, 0] == pytest.approx(1.5 / 4)
    assert rates[1, 2] == rates[2, 1] == 0.5
    assert math.isnan(rates[0, 2]) and math.isnan(rates[0, 0])
    assert counts.tolist() == [[0, 4, 0], [4, 0, 1], [0, 1, 0]]


def test_bootstrap_is_deterministic_under_a_seed():
    games = games_from(known_order_votes())
    first = bootstrap_bradley_terry(games, rounds=300, seed=7)
    again = bootstrap_bradley_terry(games, rounds=300, seed=7)
    other = bootstrap_bradley_terry(games, rounds=300, seed=8)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])
    low, high = first
    assert np.all(low < high)
    # The board built twice with the same seed is identical, to the last digit.
    assert (
        leaderboard(known_order_votes(), rounds=100, seed=3).rows
        == leaderboard(known_order_votes(), rounds=100, seed=3).rows
    )


def test_a_model_that_never_lost_gets_a_finite_rating(tmp_path):
    board = leaderboard([("A", "B", "left"), ("B", "A", "right"), ("A", "C", "left")], rounds=50, seed=0)
    assert board.rows[0]["model"] == "A"
    assert all(math.isfinite(row[key]) for row in board.rows for key in ("rating", "low", "high", "elo"))
    text = leaderboard_text(board)
    assert text.splitlines()[0].split()[:3] == ["RANK", "MODEL", "BT"]
    assert "3-0-0" in text.splitlines()[1]
    path = tmp_path / "heat.png"
    plot_win_rates(board, path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_unknown_choices_are_refused():
    with pytest.raises(AlignError, match="unknown battle choice 'A'"):
        games_from([("x", "y", "A")])


# Storage


def thread(question: str, reply: str, system: str | None = None, before: list | None = None) -> list[dict]:
    start = [{"role": "system", "content": system}] if system else []
    return start + (before or []) + [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "ws")
    yield registry
    registry.close()


def vote(registry, key, left, right, choice, question="q?", replies=("left says", "right says"), **kwargs):
    return record_battle(
        registry,
        arena=kwargs.pop("arena", "default"),
        key=key,
        left=left,
        right=right,
        left_messages=kwargs.pop("left_messages", thread(question, replies[0], "be brief")),
        right_messages=kwargs.pop("right_messages", thread(question, replies[1], "be brief")),
        choice=choice,
        annotator=kwargs.pop("annotator", "local"),
        settings={"temperature": 0.7},
        seconds=kwargs.pop("seconds", 2.5),
    )


def test_votes_are_rows_committed_at_once_and_a_retry_is_recorded_once(registry):
    first, duplicate = vote(registry, "k1", "base", "adapter:sft@1", "right")
    assert not duplicate
    assert vote(registry, "k1", "base", "adapter:sft@1", "left") == (first, True)  # the same battle: kept as it was
    other = sqlite3.connect(registry.root / "registry.sqlite")  # another process sees the committed row
    row = other.execute(
        "SELECT arena, model_left, model_right, choice, annotator, seconds FROM arena_battles"
    ).fetchall()
    other.close()
    assert row == [("default", "base", "adapter:sft@1", "right", "local", 2.5)]
    [battle] = battles(registry, "default")
    assert battle.prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q?"}]
    assert battle.replies == (
        [{"role": "assistant", "content": "left says"}],
        [{"role": "assistant", "content": "right says"}],
    )
    assert battle.settings == {"temperature": 0.7} and battle.turns == 1
    assert battles(registry, "other") == []


def test_bad_votes_are_refused(registry):
    with pytest.raises(AlignError, match="one of left, right, tie, both-bad"):
        vote(registry, "k", "a", "b", "A")
    with pytest.raises(AlignError, match="two different models"):
        vote(registry, "k", "a", "a", "left")
    with pytest.raises(AlignError, match="different user turns"):
        vote(registry, "k", "a", "b", "left", right_messages=thread("another question", "r"))
    with pytest.raises(AlignError, match=r"must be 'assistant' \(the last turn\)"):
        vote(registry, "k", "a", "b", "left", left_messages=[{"role": "user", "content": "q?"}])
    with pytest.raises(AlignError, match="invalid arena name"):
        vote(registry, "k", "a", "b", "left", arena="../x")
    assert registry.db.execute("SELECT COUNT(*) FROM arena_battles").fetchone()[0] == 0


def test_arena_votes_become_comparisons_and_preference_data(registry):
    vote(registry, "k1", "base", "tuned", "right", question="q1", replies=("b1", "t1"))
    vote(registry, "k2", "tuned", "base", "left", question="q2", replies=("t2", "b2"), annotator="alice")
    vote(registry, "k3", "base", "tuned", "both-bad", question="q3", replies=("b3", "t3"))
    earlier = [{"role": "user", "content": "hi"}]
    vote(  # multi-turn, the threads differ before the last reply: on the leaderboard, not in preference data
        registry,
        "k4",
        "base",
        "tuned",
        "left",
        left_messages=thread("q4", "b4", before=[*earlier, {"role": "assistant", "content": "hello (base)"}]),
        right_messages=thread("q4", "t4", before=[*earlier, {"role": "assistant", "content": "hello (tuned)"}]),
    )
    vote(registry, "k5", "base", "tuned", "tie", question="q5", replies=("b5", "t5"), arena="elsewhere")

    version = snapshot(registry, "default")
    assert (version.ref, version.kind, version.num_rows) == ("arena-default@1", "candidates", 3)
    rows = registry.rows(version)
    assert [row["sources"] for row in rows] == [["base", "tuned"], ["tuned", "base"], ["base", "tuned"]]
    assert rows[1]["prompt"][-1] == {"role": "user", "content": "q2"}
    assert rows[1]["completions"] == [
        [{"role": "assistant", "content": "t2"}],
        [{"role": "assistant", "content": "b2"}],
    ]
    assert json.loads(rows[0]["generation"]) == {"temperature": 0.7}
    assert version.meta["left_out_multi_turn"] == 1 and version.meta["battles"] == [1, 2, 3]
    assert {(role, parent) for role, parent in registry.parents(version)} == {("model", "base"), ("model", "tuned")}
    mirrored = registry.db.execute(
        "SELECT item, annotator, shown, choice, battle_id, seconds FROM comparisons WHERE dataset_id = ? ORDER BY id",
        (version.id,),
    ).fetchall()
    assert [tuple(row) for row in mirrored] == [
        (0, "local", "[0, 1]", "B", 1, 2.5),
        (1, "alice", "[0, 1]", "A", 2, 2.5),
        (2, "local", "[0, 1]", "both-bad", 3, 2.5),
    ]
    assert snapshot(registry, "default") == version  # the same battles: the same version, nothing written twice
    assert registry.db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0] == 3

    preference, result, numbers = from_labels(registry, "arena:default", name="arena-prefs")
    assert [(row["chosen"][0]["content"], row["rejected"][0]["content"]) for row in registry.rows(preference)] == [
        ("t1", "b1"),
        ("t2", "b2"),
    ]
    assert (result.kept, result.both_bad) == (2, 1)
    assert preference.meta["agreement"]["votes"] == 3 and preference.meta["candidates"] == "arena-default@1"
    roles = {role for role, _ in registry.parents(preference)}
    assert roles == {"candidates", "votes"}

    vote(registry, "k6", "tuned", "base", "left", question="q6", replies=("t6", "b6"))
    newer = snapshot(registry, "default")  # a new vote: a new version holding every battle, mirrored once
    assert (newer.ref, newer.num_rows) == ("arena-default@2", 4)
    assert registry.db.execute("SELECT COUNT(*) FROM comparisons WHERE dataset_id = ?", (newer.id,)).fetchone()[0] == 4


def test_snapshot_refusals(registry):
    with pytest.raises(AlignError, match="no votes in arena 'default'"):
        snapshot(registry, "default")
    with pytest.raises(AlignError, match="no votes in arena 'default'"):
        from_labels(registry, "arena:default", name="prefs")


def test_the_cli_prints_the_leaderboard_and_makes_preference_data(registry, tmp_path, capsys):
    workspace = ["--workspace", str(registry.root)]
    assert main([*workspace, "compare", "--leaderboard"]) == 2
    assert "no votes in arena 'default'" in capsys.readouterr().err
    vote(registry, "k1", "base", "tuned", "right", question="q1")
    vote(registry, "k2", "tuned", "base", "tie", question="q2")
    vote(registry, "k3", "base", "tuned", "right", question="q3", arena="round-2")
    assert arenas(registry) == [("default", 2), ("round-2", 1)]
    heatmap = tmp_path / "heat.png"
    assert main([*workspace, "compare", "--leaderboard", "--bootstrap", "50", "--plot", str(heatmap)]) == 0
    out = capsys.readouterr().out
    assert "arena 'default': 2 votes" in out
    lines = out.splitlines()
    assert lines[2].split()[:2] == ["1", "tuned"] and lines[2].endswith("1-1-0")
    assert heatmap.read_bytes()[:4] == b"\x89PNG"
    assert main([*workspace, "compare"]) == 2
    assert "give the models to compare" in capsys.readouterr().err

    assert main([*workspace, "data", "from-labels", "arena:default", "--name", "arena-prefs"]) == 0
    out = capsys.readouterr().out
    assert "arena-prefs@1  1 rows  kind=preference  (from arena-default@1)" in out  # the tie is dropped
    assert main([*workspace, "data", "from-labels", "arena:default", "--name", "with-ties", "--ties", "keep"]) == 0
    assert registry.resolve("with-ties").num_rows == 2
