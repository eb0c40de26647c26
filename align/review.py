"""Human review of machine-made sft rows (what `align expand` made): who sees which row next, the decisions, and
what they add up to.

    align review --data expanded                              # the Review app (ui/review_app.py)
    align data from-review expanded --name expanded-clean     # the accepted and edited rows, a new sft version
    align data from-review expanded --name train --with-seeds # ... after the seed rows the expansion started from

Items. The machine-made rows of an sft version (those with an origin), in row order: item i is the i-th of them.
A version without any has nothing to review, and is refused.

Decisions. accept (the row as it is), edit (the row as the reviewer rewrote it: the task and the answer), reject
(a reason is required), or skip (someone else decides). They are rows of the append-only comparisons table with
mode 'review' (an edit keeps the edited messages), one transaction each, committed (SQLite, synchronous=FULL)
before the next row is handed out: what was acknowledged survives a kill -9. Leases, overlap (each row to
`overlap` distinct reviewers; a skip does not count), login and undo work as for votes (align/labels.py).

From reviews to rows. A row is kept when more of its reviews accept or edit it than reject it (a tie is dropped);
it is kept as the newest edit when it has one, else as it was. Its origin gains "review": the decision ("edit" or
"accept") and the reviews' counts. Rows nobody reviewed are left out.

Agreement, where rows were reviewed by two or more people: on keep (accept or edit) against reject, Cohen's kappa
for each pair of reviewers, Krippendorff's alpha and the raw share of agreeing pairs (align/stats.py).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from align.errors import AlignError
from align.expansion import origin_of
from align.labels import (
    DEFAULT_LEASE_SECONDS,
    INTEGER_RANGE,
    Assignment,
    LabelError,
    Progress,
    Receipt,
    Tally,
    Undone,
)
from align.registry.labels import Vote
from align.registry.registry import check_name
from align.stats import cohen_kappa, krippendorff_alpha, pairwise_agreement

MODE = "review"
DECISIONS = ("accept", "edit", "reject", "skip")
KEEP = ("accept", "edit")


def machine_rows(version, rows: list[dict]) -> list[int]:
    """The row indices of the machine-made rows (the items, in order); refuses a version without any."""
    if version.kind != "sft":
        raise AlignError(
            f"dataset {version.ref} holds '{version.kind}' rows, but reviews are of 'sft' rows that `align expand` made"
        )
    found = [index for index, row in enumerate(rows) if row.get("origin")]
    if not found:
        raise AlignError(
            f"dataset {version.ref} has no machine-made rows (no row has an origin): align review checks the rows "
            f"`align expand` made, e.g. `align expand --from {version.name} --name expanded`, then "
            "`align review --data expanded`"
        )
    return found


class ReviewStore:
    """Leases and decisions for the machine-made rows of one sft version. Safe to share between threads: the
    registry gives each thread its own SQLite connection, and every write is one BEGIN IMMEDIATE transaction."""

    def __init__(
        self,
        registry,
        data,
        *,
        overlap: int = 1,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock=time.time,
    ):
        if overlap < 1:
            raise AlignError(f"--overlap must be at least 1 (got {overlap})")
        if lease_seconds <= 0:
            raise AlignError(f"the lease time must be positive (got {lease_seconds} s)")
        self.overlap, self.lease_seconds, self.clock = overlap, lease_seconds, clock
        self.version = registry.resolve(data)
        self.rows = registry.rows(self.version) if self.version.kind == "sft" else []
        self.items = machine_rows(self.version, self.rows)  # item -> row index
        self.tables = registry.labels
        self._tally = Tally(len(self.items), overlap)
        self._tally_lock = threading.Lock()

    def row(self, item: int) -> dict:
        return self.rows[self.items[item]]

    def reviews(self, *, upto: int | None = None) -> list[Vote]:
        """The decisions that stand (undone ones left out), oldest first."""
        return self.tables.votes(self.version.id, mode=MODE, upto=upto)

    def progress(self, annotator: str) -> Progress:
        with self._tally_lock:
            tally = self._tallied()
            return Progress(len(self.items), tally.complete, tally.votes, len(self.items) * self.overlap,
                            tally.mine_counted[annotator])  # fmt: skip

    def current(self, annotator: str) -> Assignment:
        """The reviewer's live lease (after a reload or a restart), else a new lease on the next row."""
        now = self.clock()
        with self.tables.transaction():
            live = self.tables.live_lease(self.version.id, MODE, annotator, now)
            if live is not None:
                return Assignment("item", live.id, live.item, (), renewed=True)
            held = self.tables.holders(self.version.id, MODE, now, excluding=annotator)
            with self._tally_lock:
                item, status = self._tallied().choose(annotator, held)
            if item is None:
                return Assignment(status)
            lease = self.tables.add_lease(self.version.id, MODE, item, annotator, [], now, now + self.lease_seconds)
            return Assignment("item", lease, item)

    def decide(
        self,
        annotator: str,
        lease: int,
        decision: str,
        *,
        user: str | None = None,
        answer: str | None = None,
        reason: str | None = None,
    ) -> Receipt:
        """Record one decision on a leased row. `user` and `answer`: the edited task and answer (edit only).
        Refused (LabelError) unless the lease is this reviewer's and still stands."""
        low, high = INTEGER_RANGE
        if isinstance(lease, bool) or not isinstance(lease, int) or not low <= lease <= high:
            raise LabelError(f"field 'lease' must be a whole number (got {lease!r})")
        if decision not in DECISIONS:
            raise LabelError(f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
        reason = (reason or "").strip() or None
        if decision == "reject" and reason is None:
            raise LabelError("a rejection needs a reason: say what is wrong with the row")
        edited = None
        if decision == "edit":
            if not (user or "").strip() or not (answer or "").strip():
                raise LabelError("an edit gives both the task and the answer, neither empty")
            edited = [{"role": "user", "content": user.strip()}, {"role": "assistant", "content": answer.strip()}]
        elif user is not None or answer is not None:
            raise LabelError(f"only an edit gives a task and an answer (not {decision})")
        now = self.clock()
        tables = self.tables
        with tables.transaction():
            held = tables.lease(lease)
            if held is None or held.annotator != annotator or held.dataset_id != self.version.id or held.mode != MODE:
                raise LabelError(f"row lease {lease} is not leased to {annotator!r}: decide on the row you were shown")
            used = tables.vote_on_lease(lease)
            if used is not None:
                if tables.is_undone(used):
                    raise LabelError(f"the decision on row lease {lease} was undone: decide on the row shown now")
                return Receipt(used, held.item, duplicate=True)
            if held.released_at is not None:
                raise LabelError(f"row lease {lease} was given up: decide on the row you are shown now")
            standing = tables.votes(self.version.id, mode=MODE, item=held.item)
            if any(review.annotator == annotator for review in standing):
                raise LabelError(f"{annotator!r} already reviewed item {held.item}")
            if decision != "skip" and held.expires_at <= now:
                others = tables.holders(self.version.id, MODE, now, item=held.item, excluding=annotator)[held.item]
                if sum(review.counted for review in standing) + others >= self.overlap:
                    raise LabelError(f"the lease on item {held.item} expired and the row went to other reviewers")
            review = tables.add_vote(
                self.version.id, MODE, held.item, annotator, [], decision, ranking=None, scores=None, reason=reason,
                seconds=round(max(now - held.leased_at, 0.0), 3), lease_id=lease, edited=edited,
            )  # fmt: skip
            tables.release_lease(lease, now)
            return Receipt(review, held.item)

    def undo(self, annotator: str) -> tuple[Undone | None, Assignment]:
        """Retract the reviewer's last standing decision (an undo row), and lease that row to them again."""
        now = self.clock()
        tables = self.tables
        with tables.transaction():
            mine = tables.votes(self.version.id, mode=MODE, annotator=annotator)
            if not mine:
                undone = None
            else:
                last = mine[-1]
                undone = Undone(last, tables.add_undo(self.version.id, MODE, last))
                tables.release_leases(self.version.id, MODE, annotator, now)
                counted = sum(review.counted for review in tables.votes(self.version.id, mode=MODE, item=last.item))
                if counted + tables.holders(self.version.id, MODE, now, item=last.item)[last.item] < self.overlap:
                    lease = tables.add_lease(
                        self.version.id, MODE, last.item, annotator, [], now, now + self.lease_seconds
                    )
                    return undone, Assignment("item", lease, last.item)
        return undone, self.current(annotator)

    def _tallied(self) -> Tally:
        self._tally.update(self.tables.rows_after(self.version.id, self._tally.last), MODE)
        return self._tally


# What the decisions add up to


@dataclass
class Outcome:
    rows: list[dict]
    accepted: int = 0
    edited: int = 0
    rejected: int = 0
    ties: int = 0
    unreviewed: int = 0


def outcome(rows: list[dict], items: Sequence[int], reviews: Sequence[Vote]) -> Outcome:
    """The kept rows (see the module docstring), in row order."""
    by_item: dict[int, list[Vote]] = defaultdict(list)
    for review in reviews:
        if review.counted:
            by_item[review.item].append(review)
    result = Outcome(rows=[])
    for item, index in enumerate(items):
        found = by_item.get(item, [])
        if not found:
            result.unreviewed += 1
            continue
        tally = Counter(review.choice for review in found)
        keep, reject = tally["accept"] + tally["edit"], tally["reject"]
        if keep == reject:
            result.ties += 1
            continue
        if keep < reject:
            result.rejected += 1
            continue
        edits = [review for review in found if review.choice == "edit"]
        row = dict(rows[index])
        origin = origin_of(row)
        counts = {key: tally[key] for key in ("accept", "edit", "reject")}
        origin["review"] = {"decision": "edit" if edits else "accept", **counts}
        row["origin"] = json.dumps(origin, ensure_ascii=False, sort_keys=True)
        if edits:
            row["messages"] = edits[-1].edited
            result.edited += 1
        else:
            result.accepted += 1
        result.rows.append(row)
    return result


def agreement(reviews: Sequence[Vote]) -> dict:
    """Agreement on keep (accept or edit) against reject, over rows reviewed by two or more people."""
    units: dict[int, dict] = defaultdict(dict)
    for review in reviews:
        if review.counted:
            units[review.item][review.annotator] = "keep" if review.choice in KEEP else "reject"
    shared = [unit for unit in units.values() if len(unit) >= 2]
    reviewers = sorted({name for unit in units.values() for name in unit})
    kappas = []
    for a, b in itertools.combinations(reviewers, 2):
        pairs = [(unit[a], unit[b]) for unit in units.values() if a in unit and b in unit]
        if pairs:
            kappas.append({"annotators": [a, b], "shared": len(pairs), "kappa": cohen_kappa(pairs)})
    return {
        "rows_reviewed_twice": len(shared),
        "krippendorff_alpha": krippendorff_alpha(units.values()),
        "pairwise_agreement": pairwise_agreement(units.values()),
        "reviewers": len(reviewers),
        "cohen_kappa": kappas,
    }


def quality(rows: list[dict], items: Sequence[int], reviews: Sequence[Vote]) -> dict:
    """Acceptance by method and operator (each review counts once: accept and edit are accepted), the top reasons
    for rejecting, and the agreement numbers."""
    groups: dict[tuple, Counter] = defaultdict(Counter)
    reasons: Counter = Counter()
    for review in reviews:
        if not review.counted:
            continue
        origin = origin_of(rows[items[review.item]])
        key = (origin.get("method", "?"), origin.get("operator") or "-")
        groups[key][review.choice] += 1
        groups[("(all)", "")][review.choice] += 1
        if review.choice == "reject" and review.reason:
            reasons[review.reason.strip().lower()] += 1
    table = []
    for (method, operator), tally in sorted(groups.items(), key=lambda pair: (pair[0][0] == "(all)", pair[0])):
        total = sum(tally.values())
        table.append({
            "method": method, "operator": operator, "reviews": total, "accepted": tally["accept"],
            "edited": tally["edit"], "rejected": tally["reject"],
            "acceptance": (tally["accept"] + tally["edit"]) / total if total else None,
        })  # fmt: skip
    return {"by_method": table, "reasons": reasons.most_common(10), "agreement": agreement(reviews)}


# align data from-review


def from_review(registry, data: str, *, name: str, with_seeds: bool = False):
    """Register the accepted and edited rows of a reviewed version as a new `sft` version. Returns (version,
    Outcome, agreement). Lineage: the reviewed version, a snapshot of the decisions used ('comparisons:ID'), and
    with `with_seeds` the version the expansion started from, whose rows come first."""
    check_name(name)
    version = registry.resolve(data)
    rows = registry.rows(version) if version.kind == "sft" else []
    items = machine_rows(version, rows)
    tables = registry.labels
    with tables.transaction():  # one consistent read of the append-only table
        last = tables.last_row(version.id)
        reviews = tables.votes(version.id, mode=MODE, upto=last) if last is not None else []
    if not any(review.counted for review in reviews):
        raise AlignError(f"no reviews of {version.ref} yet: review its rows with `align review --data {version.ref}`")
    result = outcome(rows, items, reviews)
    if not result.rows:
        raise AlignError(
            f"no row of {version.ref} was accepted or edited: {result.rejected} rejected, {result.ties} ties, "
            f"{result.unreviewed} not reviewed yet"
        )
    numbers = agreement(reviews)
    used = [[r.id, r.item, r.annotator, r.choice, r.edited] for r in reviews]
    content_hash = hashlib.sha256(json.dumps(used, sort_keys=True).encode("utf-8")).hexdigest()
    snapshot = tables.add_snapshot(version.id, last, len(reviews), content_hash)
    parents = [(version, "reviewed"), (f"comparisons:{snapshot}", "reviews")]
    out = result.rows
    seeds = None
    if with_seeds:
        if not version.meta.get("from"):
            raise AlignError(f"{version.ref} does not say which seeds it grew from: drop --with-seeds")
        seeds = registry.resolve(version.meta["from"], kind="sft")
        out = registry.rows(seeds) + out
        parents.append((seeds, "seeds"))
    meta = {
        "reviewed": version.ref,
        "seeds": seeds.ref if seeds else None,
        "rows": {"accepted": result.accepted, "edited": result.edited, "rejected": result.rejected,
                 "ties": result.ties, "unreviewed": result.unreviewed},
        "agreement": {key: value for key, value in numbers.items() if key != "cohen_kappa"},
        "reviews_snapshot": {"id": snapshot, "last_comparison": last, "standing": len(reviews), "sha256": content_hash},
    }  # fmt: skip
    clean = registry.register(out, name=name, kind="sft", parents=parents, meta=meta)
    return clean, result, numbers
