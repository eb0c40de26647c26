"""Human labels: who sees which item next, the votes they cast, and what the votes add up to.

    align annotators add alice --admin                       # asks for a password (stored salted, hashed)
    align label --candidates seed-candidates --overlap 2     # the ranking app (ui/label_app.py)
    align label --candidates seed-candidates --mode thumbs   # one reply at a time: up or down
    align label --candidates seed-candidates --order uncertainty --rm rm:hh-rm   # least sure items first
    align data from-labels seed-candidates --name seed-prefs --ties drop --min-votes 1
    align data from-labels seed-candidates --name seed-feedback --kind feedback --include-pairwise
    align data from-labels arena:default --name arena-prefs  # arena battles (align/arena.py), snapshotted first

Items. An item is one row of a candidates version, keyed by (dataset id, row index).
  - pairwise mode shows one pair of the row's completions. With two completions that is the pair; with more,
    one pair is drawn per row, deterministically from the version's content hash and the row index: pairs
    holding the gold completion when the row has one, else pairs from two different sources when there are
    any, else any pair. (To compare every completion of a row, use rank mode.)
  - rank mode shows all of the row's completions (three or more) to be put in order, ties allowed.
  - thumbs mode shows one completion to be judged on its own, up or down (KTO's unpaired feedback): every
    completion of every row is an item, numbered row by row (`item_rows` maps an item to its row).
  The order on screen is drawn at random for each lease and stored with the vote.

Assignment. Each item goes to `overlap` distinct annotators; nobody gets an item twice; a skip does not count
towards the overlap (the item goes to someone else). Handing out an item leases it to that annotator until the
lease expires; items nobody holds are handed out first, so two annotators hold the same item at once only
when no free item is left. Among free items, those closest to done go first (their agreement can be measured
soonest), then the order asked for (`--order`, align/label_order.py): row order (sequential, the default), a
seeded shuffle (random), or the reward model's least sure items first (uncertainty, `--rm rm:NAME`).

Votes. One row of the append-only `comparisons` table per vote, committed (SQLite, synchronous=FULL) before
the next item is handed out. A vote must use a lease of the same annotator. Undo appends a row that retracts
the annotator's last vote and leases that item to them again; nothing is ever rewritten.

Aggregation. Every vote becomes judgments on pairs of completions (a ranking of k completions gives one per
pair). Per pair, a strict majority of both-bad votes drops it; otherwise the completion with more wins is
chosen, and equal wins are a tie (`--ties keep` keeps ties with tie=true). With n votes on a pair:
margin = (wins of chosen - wins of rejected) / n, and weight = the share of the n votes that agree with the
row (for a tie: every vote except both-bad, since the A and B votes cancel out).

Feedback (`--kind feedback`). Each vote becomes labels on single completions: thumbs up is desirable, thumbs down
undesirable; a both-bad vote makes every completion it showed undesirable; with `include_pairwise`, a pairwise
vote makes the chosen completion desirable and the other undesirable (ties give nothing). Per completion, the
majority label is kept; an even split is dropped. Rubric scores (`--rubric`, 1-5 per attribute) are averaged per
completion and attribute into the version's meta, with how closely the annotators agreed; a preference row also
carries its two replies' means in its `scores` field (what `align rm --objectives` trains on).

Agreement. On those pair judgments (first wins / second wins / tie / both-bad): Cohen's kappa for each pair of
annotators over the pairs both judged, Krippendorff's alpha (nominal) overall, and the raw share of agreeing
judgment pairs.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import itertools
import json
import math
import random
import secrets
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

from align.errors import AlignError
from align.label_order import check_order, random_order, random_start, uncertainty_order
from align.registry.labels import Vote
from align.registry.registry import check_name
from align.stats import cohen_kappa, krippendorff_alpha, pairwise_agreement

MODES = ("pairwise", "rank", "thumbs")
PAIRWISE_CHOICES = ("A", "B", "tie", "both-bad", "skip")
RANK_CHOICES = ("rank", "both-bad", "skip")
THUMBS_CHOICES = ("up", "down", "skip")
CHOICES = {"pairwise": PAIRWISE_CHOICES, "rank": RANK_CHOICES, "thumbs": THUMBS_CHOICES}
KINDS = ("preference", "feedback")  # what `align data from-labels` makes
RUBRIC_RANGE = (1, 5)  # a rubric score is a whole number from 1 to 5
OUTCOMES = ("first", "second", "tie", "both-bad")  # a judgment on completions (i, j), i < j
TIES = ("drop", "keep")
OPEN_USER = "local"  # `align label --open`: the one local user, an admin
DEFAULT_LEASE_SECONDS = 600.0
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # the completions in the order shown
INTEGER_RANGE = (-(2**63), 2**63 - 1)  # what an SQLite INTEGER holds (a lease is a row id)


class LabelError(AlignError):
    """A vote or request the labeling service refuses (not your lease, bad choice, ...)."""


# Passwords: stdlib scrypt, a fresh salt per annotator.

_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def hash_password(password: str) -> str:
    if not password:
        raise AlignError("the password is empty: give at least one character")
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, dklen=32, **_SCRYPT)
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        found = hashlib.scrypt(
            password.encode("utf-8"), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p), dklen=32
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(found.hex(), digest)


# Items


def label_items(rows: list[dict], mode: str, content_hash: str) -> list[tuple[int, ...]]:
    """The completion indices each item shows: one tuple per row (see the module docstring for the rule)."""
    if mode not in MODES:
        raise AlignError(f"unknown --mode {mode!r}: choose pairwise, rank or thumbs")
    if mode == "thumbs":
        return [(completion,) for row in rows for completion in range(len(row["completions"]))]
    items = []
    for index, row in enumerate(rows):
        count = len(row["completions"])
        if mode == "rank":
            items.append(tuple(range(count)))
            continue
        pairs = list(itertools.combinations(range(count), 2))
        if row.get("gold") is not None:
            pairs = [pair for pair in pairs if row["gold"] in pair]
        sources = row["sources"]
        mixed = [(i, j) for i, j in pairs if sources[i] != sources[j]]
        pairs = mixed or pairs
        items.append(random.Random(f"{content_hash}:{index}").choice(pairs))
    return items


def item_rows(rows: list[dict], mode: str) -> list[int]:
    """The candidates row of each item: the item itself, except in thumbs mode (one item per completion)."""
    if mode == "thumbs":
        return [index for index, row in enumerate(rows) for _ in row["completions"]]
    return list(range(len(rows)))


def check_rubric(rubric: Sequence[str] | str | None) -> tuple[str, ...]:
    """`--rubric helpfulness,harmlessness` -> ("helpfulness", "harmlessness"): names, each once."""
    if rubric is None:
        return ()
    names = [name.strip() for name in rubric.split(",")] if isinstance(rubric, str) else list(rubric)
    for name in names:
        if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise AlignError(f"--rubric takes attribute names separated by commas, like helpfulness,honesty ({name!r})")
    if len(set(names)) != len(names):
        raise AlignError(f"--rubric names an attribute twice: {','.join(names)}")
    return tuple(names)


def check_rubric_scores(scores: dict, rubric: Sequence[str], labels: Sequence[str]) -> None:
    """Scores sent with a vote when the app asks for a rubric: each key names an attribute (thumbs mode: the one
    reply) or an attribute and a completion as shown (`helpfulness:A`), each value a whole number from 1 to 5."""
    low, high = RUBRIC_RANGE
    keys = set(rubric) if len(labels) == 1 else {f"{name}:{label}" for name in rubric for label in labels}
    for key, value in scores.items():
        if key not in keys:
            raise LabelError(f"score {key!r} is not asked for here: the rubric scores are {', '.join(sorted(keys))}")
        whole = isinstance(value, (int, float)) and not isinstance(value, bool) and value == int(value)
        if not whole or not low <= value <= high:
            raise LabelError(f"score {key!r} must be a whole number from {low} to {high} (got {value!r})")


def check_candidates(version, rows: list[dict], mode: str) -> None:
    """Refuse, at start, what cannot be labelled."""
    if version.kind != "candidates":
        raise AlignError(
            f"dataset {version.ref} holds '{version.kind}' rows, but the ranking app needs 'candidates' rows "
            "(make them with `align generate`)"
        )
    if not rows:
        raise AlignError(f"dataset {version.ref} is empty: there is nothing to label")
    if mode == "rank":
        for index, row in enumerate(rows):
            if len(row["completions"]) < 3:
                raise AlignError(
                    f"rank mode orders three or more completions, but row {index} of {version.ref} has "
                    f"{len(row['completions'])}: use --mode pairwise"
                )


# Assignment


def choose_item(
    levels: Sequence[Sequence[int]],
    *,
    overlap: int,
    mine: Container[int],
    votes: Mapping[int, int],
    held: Mapping[int, int],
    order: Sequence[int] | None = None,
    rank: Sequence[int] | None = None,
    start: int = 0,
) -> tuple[int | None, str]:
    """The next item for one annotator: (item, "item"), or (None, "wait") while the only items left are held by
    others, or (None, "done").

    `levels[c]`: the items with c counted votes (c < overlap), as ascending positions in the serving order: the
    items not done yet, so the choice never walks the items that are done. `order[p]` is the item at position p
    and `rank[item]` its position (None for both: row order, position = item; see align/label_order.py). The walk
    through a level begins at position `start` and wraps round (random order: each annotator's own starting
    place). `mine`: items this annotator already voted on (a skip included); `votes`: item -> votes that count
    towards the overlap (skips excluded); `held`: item -> other annotators holding a live lease on it.
    """
    # Free items first, then the closest to done, then the order: the first free item, from the fullest level.
    for counted in reversed(range(min(overlap, len(levels)))):
        level = levels[counted]
        cut = bisect.bisect_left(level, start) if start else 0
        for index in itertools.chain(range(cut, len(level)), range(cut)):
            item = level[index] if order is None else order[level[index]]
            if item not in mine and not held.get(item):
                return item, "item"
    # No free item: share a held one that still has an open slot, again the closest to done first.
    best: tuple | None = None
    waiting = False
    for item, holders in held.items():
        counted = votes.get(item, 0)
        if not holders or item in mine or counted >= overlap:
            continue
        if counted + holders >= overlap:
            waiting = True  # every open slot is leased: it may come free if a lease ends in a skip or expires
            continue
        position = item if rank is None else rank[item]
        key = (-counted, position < start, position, item)  # positions from `start` on, then those before it
        if best is None or key < best:
            best = key
    if best is not None:
        return best[-1], "item"
    return None, "wait" if waiting else "done"


def normalize_ranking(ranks: Sequence) -> list[int]:
    """Ranks as given (1 = best, equal = tie) -> dense ranks 1..k: [1, 3, 3] -> [1, 2, 2]."""
    if not ranks or not all(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1 for rank in ranks):
        raise LabelError(f"a ranking gives every completion a whole-number rank of 1 or more (got {list(ranks)})")
    dense = {rank: position for position, rank in enumerate(sorted(set(ranks)), start=1)}
    return [dense[rank] for rank in ranks]


# Votes and the judgments they make


@dataclass(frozen=True)
class Judgment:
    """One annotator on one pair of completions (first < second) of one item."""

    annotator: str
    item: int
    first: int
    second: int
    outcome: str  # first | second | tie | both-bad


def judgments(votes: Iterable[Vote]) -> list[Judgment]:
    """Pairwise votes give one judgment, rankings one per pair of completions; skips give none. When one
    annotator judged the same pair twice (say pairwise and rank mode), the later vote counts."""
    found: dict[tuple, Judgment] = {}
    for vote in sorted(votes, key=lambda v: v.id):
        if vote.choice == "skip":
            continue
        for first, second in itertools.combinations(sorted(vote.shown), 2):
            outcome = _outcome(vote, first, second)
            found[(vote.annotator, vote.item, first, second)] = Judgment(
                vote.annotator, vote.item, first, second, outcome
            )
    return list(found.values())


def _outcome(vote: Vote, first: int, second: int) -> str:
    if vote.choice in ("tie", "both-bad"):
        return vote.choice
    if vote.choice in ("A", "B"):
        winner = vote.shown[0] if vote.choice == "A" else vote.shown[1]
        return "first" if winner == first else "second"
    if vote.choice == "rank":
        a, b = vote.ranking[first], vote.ranking[second]
        return "tie" if a == b else "first" if a < b else "second"
    raise ValueError(f"unknown choice {vote.choice!r} in vote {vote.id}")


# Aggregation into preference rows


@dataclass
class Aggregate:
    rows: list[dict]
    pairs: int = 0  # pairs with at least one judgment
    kept: int = 0
    ties_dropped: int = 0
    ties_kept: int = 0
    both_bad: int = 0
    too_few: int = 0


def aggregate(
    candidates: list[dict],
    votes: Iterable[Vote],
    *,
    ties: str = "drop",
    min_votes: int = 1,
    scores: Mapping[tuple[int, int], dict] | None = None,
) -> Aggregate:
    """Preference rows from votes: majority per pair of completions, with margin and weight (see the docstring).
    `scores`: (row, completion) -> {attribute: mean rubric score} (`completion_scores`); a pair with any of them
    carries them in its `scores` field, {attribute: {"chosen": x, "rejected": y}} (a side nobody scored left out)."""
    if ties not in TIES:
        raise AlignError(f"--ties must be drop or keep (got {ties!r})")
    if min_votes < 1:
        raise AlignError(f"--min-votes must be at least 1 (got {min_votes})")
    counts: dict[tuple[int, int, int], Counter] = defaultdict(Counter)
    for judgment in judgments(votes):
        counts[(judgment.item, judgment.first, judgment.second)][judgment.outcome] += 1
    result = Aggregate(rows=[], pairs=len(counts))
    for (item, first, second), tally in sorted(counts.items()):
        n = sum(tally.values())
        if n < min_votes:
            result.too_few += 1
            continue
        if tally["both-bad"] * 2 > n:
            result.both_bad += 1
            continue
        row = candidates[item]
        if tally["first"] == tally["second"]:
            if ties == "drop":
                result.ties_dropped += 1
                continue
            result.ties_kept += 1
            chosen, rejected, wins, losses = first, second, tally["first"], tally["second"]
            weight = (n - tally["both-bad"]) / n
        else:
            result.kept += 1
            if tally["first"] > tally["second"]:
                chosen, rejected, wins, losses = first, second, tally["first"], tally["second"]
            else:
                chosen, rejected, wins, losses = second, first, tally["second"], tally["first"]
            weight = wins / n
        out = {
            "prompt": row["prompt"],
            "chosen": row["completions"][chosen],
            "rejected": row["completions"][rejected],
            "margin": (wins - losses) / n,
            "weight": weight,
        }
        if ties == "keep":
            out["tie"] = wins == losses
        if scores:
            pair = _pair_scores(scores.get((item, chosen), {}), scores.get((item, rejected), {}))
            if pair:
                out["scores"] = pair
        result.rows.append(out)
    return result


def completion_scores(rubric: dict) -> dict[tuple[int, int], dict[str, float]]:
    """(row, completion) -> {attribute: mean score}, from `rubric_scores`'s items."""
    found: dict[tuple[int, int], dict[str, float]] = defaultdict(dict)
    for entry in rubric.get("items", []):
        found[(entry["row"], entry["completion"])][entry["attribute"]] = entry["mean"]
    return dict(found)


