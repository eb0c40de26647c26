"""The arena: blind battles between two models, the votes cast on them, and the ratings the votes add up to.

    align compare --models smollm2-135m,adapter:sft,adapter:dpo --open     # chat, battle, leaderboard (ui/)
    align compare --leaderboard                                            # the leaderboard in the terminal
    align data from-labels arena:default --name arena-prefs                # the votes -> preference data

Battles. Two models drawn at random from the app's list, placed left and right at random, answer the same user
turns, each in its own thread (a model sees its own earlier replies). The person votes left, right, tie or both
bad on the whole conversation; the names are shown only after the vote, and the vote ends the battle.

Storage. One `arena_battles` row per vote, written in one transaction that commits (SQLite synchronous=FULL)
before the app says "saved": the arena's name, both model references, both threads in full (system prompt, user
turns, replies), the generation settings, the annotator, the choice and the time taken. A battle carries a key
drawn when it starts, so a retried or double-clicked vote is recorded once. Rows are never updated or deleted.

From votes to training data. `align data from-labels arena:NAME` snapshots the arena's battles so far as a
`candidates` version named `arena-NAME` (one row per battle: the shared conversation up to the last user turn as
the prompt, the two last replies as the completions in the order shown, the model references as the sources),
writes one `comparisons` row per battle against it (left = A, right = B; `battle_id` names the battle; written
once per version, whatever the number of snapshots), then aggregates those rows like any other votes. A
multi-turn battle whose threads differ before the last turn has no prompt both replies answer: it counts on the
leaderboard but is left out of the preference data (the snapshot's meta counts it).

Ratings. Each vote is a game: a win scores 1, a tie or both-bad 0.5 each (as Chatbot Arena counts ties).
  - Bradley-Terry: P(i beats j) = sigmoid(b_i - b_j), fit by maximum likelihood (Newton's method) under a weak
    Gaussian prior on each b (an L2 penalty of 0.1: a standard deviation of about 3 in log-odds, 550 Elo
    points), so that a model that never lost, or a handful of votes, gives a finite, modest rating; with
    hundreds of votes the prior changes next to nothing. Shown on the Elo scale 1000 + 400 * b / ln 10, mean
    1000. Order-free: it uses every vote at once.
  - 95% intervals: the percentile bootstrap over votes (resample the votes with replacement, refit), seeded, so
    the same votes and seed give the same interval.
  - Elo: the online update in vote order, K = 32 by default (order-dependent, shown for comparison).
  - The win-rate matrix: the share of i's games against j that i won (ties half), with the game counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from align.errors import AlignError
from align.registry.registry import ARTIFACT_KINDS, check_name
from align.stats import logistic_regression, percentile_interval, resample_counts

CHOICES = ("left", "right", "tie", "both-bad")
SCORE = {"left": 1.0, "right": 0.0, "tie": 0.5, "both-bad": 0.5}  # the left model's score in the game
AS_COMPARISON = {"left": "A", "right": "B", "tie": "tie", "both-bad": "both-bad"}
DEFAULT_ARENA = "default"
ELO_SCALE = 400 / math.log(10)  # Bradley-Terry log-strengths -> Elo points
ELO_BASE = 1000.0
BT_PRIOR = 0.1  # the L2 penalty on Bradley-Terry log-strengths (see the module docstring)


# Battles: storage


@dataclass(frozen=True)
class Battle:
    id: int
    arena: str
    left: str  # model references, as placed on screen
    right: str
    left_messages: list[dict]  # each thread in full: system prompt, user turns, this model's replies
    right_messages: list[dict]
    choice: str  # left | right | tie | both-bad
    annotator: str
    settings: dict = field(default_factory=dict)
    seconds: float | None = None
    created_at: str = ""

    @property
    def prompt(self) -> list[dict] | None:
        """The conversation both last replies answer, or None when the threads differ before the last turn."""
        left, right = _before_last_reply(self.left_messages), _before_last_reply(self.right_messages)
        return left if left == right else None

    @property
    def replies(self) -> tuple[list[dict], list[dict]]:
        """The last reply of each side (its trailing assistant turns)."""
        left, right = self.left_messages, self.right_messages
        return left[len(_before_last_reply(left)) :], right[len(_before_last_reply(right)) :]

    @property
    def turns(self) -> int:
        return sum(message["role"] == "user" for message in self.left_messages)


def _before_last_reply(messages: list[dict]) -> list[dict]:
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end]


def check_thread(side: str, messages) -> list[dict]:
    """A thread to store: messages ending with the model's reply after a user turn."""
    from align.registry.schemas import RowError, validate_messages

    try:
        clean = validate_messages(f"{side} thread", messages, last_role="assistant")
    except RowError as exc:
        raise AlignError(f"cannot record the battle: {exc}") from None
    if not _before_last_reply(clean) or _before_last_reply(clean)[-1]["role"] != "user":
        raise AlignError(f"cannot record the battle: the {side} thread has no user turn before its reply")
    return clean


