"""The order the ranking app serves items in: sequential, random, or the reward model's least sure items first.

    align label --candidates seed-candidates                                         # sequential: row order
    align label --candidates seed-candidates --order random                          # a seeded shuffle
    align label --candidates seed-candidates --order uncertainty --rm rm:hh-rm       # active learning

The order is the last rule of the assignment (align/labels.py): free items still go before items someone else
holds, and among those the items closest to done (the overlap) first; the order decides among the rest, where
row order decided before. Leases, overlap and undo are untouched.

  sequential   row order (and, in thumbs mode, each row's completions in turn): the default.
  random       one shuffle of the items, seeded by the candidates version's content hash, so every start serves
               the same shuffle. Each annotator starts at their own place in it (drawn from the same hash and
               their name) and goes round: two annotators see different orders, and each sees the same order
               after a restart.
  uncertainty  the items the reward model (`--rm rm:NAME`) is least sure of first. The reward model is a
               Bradley-Terry scorer: it predicts that reply a beats reply b with probability
               sigmoid(r_a - r_b). An item whose probability is nearest 1/2, the smallest |r_a - r_b|, is the
               vote it can least predict; a vote on a pair it already separates by a wide margin mostly
               confirms what it knows (uncertainty sampling, Lewis and Gale 1994: the cheapest active-learning
               rule, needing only the reward model). A rank item (three or more replies) is a set of such pair
               decisions: its uncertainty is the smallest gap between two adjacent scores, the decision the
               ranking is most likely to get wrong. Thumbs mode has no order by uncertainty: one reply alone has
               no pair to be unsure about.

Scores. The reward model scores every completion of every row once, in a background thread, while people
already vote: until the scores arrive the order is sequential. They are kept in the workspace
(`label-scores/`, one JSON file per candidates version and reward model), so a restart reads them instead of
scoring again. A reward model that cannot be loaded, or whose tokenizer cannot render these candidates (no chat
template, say), is refused at start.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from align.errors import AlignError

ORDERS = ("sequential", "random", "uncertainty")
SCORES_FOLDER = "label-scores"  # in the workspace: the reward model's scores of each candidates version


def check_order(order: str, rm: str | None, mode: str) -> None:
    """Refuse, at start, an order that cannot be served (cheap checks: nothing is loaded)."""
    if order not in ORDERS:
        raise AlignError(f"unknown --order {order!r}: choose {', '.join(ORDERS)}")
    if order == "uncertainty" and not rm:
        raise AlignError(
            "--order uncertainty serves first the items a reward model is least sure of: name it with --rm rm:NAME "
            "(train one with `align rm`)"
        )
    if rm and order != "uncertainty":
        raise AlignError(
            f"--rm orders the items by the reward model's uncertainty: add --order uncertainty (got --order {order})"
        )
    if order == "uncertainty" and mode == "thumbs":
        raise AlignError(
            "--order uncertainty needs two or more replies per item (pairwise or rank mode): a thumbs item is one "
            "reply alone; use --order random or sequential with --mode thumbs"
        )


# Random order


def random_order(count: int, content_hash: str) -> list[int]:
    """The items in one shuffle, seeded by the candidates version's content hash."""
    items = list(range(count))
    random.Random(f"order:{content_hash}").shuffle(items)
    return items