def _pair_scores(chosen: dict[str, float], rejected: dict[str, float]) -> dict:
    """{attribute: {"chosen": x, "rejected": y}} from each reply's {attribute: score}."""
    pair: dict[str, dict[str, float]] = {}
    for attribute in sorted(set(chosen) | set(rejected)):
        pair[attribute] = {}
        if attribute in chosen:
            pair[attribute]["chosen"] = chosen[attribute]
        if attribute in rejected:
            pair[attribute]["rejected"] = rejected[attribute]
    return pair


# Agreement (the statistics themselves: align/stats.py)


def agreement(votes: Sequence[Vote]) -> dict:
    """The agreement numbers over pair judgments: the meta contract DPO reads, plus kappa per annotator pair."""
    found = judgments(votes)
    units: dict[tuple, dict] = defaultdict(dict)
    for judgment in found:
        units[(judgment.item, judgment.first, judgment.second)][judgment.annotator] = judgment.outcome
    annotators = sorted({judgment.annotator for judgment in found})
    kappas = []
    for a, b in itertools.combinations(annotators, 2):
        shared = [(unit[a], unit[b]) for unit in units.values() if a in unit and b in unit]
        if shared:
            kappas.append({"annotators": [a, b], "shared": len(shared), "kappa": cohen_kappa(shared)})
    return {
        "krippendorff_alpha": krippendorff_alpha(units.values()),
        "pairwise_agreement": pairwise_agreement(units.values()),
        "annotators": len(annotators),
        "votes": sum(vote.counted for vote in votes),
        "cohen_kappa": kappas,
    }