def record_battle(
    registry,
    *,
    arena: str,
    key: str,
    left: str,
    right: str,
    left_messages: list[dict],
    right_messages: list[dict],
    choice: str,
    annotator: str,
    settings: dict | None = None,
    seconds: float | None = None,
) -> tuple[int, bool]:
    """Store one vote in one transaction. Returns (battle id, duplicate): the same key twice is stored once."""
    check_name(arena, "arena")
    if choice not in CHOICES:
        raise AlignError(f"a battle vote is one of {', '.join(CHOICES)} (got {choice!r})")
    if left == right:
        raise AlignError(f"a battle needs two different models (got {left!r} twice)")
    left_messages, right_messages = check_thread("left", left_messages), check_thread("right", right_messages)
    users = [[m for m in thread if m["role"] == "user"] for thread in (left_messages, right_messages)]
    if users[0] != users[1]:
        raise AlignError("cannot record the battle: the two threads hold different user turns")
    battle = {
        "arena": arena,
        "left": left,
        "right": right,
        "left_messages": left_messages,
        "right_messages": right_messages,
        "choice": choice,
        "annotator": annotator,
        "settings": settings or {},
        "seconds": None if seconds is None else round(max(seconds, 0.0), 3),
    }
    return registry.arena.add_battle(key, battle)


def battles(registry, arena: str, *, upto: int | None = None) -> list[Battle]:
    """The arena's battles, oldest first (`upto`: only those up to that id)."""
    return [Battle(**row) for row in registry.arena.battles(arena, upto=upto)]


def arenas(registry) -> list[tuple[str, int]]:
    """(arena, votes) for every arena with a vote."""
    return registry.arena.arenas()


def snapshot(registry, arena: str):
    """The arena's battles so far as a `candidates` version `arena-NAME`, with one `comparisons` row per battle
    against it (see the module docstring). Returns the version; `align data from-labels` aggregates it."""
    check_name(arena, "arena")
    found = battles(registry, arena)
    if not found:
        known = ", ".join(name for name, _ in arenas(registry)) or "none yet"
        raise AlignError(
            f"no votes in arena {arena!r} at {registry.root} (arenas with votes: {known}): cast some in the Battle "
            "tab of `align compare`"
        )
    usable = [battle for battle in found if battle.prompt is not None]
    if not usable:
        raise AlignError(
            f"all {len(found)} battles of arena {arena!r} are multi-turn with threads that differ before the last "
            "reply: no prompt is shared by both replies, so none makes a preference pair"
        )
    rows = [
        {
            "prompt": battle.prompt,
            "completions": list(battle.replies),
            "sources": [battle.left, battle.right],
            "generation": json.dumps(battle.settings, sort_keys=True),
        }
        for battle in usable
    ]
    models = sorted({ref for battle in usable for ref in (battle.left, battle.right)})
    parents = [(ref if ref.split(":", 1)[0] in ARTIFACT_KINDS else f"base:{ref}", "model") for ref in models]
    try:
        version = registry.register(
            rows,
            name=f"arena-{arena}",
            kind="candidates",
            parents=parents,
            meta={
                "arena": arena,
                "battles": [battle.id for battle in usable],
                "last_battle": found[-1].id,
                "left_out_multi_turn": len(found) - len(usable),
                "models": models,
            },
        )
    except AlignError as exc:
        if "no artifact" not in str(exc):
            raise
        # A model the battles used is gone from the registry: keep the votes, name the models in meta only.
        version = registry.register(rows, name=f"arena-{arena}", kind="candidates", meta={"arena": arena})
    registry.labels.add_battle_votes(
        version.id,
        (
            (item, battle.annotator, AS_COMPARISON[battle.choice], battle.seconds, battle.id, battle.created_at)
            for item, battle in enumerate(usable)
        ),
    )
    return version