def random_start(count: int, content_hash: str, annotator: str) -> int:
    """Where an annotator starts in the shuffle: the same place on every start, another for another name."""
    digest = hashlib.sha256(f"start:{content_hash}:{annotator}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % max(count, 1)


# Uncertainty


def item_gap(scores: Sequence[float], completions: Sequence[int]) -> float:
    """How sure the reward model is of an item: the smallest gap between two adjacent scores of the completions
    it shows. For a pair that is |r_a - r_b|: the preference probability sigmoid(r_a - r_b) is nearest 1/2 when it
    is smallest. 0 is the least sure."""
    values = sorted(scores[index] for index in completions)
    if len(values) < 2:
        raise AlignError("an item needs two or more completions to be ordered by uncertainty")
    return min(high - low for low, high in zip(values, values[1:]))


def uncertainty_order(
    items: Sequence[Sequence[int]], item_rows: Sequence[int], row_scores: Sequence[Sequence[float]]
) -> list[int]:
    """The items, least sure first (smallest gap; equal gaps in row order). `items[i]`: the completions item i
    shows; `item_rows[i]`: its candidates row; `row_scores[row]`: the reward model's score of each completion."""
    gaps = [item_gap(row_scores[item_rows[i]], shown) for i, shown in enumerate(items)]
    return sorted(range(len(items)), key=lambda i: (gaps[i], i))


# The reward model's scores: loaded at start, computed in the background, kept in the workspace


class OrderScorer:
    """A reward model that scores candidates for the uncertainty order (make it with `open_scorer`). One scorer
    serves every candidates version of an app; it scores one whole version at a time."""

    def __init__(self, registry, artifact, model=None):
        self.registry, self.artifact = registry, artifact
        self.ref = artifact.ref
        self._model = model  # a reward.model.RewardModel, or None until needed
        self._lock = threading.Lock()

    def path(self, version) -> Path:
        """The file the scores of a candidates version are kept in."""
        rm = f"rm-{self.artifact.name}@{self.artifact.version}-{self.artifact.id}"
        name = f"{version.name}@{version.version}-{version.content_hash[:12]}--{rm}.json"
        return Path(self.registry.root) / SCORES_FOLDER / name

    def saved(self, version, rows: list[dict]) -> list[list[float]] | None:
        """The scores kept from an earlier start, or None (none kept, or a file that does not fit these rows)."""
        path = self.path(version)
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        scores = found.get("scores") if isinstance(found, dict) else None
        fits = (
            found.get("content_hash") == version.content_hash
            and found.get("rm_id") == self.artifact.id
            and isinstance(scores, list)
            and len(scores) == len(rows)
            and all(isinstance(s, list) and len(s) == len(row["completions"]) for s, row in zip(scores, rows))
        )
        return scores if fits else None

    def check(self, version, rows: list[dict]) -> None:
        """Load the reward model (once) and score one reply of these candidates: what cannot be scored fails now,
        with a one-line message, before anyone votes."""
        model = self.load()
        row = rows[0]
        try:  # not under the lock: one reply, even while another version is being scored
            model.score([row["prompt"]], [row["completions"][0]])
        except AlignError as exc:
            raise AlignError(f"--rm {self.ref} cannot score the replies of {version.ref}: {_first_line(exc)}") from None

    def score(self, version, rows: list[dict]) -> list[list[float]]:
        """Every completion of every row, scored and kept in the workspace (the file is replaced whole)."""
        model = self.load()
        flat = [(row["prompt"], completion) for row in rows for completion in row["completions"]]
        with self._lock:
            values = model.score([p for p, _ in flat], [c for _, c in flat])
        scores, start = [], 0
        for row in rows:
            scores.append(values[start : start + len(row["completions"])])
            start += len(row["completions"])
        path = self.path(version)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = {"candidates": version.ref, "content_hash": version.content_hash, "rm": self.ref}
        kept |= {"rm_id": self.artifact.id, "max_length": model.max_length, "scores": scores}
        partial = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_text(json.dumps(kept), encoding="utf-8")
        os.replace(partial, path)
        return scores

    def start(self, version, rows: list[dict], on_scores: Callable[[list[list[float]]], None]) -> threading.Thread:
        """Score in a background thread and hand the scores to `on_scores`; a failure is printed, and the order
        stays sequential."""

        def work() -> None:
            try:
                on_scores(self.score(version, rows))
                print(f"uncertainty order: {self.ref} scored {version.ref}; least sure items first now", flush=True)
            except Exception as exc:  # the app keeps serving, in row order: say why, once
                print(
                    f"uncertainty order: scoring {version.ref} with {self.ref} failed ({type(exc).__name__}: "
                    f"{_first_line(exc)}); items stay in row order",
                    file=sys.stderr,
                    flush=True,
                )

        thread = threading.Thread(target=work, name=f"label-order-{version.ref}", daemon=True)
        thread.start()
        return thread

    def load(self):
        """The reward model, loaded on first use (a failure is an AlignError naming it)."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = _load_reward_model(self.registry, self.ref)
        return self._model


def open_scorer(registry, rm: str) -> OrderScorer:
    """The reward model named by --rm, checked: an `rm:` artifact of this workspace. Nothing is loaded yet."""
    if not isinstance(rm, str) or not rm.startswith("rm:"):
        raise AlignError(
            f"--rm {rm} is not a reward model: name a registered one, rm:NAME[@V] (`align models list` shows them)"
        )
    try:
        artifact = registry.resolve_artifact(rm)
    except AlignError as exc:
        raise AlignError(f"--rm {rm}: {_first_line(exc)}") from None
    return OrderScorer(registry, artifact)


def _load_reward_model(registry, ref: str):
    from reward.model import RewardModel

    try:
        return RewardModel.load(ref, registry)
    except Exception as exc:  # missing or damaged files, an adapter that does not fit its base: all "cannot load"
        raise AlignError(f"--rm {ref} cannot be loaded: {_first_line(exc)}") from None


def _first_line(error: Exception) -> str:
    """The error's first line, and its second when the first only announces it ("Error(s) in loading ...:")."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