# Feedback: labels on single completions (KTO), and rubric scores


@dataclass(frozen=True)
class Label:
    """One annotator's verdict on one completion of one candidates row."""

    annotator: str
    row: int
    completion: int
    desirable: bool
    source: str  # thumbs | both-bad | pairwise


def feedback_labels(candidates: list[dict], votes: Iterable[Vote], *, include_pairwise: bool = False) -> list[Label]:
    """Thumbs votes, both-bad votes (every completion shown is undesirable) and, with `include_pairwise`, pairwise
    votes (the chosen completion desirable, the other not) as labels on completions. When one annotator labelled
    the same completion twice, the later vote counts."""
    thumbs_rows = item_rows(candidates, "thumbs")
    found: dict[tuple, Label] = {}
    for vote in sorted(votes, key=lambda v: v.id):
        verdicts: list[tuple[int, int, bool, str]] = []  # (row, completion, desirable, source)
        if vote.mode == "thumbs" and vote.choice in ("up", "down"):
            verdicts.append((thumbs_rows[vote.item], vote.shown[0], vote.choice == "up", "thumbs"))
        elif vote.mode != "thumbs" and vote.choice == "both-bad":
            verdicts += [(vote.item, completion, False, "both-bad") for completion in vote.shown]
        elif include_pairwise and vote.mode == "pairwise" and vote.choice in ("A", "B"):
            chosen, rejected = vote.shown if vote.choice == "A" else vote.shown[::-1]
            verdicts += [(vote.item, chosen, True, "pairwise"), (vote.item, rejected, False, "pairwise")]
        for row, completion, desirable, source in verdicts:
            found[(vote.annotator, row, completion)] = Label(vote.annotator, row, completion, desirable, source)
    return list(found.values())