# Ratings: pure functions over games (i, j, score of i)


@dataclass(frozen=True)
class Games:
    """Votes as games between model indices: `first[g]` scored `score[g]` (1 win, 0.5 tie, 0 loss) against
    `second[g]`."""

    models: list[str]
    first: np.ndarray
    second: np.ndarray
    score: np.ndarray

    def __len__(self) -> int:
        return len(self.score)


def games_from(votes: Sequence[tuple[str, str, str]], models: Sequence[str] | None = None) -> Games:
    """Games from (left model, right model, choice) votes; `models` fixes the order (default: sorted names)."""
    names = list(models) if models is not None else sorted({m for left, right, _ in votes for m in (left, right)})
    index = {name: i for i, name in enumerate(names)}
    for left, right, choice in votes:
        if choice not in SCORE:
            raise AlignError(f"unknown battle choice {choice!r}: one of {', '.join(CHOICES)}")
        if left not in index or right not in index:
            raise AlignError(f"a vote names a model outside {names}: {left!r} vs {right!r}")
    return Games(
        models=names,
        first=np.array([index[left] for left, _, _ in votes], dtype=int),
        second=np.array([index[right] for _, right, _ in votes], dtype=int),
        score=np.array([SCORE[choice] for _, _, choice in votes], dtype=float),
    )


def bradley_terry(games: Games, weights: np.ndarray | None = None, *, l2: float = BT_PRIOR) -> np.ndarray:
    """Bradley-Terry log-strengths b (mean 0), P(i beats j) = sigmoid(b_i - b_j). `weights`: how many times each
    game counts (the bootstrap's resample counts)."""
    m = len(games.models)
    if not len(games):
        return np.zeros(m)
    design = np.zeros((len(games), m))
    rows = np.arange(len(games))
    design[rows, games.first] = 1.0
    design[rows, games.second] = -1.0
    strengths = logistic_regression(design, games.score, weights, l2=l2)
    return strengths - strengths.mean()  # the likelihood ignores a shift; the penalty already centres it


def to_elo_scale(strengths: np.ndarray) -> np.ndarray:
    return ELO_BASE + ELO_SCALE * np.asarray(strengths)