@dataclass
class FeedbackAggregate:
    rows: list[dict]
    completions: int = 0  # completions with at least one label
    desirable: int = 0
    undesirable: int = 0
    split: int = 0  # as many desirable as undesirable labels: dropped
    too_few: int = 0
    sources: dict | None = None  # labels by source: thumbs, both-bad, pairwise


def aggregate_feedback(
    candidates: list[dict], votes: Iterable[Vote], *, include_pairwise: bool = False, min_votes: int = 1
) -> FeedbackAggregate:
    """Feedback rows from votes: the majority label per completion (see the module docstring)."""
    if min_votes < 1:
        raise AlignError(f"--min-votes must be at least 1 (got {min_votes})")
    labels = feedback_labels(candidates, votes, include_pairwise=include_pairwise)
    tally: dict[tuple[int, int], Counter] = defaultdict(Counter)
    for label in labels:
        tally[(label.row, label.completion)][label.desirable] += 1
    result = FeedbackAggregate(rows=[], completions=len(tally), sources=dict(Counter(label.source for label in labels)))
    for (row, completion), counts in sorted(tally.items()):
        if sum(counts.values()) < min_votes:
            result.too_few += 1
            continue
        if counts[True] == counts[False]:
            result.split += 1
            continue
        desirable = counts[True] > counts[False]
        result.desirable += desirable
        result.undesirable += not desirable
        candidate = candidates[row]
        result.rows.append(
            {"prompt": candidate["prompt"], "completion": candidate["completions"][completion], "label": desirable}
        )
    return result


def feedback_agreement(candidates: list[dict], votes: Sequence[Vote], *, include_pairwise: bool = False) -> dict:
    """Agreement on the desirable / undesirable labels, completion by completion (the keys `agreement` gives)."""
    units: dict[tuple, dict] = defaultdict(dict)
    for label in feedback_labels(candidates, votes, include_pairwise=include_pairwise):
        units[(label.row, label.completion)][label.annotator] = label.desirable
    return {
        "krippendorff_alpha": krippendorff_alpha(units.values()),
        "pairwise_agreement": pairwise_agreement(units.values()),
        "annotators": len({annotator for unit in units.values() for annotator in unit}),
        "votes": sum(vote.counted for vote in votes),
        "cohen_kappa": [],
    }


def rubric_scores(candidates: list[dict], votes: Iterable[Vote]) -> dict:
    """Rubric scores per completion and attribute: {"items": [{"row", "completion", "attribute", "mean", "n",
    "spread"}, ...], "attributes": {name: {"scores", "completions", "mean", "exact_agreement", "within_one"}}}, or
    {} without any. A vote's key is the attribute (thumbs: its one completion) or `attribute:LETTER`, the completion
    shown under that letter. Agreement: the share of pairs of annotators on the same completion who gave the same
    score, and who were at most one point apart. When one annotator scored a completion twice, the later counts."""
    thumbs_rows = item_rows(candidates, "thumbs")
    found: dict[tuple, float] = {}
    for vote in sorted(votes, key=lambda v: v.id):
        for key, value in (vote.scores or {}).items():
            attribute, _, letter = key.partition(":")
            position = LETTERS.find(letter) if letter else 0
            if not attribute or position < 0 or position >= len(vote.shown) or (not letter and len(vote.shown) > 1):
                continue  # scores that are not rubric scores (the JSON API takes any names without --rubric)
            row = thumbs_rows[vote.item] if vote.mode == "thumbs" else vote.item
            found[(attribute, row, vote.shown[position], vote.annotator)] = float(value)
    by_unit: dict[tuple, dict] = defaultdict(dict)
    for (attribute, row, completion, annotator), value in found.items():
        by_unit[(attribute, row, completion)][annotator] = value
    if not by_unit:
        return {}
    items, attributes = [], {}
    for (attribute, row, completion), scored in sorted(by_unit.items()):
        values = list(scored.values())
        items.append(
            {
                "row": row,
                "completion": completion,
                "attribute": attribute,
                "mean": statistics.fmean(values),
                "n": len(values),
                "spread": max(values) - min(values),
            }
        )
    for attribute in sorted({key[0] for key in by_unit}):
        units = [scored for key, scored in by_unit.items() if key[0] == attribute]
        scores = [value for unit in units for value in unit.values()]
        attributes[attribute] = {
            "scores": len(scores),
            "completions": len(units),
            "mean": statistics.fmean(scores),
            "exact_agreement": pairwise_agreement(units),
            "within_one": pairwise_agreement(units, tolerance=1),
        }
    return {"items": items, "attributes": attributes}


# The Quality tab


def quality(candidates: list[dict], votes: Sequence[Vote]) -> dict:
    """Per annotator and overall: votes, skips, median seconds, left share, tie and both-bad rates, gold accuracy;
    plus the agreement numbers."""

    def summary(name: str, chosen: list[Vote]) -> dict:
        counted = [vote for vote in chosen if vote.counted]
        decisive = [vote for vote in counted if vote.choice in ("A", "B")]
        seconds = [vote.seconds for vote in counted if vote.seconds is not None]
        gold = [_gold_correct(candidates, vote) for vote in counted]
        gold = [correct for correct in gold if correct is not None]
        return {
            "annotator": name,
            "votes": len(counted),
            "skips": len(chosen) - len(counted),
            "median_seconds": statistics.median(seconds) if seconds else None,
            "left_share": sum(vote.choice == "A" for vote in decisive) / len(decisive) if decisive else None,
            "tie_rate": sum(vote.choice == "tie" for vote in counted) / len(counted) if counted else None,
            "both_bad_rate": sum(vote.choice == "both-bad" for vote in counted) / len(counted) if counted else None,
            "gold_votes": len(gold),
            "gold_accuracy": sum(gold) / len(gold) if gold else None,
        }

    by_annotator: dict[str, list[Vote]] = defaultdict(list)
    for vote in votes:
        by_annotator[vote.annotator].append(vote)
    return {
        "annotators": [summary(name, by_annotator[name]) for name in sorted(by_annotator)],
        "overall": summary("(all)", list(votes)),
        "agreement": agreement(votes),
    }


def _gold_correct(candidates: list[dict], vote: Vote) -> bool | None:
    """Did the vote pick the known best completion? None when the row has no gold or the gold was not shown, and for
    a thumbs vote (one completion judged alone)."""
    if vote.mode == "thumbs":
        return None
    gold = candidates[vote.item].get("gold")
    if gold is None or gold not in vote.shown:
        return None
    if vote.choice in ("A", "B"):
        return vote.shown[0 if vote.choice == "A" else 1] == gold
    if vote.choice == "rank":
        best = min(vote.ranking[i] for i in vote.shown)
        return vote.ranking[gold] == best and sum(vote.ranking[i] == best for i in vote.shown) == 1
    return False  # a tie or both-bad did not pick it


# Annotators


def add_annotator(registry, name: str, password: str, *, admin: bool = False) -> None:
    check_name(name, "annotator")
    registry.labels.add_annotator(name, hash_password(password), admin=admin)


def list_annotators(registry) -> list[dict]:
    """Each annotator with their standing votes (skips and undone votes left out), over every candidates version."""
    return registry.labels.list_annotators()


# The store: leases and votes, kept in the registry (align/registry/labels.py)


@dataclass(frozen=True)
class Assignment:
    status: str  # item | wait | done
    lease: int | None = None
    item: int | None = None
    shown: tuple[int, ...] = ()
    renewed: bool = False  # an existing live lease (a reload, or a restart) rather than a new one


@dataclass(frozen=True)
class Receipt:
    vote: int
    item: int
    duplicate: bool = False  # the same lease voted twice (a double click, a retried request): recorded once


@dataclass(frozen=True)
class Undone:
    vote: Vote  # the vote retracted
    undo: int  # the id of the undo row


@dataclass(frozen=True)
class Progress:
    items: int
    complete: int  # items with `overlap` counted votes
    votes: int  # counted votes so far
    needed: int  # items * overlap
    mine: int  # this annotator's counted votes