def bootstrap_bradley_terry(
    games: Games, *, rounds: int = 1000, seed: int = 0, confidence: float = 0.95, l2: float = BT_PRIOR
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile-bootstrap interval of each Bradley-Terry rating (Elo scale): refit on `rounds` resamples of
    the games, drawn with numpy's seeded generator. Returns (low, high)."""
    if rounds < 1:
        raise AlignError(f"the bootstrap needs at least one round (got {rounds})")
    m = len(games.models)
    if not len(games):
        return np.full(m, np.nan), np.full(m, np.nan)
    counts = resample_counts(len(games), rounds=rounds, seed=seed)
    fits = np.array([to_elo_scale(bradley_terry(games, row, l2=l2)) for row in counts])
    return percentile_interval(fits, confidence, axis=0)


def elo(games: Games, *, k: float = 32.0, initial: float = ELO_BASE) -> np.ndarray:
    """Online Elo in game order: after each game, r_i += k * (score - expected), r_j -= the same."""
    ratings = np.full(len(games.models), float(initial))
    for i, j, score in zip(games.first, games.second, games.score):
        expected = 1 / (1 + 10 ** ((ratings[j] - ratings[i]) / 400))
        change = k * (score - expected)
        ratings[i] += change
        ratings[j] -= change
    return ratings


def win_rates(games: Games) -> tuple[np.ndarray, np.ndarray]:
    """(rates, counts): rates[i, j] is the share of i's games against j that i won, a tie counting half (nan
    where they never met); counts[i, j] the number of those games."""
    m = len(games.models)
    won, counts = np.zeros((m, m)), np.zeros((m, m))
    for i, j, score in zip(games.first, games.second, games.score):
        won[i, j] += score
        won[j, i] += 1 - score
        counts[i, j] += 1
        counts[j, i] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(counts > 0, won / np.where(counts > 0, counts, 1), np.nan)
    return rates, counts


@dataclass
class Leaderboard:
    rows: list[dict]  # best first: model, rating, low, high, elo, votes, wins, ties, losses
    models: list[str]  # the order of the matrices
    rates: np.ndarray
    counts: np.ndarray
    votes: int
    rounds: int
    seed: int


def leaderboard(
    votes: Sequence[tuple[str, str, str]],
    *,
    rounds: int = 1000,
    seed: int = 0,
    k: float = 32.0,
    models: Sequence[str] | None = None,
) -> Leaderboard:
    """Everything the Leaderboard tab shows, from (left, right, choice) votes in the order they were cast."""
    games = games_from(votes, models)
    rating = to_elo_scale(bradley_terry(games))
    low, high = bootstrap_bradley_terry(games, rounds=rounds, seed=seed)
    online = elo(games, k=k)
    rates, counts = win_rates(games)
    rows = []
    for i, name in enumerate(games.models):
        mine = (games.first == i) | (games.second == i)
        score = np.where(games.first == i, games.score, 1 - games.score)[mine]
        rows.append(
            {
                "model": name,
                "rating": float(rating[i]),
                "low": float(low[i]),
                "high": float(high[i]),
                "elo": float(online[i]),
                "votes": int(mine.sum()),
                "wins": int((score == 1).sum()),
                "ties": int((score == 0.5).sum()),
                "losses": int((score == 0).sum()),
            }
        )
    order = sorted(range(len(rows)), key=lambda i: (-rows[i]["rating"], rows[i]["model"]))
    for rank, i in enumerate(order, start=1):
        rows[i]["rank"] = rank
    ranked = [games.models[i] for i in order]
    permutation = np.array(order, dtype=int)
    return Leaderboard(
        rows=[rows[i] for i in order],
        models=ranked,
        rates=rates[np.ix_(permutation, permutation)] if len(order) else rates,
        counts=counts[np.ix_(permutation, permutation)] if len(order) else counts,
        votes=len(games),
        rounds=rounds,
        seed=seed,
    )


def arena_leaderboard(registry, arena: str, *, rounds: int = 1000, seed: int = 0) -> Leaderboard:
    found = battles(registry, arena)
    return leaderboard([(b.left, b.right, b.choice) for b in found], rounds=rounds, seed=seed)


def leaderboard_text(board: Leaderboard) -> str:
    """The leaderboard as a plain-text table (the CLI)."""
    header = ("RANK", "MODEL", "BT RATING", "95% CI", "ELO", "VOTES", "W-T-L")
    lines = [header]
    for row in board.rows:
        lines.append(
            (
                str(row["rank"]),
                row["model"],
                f"{row['rating']:.0f}",
                f"{row['low']:.0f} to {row['high']:.0f}",
                f"{row['elo']:.0f}",
                str(row["votes"]),
                f"{row['wins']}-{row['ties']}-{row['losses']}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def plot_win_rates(board: Leaderboard, path: Path | None = None, title: str = "win rate of row vs column"):
    """The win-rate heatmap (row model vs column model, ties half, with game counts). Saved as PNG when `path`
    is given; returns the matplotlib figure (closed when saved)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = len(board.models)
    size = max(3.5, 1.1 * m + 2)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    shown = np.ma.masked_invalid(board.rates)
    image = axis.imshow(shown, cmap="RdBu", vmin=0, vmax=1)
    for i in range(m):
        for j in range(m):
            if board.counts[i, j]:
                colour = "white" if abs(board.rates[i, j] - 0.5) > 0.3 else "black"
                text = f"{board.rates[i, j]:.2f}\n({int(board.counts[i, j])})"
                axis.text(j, i, text, ha="center", va="center", fontsize=8, color=colour)
    labels = [_short(name) for name in board.models]
    axis.set_xticks(range(m), labels, rotation=30, ha="right")
    axis.set_yticks(range(m), labels)
    axis.set_title(title)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=100)
        plt.close(figure)
    return figure


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3) :]