class Tally:
    """What the standing votes of one candidates version in one mode add up to: counted votes per item, the items
    not done yet by count (for choose_item, as positions in the serving order), each annotator's items. Kept up to
    date from the rows appended since it last looked (comparisons is append-only; an undo row retracts the vote it
    names), so handing out an item or showing the progress never reads every vote again. Not thread-safe:
    LabelStore holds a lock around it."""

    REBUILD = 1000  # touching more items than this at once rebuilds the levels in one pass (the first read)

    def __init__(self, items: int, overlap: int):
        self.items, self.overlap = items, overlap
        self.last = 0  # the id of the newest row read
        self.counted: Counter = Counter()  # item -> votes that count towards the overlap (skips excluded)
        self.order: list[int] | None = None  # position -> item (None: row order)
        self.rank: list[int] | None = None  # item -> position
        self.levels: list[list[int]] = [list(range(items))] + [[] for _ in range(overlap - 1)]
        self.complete = 0  # items with `overlap` counted votes
        self.votes = 0  # counted votes
        self.mine: dict[str, Counter] = defaultdict(Counter)  # annotator -> item -> standing votes (skips too)
        self.mine_counted: Counter = Counter()  # annotator -> counted votes

    def set_order(self, order: Sequence[int] | None) -> None:
        """Serve the items in this order (a permutation of the items; None: row order) from now on."""
        if order is not None and sorted(order) != list(range(self.items)):
            raise ValueError(f"an order must hold each of the {self.items} items once")
        self.order = list(order) if order is not None else None
        self.rank = None
        if self.order is not None:
            self.rank = [0] * self.items
            for position, item in enumerate(self.order):
                self.rank[item] = position
        self._rebuild()

    def update(self, rows: Iterable[tuple[int, str, int, str, str, bool]], mode: str) -> None:
        """Apply rows from LabelTables.rows_after: (id, mode, item, annotator, choice, retracted)."""
        before: dict[int, int] = {}  # item -> its counted votes before these rows
        for row_id, row_mode, item, annotator, choice, retracted in rows:
            self.last = max(self.last, row_id)
            if row_mode != mode:
                continue
            sign = -1 if retracted else 1
            mine = self.mine[annotator]
            mine[item] += sign
            if not mine[item]:
                del mine[item]
            if choice != "skip":
                before.setdefault(item, self.counted[item])
                self.counted[item] += sign
                self.votes += sign
                self.mine_counted[annotator] += sign
        for item, count in before.items():
            self.complete += (self.counted[item] >= self.overlap) - (count >= self.overlap)
        if len(before) > self.REBUILD:
            self._rebuild()
            return
        for item, count in before.items():
            position = item if self.rank is None else self.rank[item]
            if count < self.overlap:
                level = self.levels[count]
                del level[bisect.bisect_left(level, position)]
            if self.counted[item] < self.overlap:
                bisect.insort(self.levels[self.counted[item]], position)

    def choose(self, annotator: str, held: Mapping[int, int], start: int = 0) -> tuple[int | None, str]:
        return choose_item(
            self.levels,
            overlap=self.overlap,
            mine=self.mine.get(annotator, {}),
            votes=self.counted,
            held=held,
            order=self.order,
            rank=self.rank,
            start=start,
        )

    def _rebuild(self) -> None:
        """The levels in one pass over the positions."""
        self.levels = [[] for _ in range(self.overlap)]
        for position in range(self.items):
            count = self.counted[position if self.order is None else self.order[position]]
            if count < self.overlap:
                self.levels[count].append(position)


class LabelStore:
    """Leases and votes for one candidates version in one mode. Safe to share between threads: the registry
    gives each thread its own SQLite connection, and every write is one BEGIN IMMEDIATE transaction."""

    def __init__(
        self,
        registry,
        candidates,
        *,
        mode: str = "pairwise",
        overlap: int = 2,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock=time.time,
        seed: int | None = None,
        rubric: Sequence[str] | str | None = None,
        order: str = "sequential",
        scorer=None,
    ):
        """`order`: sequential, random or uncertainty (align/label_order.py); `scorer`: the reward model of the
        uncertainty order (an align.label_order.OrderScorer)."""
        if mode not in MODES:
            raise AlignError(f"unknown --mode {mode!r}: choose pairwise, rank or thumbs")
        self.rubric = check_rubric(rubric)
        if overlap < 1:
            raise AlignError(f"--overlap must be at least 1 (got {overlap})")
        if lease_seconds <= 0:
            raise AlignError(f"the lease time must be positive (got {lease_seconds} s)")
        check_order(order, scorer.ref if scorer is not None else None, mode)
        self.mode, self.overlap, self.lease_seconds, self.clock = mode, overlap, lease_seconds, clock
        self.order, self.scorer = order, scorer
        self.version = registry.resolve(candidates)
        self.rows = registry.rows(self.version) if self.version.kind == "candidates" else []
        check_candidates(self.version, self.rows, mode)
        self.items = label_items(self.rows, mode, self.version.content_hash)
        self.item_rows = item_rows(self.rows, mode)
        self.tables = registry.labels
        self._random = random.Random(seed) if seed is not None else random.SystemRandom()
        self._random_lock = threading.Lock()
        self._tally = Tally(len(self.items), overlap)
        self._tally_lock = threading.Lock()
        self.ordered = order == "sequential"  # whether the order asked for is in force (uncertainty: once scored)
        self.scoring: threading.Thread | None = None  # the background scoring of the uncertainty order
        if order == "random":
            self._tally.set_order(random_order(len(self.items), self.version.content_hash))
            self.ordered = True
        elif order == "uncertainty":
            saved = scorer.saved(self.version, self.rows)
            if saved is not None:  # scored at an earlier start
                self.use_scores(saved)
            else:
                scorer.check(self.version, self.rows)  # loads the reward model: what cannot score fails here
                self.scoring = scorer.start(self.version, self.rows, self.use_scores)

    def use_scores(self, scores: list[list[float]]) -> None:
        """Order by the reward model's uncertainty from now on; `scores[row]`: each completion's score."""
        order = uncertainty_order(self.items, self.item_rows, scores)
        with self._tally_lock:
            self._tally.set_order(order)
            self.ordered = True

    def order_text(self) -> str:
        """The order in force, as the app shows it."""
        if self.order != "uncertainty":
            return self.order
        if self.ordered:
            return f"uncertainty ({self.scorer.ref}: least sure first)"
        return f"uncertainty ({self.scorer.ref} is scoring the items: row order until then)"

    # Reading

    def votes(self, *, all_modes: bool = True, upto: int | None = None) -> list[Vote]:
        """The votes that stand (undone ones left out), oldest first."""
        return self.tables.votes(self.version.id, mode=None if all_modes else self.mode, upto=upto)

    def lease_shown(self, lease: int) -> tuple[int, ...] | None:
        """The completions a lease shows, in order (None for an unknown lease)."""
        if not _is_integer(lease):
            return None
        found = self.tables.lease(lease)
        return found.shown if found and found.dataset_id == self.version.id else None

    def progress(self, annotator: str) -> Progress:
        with self._tally_lock:
            tally = self._tallied()
            return Progress(
                items=len(self.items),
                complete=tally.complete,
                votes=tally.votes,
                needed=len(self.items) * self.overlap,
                mine=tally.mine_counted[annotator],
            )

    # Writing: one transaction each

    def current(self, annotator: str) -> Assignment:
        """The annotator's live lease (after a reload or a restart), else a new lease on the next item."""
        now = self.clock()
        with self.tables.transaction():
            live = self.tables.live_lease(self.version.id, self.mode, annotator, now)
            if live is not None:
                return Assignment("item", live.id, live.item, live.shown, renewed=True)
            item, status = self._choose(annotator, now)
            if item is None:
                return Assignment(status)
            shown = list(self.items[item])
            with self._random_lock:
                self._random.shuffle(shown)
            lease = self._lease(annotator, item, shown, now)
            return Assignment("item", lease, item, tuple(shown))

    def vote(
        self,
        annotator: str,
        lease: int,
        choice: str,
        *,
        ranking: Sequence[int] | None = None,
        reason: str | None = None,
        scores: dict | None = None,
    ) -> Receipt:
        """Record one vote on a leased item. `ranking` (rank mode): the rank of each completion in the order shown.
        `scores`: with a rubric, 1-5 per attribute (see check_rubric_scores). Refused (LabelError) unless the lease
        is this annotator's and still stands."""
        if not _is_integer(lease):
            low, high = INTEGER_RANGE
            raise LabelError(f"field 'lease' must be a whole number from {low} to {high} (got {lease!r})")
        choices = CHOICES[self.mode]
        if choice not in choices:
            raise LabelError(f"choice {choice!r} is not one of {', '.join(choices)} ({self.mode} mode)")
        if (choice == "rank") != (ranking is not None):
            raise LabelError("a rank vote gives a ranking, and only a rank vote does")
        if scores is not None and not _is_scores(scores):
            raise LabelError(f"field 'scores' must map rubric names to finite numbers (got {scores!r})")
        reason = (reason or "").strip() or None
        now = self.clock()
        tables = self.tables
        with tables.transaction():
            held = tables.lease(lease)
            if held is None or held.annotator != annotator or held.dataset_id != self.version.id:
                raise LabelError(f"item lease {lease} is not leased to {annotator!r}: vote on the item you were shown")
            if held.mode != self.mode:
                raise LabelError(f"item lease {lease} belongs to {held.mode} mode, not {self.mode}")
            item, shown = held.item, list(held.shown)
            if scores and self.rubric:
                check_rubric_scores(scores, self.rubric, LETTERS[: len(shown)])
            used = tables.vote_on_lease(lease)
            if used is not None:
                if tables.is_undone(used):
                    raise LabelError(f"the vote on item lease {lease} was undone: vote on the item you are shown now")
                return Receipt(used, item, duplicate=True)
            if held.released_at is not None:
                raise LabelError(f"item lease {lease} was given up: vote on the item you are shown now")
            standing = tables.votes(self.version.id, mode=self.mode, item=item)
            if any(vote.annotator == annotator for vote in standing):
                raise LabelError(f"{annotator!r} already voted on item {item}")
            counted = sum(vote.counted for vote in standing)
            if choice != "skip":
                others = 0
                if held.expires_at <= now:  # an expired lease: only while the item still has an open slot
                    others = tables.holders(self.version.id, self.mode, now, item=item, excluding=annotator)[item]
                if counted + others >= self.overlap:
                    raise LabelError(f"the lease on item {item} expired and the item went to other annotators")
            by_index = None
            if ranking is not None:
                if len(ranking) != len(shown):
                    raise LabelError(f"the ranking has {len(ranking)} ranks for {len(shown)} completions shown")
                dense = normalize_ranking(list(ranking))
                by_index = [0] * len(self.rows[self.item_rows[item]]["completions"])
                for position, index in enumerate(shown):
                    by_index[index] = dense[position]
            vote = tables.add_vote(
                self.version.id,
                self.mode,
                item,
                annotator,
                shown,
                choice,
                ranking=by_index,
                scores=scores,
                reason=reason,
                seconds=round(max(now - held.leased_at, 0.0), 3),
                lease_id=lease,
            )
            tables.release_lease(lease, now)
            return Receipt(vote, item)

    def undo(self, annotator: str) -> tuple[Undone | None, Assignment]:
        """Retract the annotator's last standing vote (in this mode) by appending an undo row, and lease that
        item to them again, shown the same way. Returns (what was undone or None, what to show now)."""
        now = self.clock()
        tables = self.tables
        with tables.transaction():
            mine = tables.votes(self.version.id, mode=self.mode, annotator=annotator)
            if not mine:
                undone = None
            else:
                last = mine[-1]
                undone = Undone(last, tables.add_undo(self.version.id, self.mode, last))
                tables.release_leases(self.version.id, self.mode, annotator, now)
                counted = sum(vote.counted for vote in tables.votes(self.version.id, mode=self.mode, item=last.item))
                holders = tables.holders(self.version.id, self.mode, now, item=last.item)[last.item]
                if counted + holders < self.overlap:  # an undone skip may have let the item fill up meanwhile
                    lease = self._lease(annotator, last.item, list(last.shown), now)
                    return undone, Assignment("item", lease, last.item, last.shown)
        return undone, self.current(annotator)

    # Inside a transaction

    def _choose(self, annotator: str, now: float) -> tuple[int | None, str]:
        held = self.tables.holders(self.version.id, self.mode, now, excluding=annotator)
        start = random_start(len(self.items), self.version.content_hash, annotator) if self.order == "random" else 0
        with self._tally_lock:
            return self._tallied().choose(annotator, held, start)

    def _tallied(self) -> Tally:
        """The tally, brought up to date with the rows committed since it last looked (call with the lock held,
        and never after this thread's own writes in an open transaction: a rollback would leave them counted)."""
        self._tally.update(self.tables.rows_after(self.version.id, self._tally.last), self.mode)
        return self._tally

    def _lease(self, annotator: str, item: int, shown: list[int], now: float) -> int:
        return self.tables.add_lease(self.version.id, self.mode, item, annotator, shown, now, now + self.lease_seconds)


def _is_integer(value) -> bool:
    """A whole number an SQLite INTEGER holds."""
    return isinstance(value, int) and not isinstance(value, bool) and INTEGER_RANGE[0] <= value <= INTEGER_RANGE[1]


def _is_scores(scores) -> bool:
    """A mapping of name to finite number (a JSON number the registry stores and reads back as it was)."""
    return isinstance(scores, dict) and all(
        isinstance(key, str) and (_is_integer(value) or isinstance(value, float) and math.isfinite(value))
        for key, value in scores.items()
    )


# align data from-labels


def from_labels(
    registry,
    candidates: str,
    *,
    name: str,
    ties: str = "drop",
    min_votes: int = 1,
    kind: str = "preference",
    include_pairwise: bool = False,
):
    """Aggregate the standing votes on a candidates version into a `preference` version, or with kind="feedback"
    a `feedback` version (thumbs and both-bad votes; pairwise votes too with `include_pairwise`). Returns (version,
    Aggregate or FeedbackAggregate, agreement). Lineage: the candidates, and a snapshot of the votes used
    ('comparisons:ID'). Rubric scores, averaged per completion and attribute, go into the version's meta.
    `arena:NAME` first snapshots that arena's battles as candidates with their comparisons (align.arena.snapshot)."""
    check_name(name)
    if kind not in KINDS:
        raise AlignError(f"--kind must be preference or feedback (got {kind!r})")
    if include_pairwise and kind != "feedback":
        raise AlignError("--include-pairwise makes feedback rows of pairwise votes: it goes with --kind feedback")
    if isinstance(candidates, str) and candidates.startswith("arena:"):  # arena votes: snapshot them first
        from align.arena import snapshot

        candidates = snapshot(registry, candidates.partition(":")[2])
    version = registry.resolve(candidates, kind="candidates")
    rows = registry.rows(version)
    tables = registry.labels
    with tables.transaction():  # one consistent read of the append-only table
        last = tables.last_row(version.id)
        votes = tables.votes(version.id, upto=last) if last is not None else []
    if not any(vote.counted for vote in votes):
        raise AlignError(f"no votes on {version.ref} yet: collect some with `align label --candidates {version.ref}`")
    if kind == "feedback":
        result = aggregate_feedback(rows, votes, include_pairwise=include_pairwise, min_votes=min_votes)
        if not result.rows:
            pairwise = "" if include_pairwise else "; --include-pairwise adds pairwise votes"
            raise AlignError(
                f"no feedback rows from {len(votes)} votes on {version.ref}: they hold no thumbs or both-bad votes, "
                f"or every completion was split evenly ({result.split}) or below --min-votes {min_votes} "
                f"({result.too_few}){pairwise}"
            )
        numbers = feedback_agreement(rows, votes, include_pairwise=include_pairwise)
        counts = {
            "labelled": result.completions,
            "desirable": result.desirable,
            "undesirable": result.undesirable,
            "split": result.split,
            "below_min_votes": result.too_few,
            "labels_by_source": result.sources,
        }
    else:
        votes = [vote for vote in votes if vote.mode != "thumbs"]  # one reply alone makes no pair
        if not any(vote.counted for vote in votes):
            raise AlignError(
                f"no pairwise or rank votes on {version.ref}: thumbs votes make feedback rows (--kind feedback)"
            )
        scores = completion_scores(rubric_scores(rows, votes))
        result = aggregate(rows, votes, ties=ties, min_votes=min_votes, scores=scores)
        if not result.rows:
            raise AlignError(
                f"no preference pairs left from {len(votes)} votes on {version.ref}: {result.ties_dropped} ties "
                f"dropped (--ties keep keeps them), {result.both_bad} both bad, {result.too_few} below --min-votes "
                f"{min_votes}"
            )
        numbers = agreement(votes)
        counts = {
            "judged": result.pairs,
            "kept": result.kept,
            "ties_kept": result.ties_kept,
            "ties_dropped": result.ties_dropped,
            "both_bad": result.both_bad,
            "below_min_votes": result.too_few,
        }
    used = []
    for v in votes:
        entry = {"id": v.id, "item": v.item, "annotator": v.annotator, "shown": list(v.shown), "choice": v.choice,
                 "ranking": list(v.ranking) if v.ranking else None}  # fmt: skip
        if v.mode == "thumbs":
            entry["mode"] = v.mode
        if v.scores:
            entry["scores"] = v.scores
        used.append(entry)
    content_hash = hashlib.sha256(json.dumps(used, sort_keys=True).encode("utf-8")).hexdigest()
    snapshot = tables.add_snapshot(version.id, last, len(votes), content_hash)
    meta = {
        "agreement": {key: numbers[key] for key in ("krippendorff_alpha", "pairwise_agreement", "annotators", "votes")},
        "cohen_kappa": numbers["cohen_kappa"],
        "candidates": version.ref,
        "comparisons_snapshot": {
            "id": snapshot,
            "last_comparison": last,
            "standing_votes": len(votes),  # skips included, undone votes not
            "sha256": content_hash,
        },
        "min_votes": min_votes,
    }
    if kind == "feedback":
        meta |= {"include_pairwise": include_pairwise, "completions": counts}
    else:
        meta |= {"ties": ties, "pairs": counts}
    rubric = rubric_scores(rows, votes)
    if rubric:
        meta["rubric"] = rubric
    made = registry.register(
        result.rows,
        name=name,
        kind=kind,
        parents=[(version, "candidates"), (f"comparisons:{snapshot}", "votes")],
        meta=meta,
    )
    return made, result, numbers
