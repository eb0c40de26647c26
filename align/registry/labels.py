"""The label tables: annotators, item leases, the append-only comparisons (votes) and their snapshots.

Only storage lives here; the rules (who gets which item, what a vote may be, what votes add up to) belong to the
callers, which call these methods inside `with registry.labels.transaction():` where several reads and writes
must be one transaction. Each thread uses its own connection (align.registry.catalog.Connections).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from align.errors import AlignError
from align.registry.catalog import Tables, utc_now


@dataclass(frozen=True)
class Vote:
    """One standing row of the comparisons table."""

    id: int
    item: int
    annotator: str
    mode: str
    shown: tuple[int, ...]
    choice: str
    ranking: tuple[int, ...] | None = None  # rank of each completion index (rank votes)
    reason: str | None = None
    seconds: float | None = None
    scores: dict | None = None
    created_at: str = ""
    edited: list | None = None  # a review's edited messages (mode 'review', choice 'edit')

    @property
    def counted(self) -> bool:
        """Counts towards the overlap (a skip does not)."""
        return self.choice != "skip"


@dataclass(frozen=True)
class Lease:
    """One row of the label_leases table: an item handed to an annotator until it expires or a vote ends it."""

    id: int
    dataset_id: int
    mode: str
    item: int
    annotator: str
    shown: tuple[int, ...]  # completion indices in the order shown
    leased_at: float  # unix seconds
    expires_at: float
    released_at: float | None


class LabelTables(Tables):
    """annotators, label_leases, comparisons and comparison_snapshots."""

    # Annotators

    def add_annotator(self, name: str, password: str, *, admin: bool = False) -> None:
        """`password`: the salted hash to store, never the password itself."""
        with self.transaction():
            if self.db.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone():
                root = self._connections.path.parent
                raise AlignError(f"annotator {name!r} already exists in {root}")
            self.db.execute(
                "INSERT INTO annotators (name, password, admin, created_at) VALUES (?, ?, ?, ?)",
                (name, password, int(admin), utc_now()),
            )

    def annotator(self, name: str) -> dict | None:
        """{"name", "password" (the stored hash), "admin", "created_at"}, or None for an unknown name."""
        found = self.db.execute("SELECT * FROM annotators WHERE name = ?", (name,)).fetchone()
        return dict(found) if found else None

    def count_annotators(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM annotators").fetchone()[0]

    def list_annotators(self) -> list[dict]:
        """Each annotator with their standing votes (skips and undone votes left out), over every candidates
        version."""
        found = self.db.execute(
            "SELECT a.name, a.admin, a.created_at, (SELECT COUNT(*) FROM comparisons c WHERE c.annotator = a.name "
            "AND c.choice NOT IN ('undo', 'skip') AND c.id NOT IN (SELECT undoes FROM comparisons "
            "WHERE undoes IS NOT NULL)) AS votes FROM annotators a ORDER BY a.name"
        ).fetchall()
        return [dict(row) for row in found]

    # Leases

    def lease(self, lease_id: int) -> Lease | None:
        row = self.db.execute("SELECT * FROM label_leases WHERE id = ?", (lease_id,)).fetchone()
        return _lease(row) if row else None

    def live_lease(self, dataset_id: int, mode: str, annotator: str, now: float) -> Lease | None:
        """The annotator's newest lease that no vote ended and that has not expired."""
        row = self.db.execute(
            "SELECT * FROM label_leases WHERE dataset_id = ? AND mode = ? AND annotator = ? "
            "AND released_at IS NULL AND expires_at > ? ORDER BY id DESC LIMIT 1",
            (dataset_id, mode, annotator, now),
        ).fetchone()
        return _lease(row) if row else None

    def add_lease(
        self, dataset_id: int, mode: str, item: int, annotator: str, shown: list[int], now: float, expires_at: float
    ) -> int:
        cursor = self.db.execute(
            "INSERT INTO label_leases (dataset_id, mode, item, annotator, shown, leased_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (dataset_id, mode, item, annotator, json.dumps(shown), now, expires_at),
        )
        return cursor.lastrowid

    def release_lease(self, lease_id: int, now: float) -> None:
        self.db.execute("UPDATE label_leases SET released_at = ? WHERE id = ?", (now, lease_id))

    def release_leases(self, dataset_id: int, mode: str, annotator: str, now: float) -> None:
        """End every lease the annotator still holds on the version in this mode."""
        self.db.execute(
            "UPDATE label_leases SET released_at = ? WHERE dataset_id = ? AND mode = ? AND annotator = ? "
            "AND released_at IS NULL",
            (now, dataset_id, mode, annotator),
        )

    def holders(
        self, dataset_id: int, mode: str, now: float, *, item: int | None = None, excluding: str | None = None
    ) -> Counter:
        """item -> how many annotators (other than `excluding`) hold a live lease on it; only `item` if given."""
        where = ["dataset_id = ?", "mode = ?", "released_at IS NULL", "expires_at > ?"]
        args: list = [dataset_id, mode, now]
        _narrow(where, args, "item = ?", item)
        _narrow(where, args, "annotator != ?", excluding)
        found = self.db.execute(
            f"SELECT item, COUNT(DISTINCT annotator) AS holders FROM label_leases WHERE {' AND '.join(where)} "
            "GROUP BY item",
            args,
        )
        return Counter({row["item"]: row["holders"] for row in found})

    # Votes: rows are appended, never updated or deleted

    def votes(
        self,
        dataset_id: int,
        *,
        mode: str | None = None,
        item: int | None = None,
        annotator: str | None = None,
        upto: int | None = None,
    ) -> list[Vote]:
        """The votes on a candidates version that stand: every non-undo row no undo row retracts, oldest first.
        `upto`: only rows up to that id (a snapshot)."""
        where = ["c.dataset_id = ?", "c.choice != 'undo'"]
        args: list = [dataset_id]
        _narrow(where, args, "c.mode = ?", mode)
        _narrow(where, args, "c.item = ?", item)
        _narrow(where, args, "c.annotator = ?", annotator)
        retracted = "SELECT u.undoes FROM comparisons u WHERE u.dataset_id = ? AND u.undoes IS NOT NULL"
        retract_args: list = [dataset_id]
        if upto is not None:
            where.append("c.id <= ?")
            args.append(upto)
            retracted += " AND u.id <= ?"
            retract_args.append(upto)
        found = self.db.execute(
            f"SELECT c.* FROM comparisons c WHERE {' AND '.join(where)} AND c.id NOT IN ({retracted}) ORDER BY c.id",
            (*args, *retract_args),
        ).fetchall()
        return [
            Vote(
                id=row["id"],
                item=row["item"],
                annotator=row["annotator"],
                mode=row["mode"],
                shown=tuple(json.loads(row["shown"])),
                choice=row["choice"],
                ranking=tuple(json.loads(row["ranking"])) if row["ranking"] else None,
                reason=row["reason"],
                seconds=row["seconds"],
                scores=json.loads(row["scores"]) if row["scores"] else None,
                created_at=row["created_at"],
                edited=json.loads(row["edited"]) if row["edited"] else None,
            )
            for row in found
        ]

    def rows_after(self, dataset_id: int, after: int) -> list[tuple[int, str, int, str, str, bool]]:
        """The version's rows with an id above `after`, oldest first, each as (id, mode, item, annotator, choice,
        retracted): a vote gives its own fields and False; an undo row gives those of the vote it retracts and True.
        The table is append-only, so these rows and the older ones add up to every row."""
        found = self.db.execute(
            "SELECT c.id, COALESCE(v.mode, c.mode), COALESCE(v.item, c.item), COALESCE(v.annotator, c.annotator), "
            "COALESCE(v.choice, c.choice), c.undoes IS NOT NULL FROM comparisons c "
            "LEFT JOIN comparisons v ON v.id = c.undoes WHERE c.dataset_id = ? AND c.id > ? ORDER BY c.id",
            (dataset_id, after),
        )
        return [(row[0], row[1], row[2], row[3], row[4], bool(row[5])) for row in found]

    def vote_on_lease(self, lease_id: int) -> int | None:
        """The id of the vote that used the lease, if any (undone or not)."""
        found = self.db.execute("SELECT id FROM comparisons WHERE lease_id = ?", (lease_id,)).fetchone()
        return found["id"] if found else None

    def is_undone(self, vote_id: int) -> bool:
        return self.db.execute("SELECT 1 FROM comparisons WHERE undoes = ?", (vote_id,)).fetchone() is not None

    def add_vote(
        self,
        dataset_id: int,
        mode: str,
        item: int,
        annotator: str,
        shown: list[int],
        choice: str,
        *,
        ranking: list[int] | None,
        scores: dict | None,
        reason: str | None,
        seconds: float | None,
        lease_id: int,
        edited: list | None = None,
    ) -> int:
        cursor = self.db.execute(
            "INSERT INTO comparisons (dataset_id, mode, item, annotator, shown, choice, ranking, scores, reason, "
            "seconds, lease_id, created_at, edited) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                dataset_id,
                mode,
                item,
                annotator,
                json.dumps(shown),
                choice,
                json.dumps(ranking) if ranking is not None else None,
                json.dumps(scores) if scores is not None else None,
                reason,
                seconds,
                lease_id,
                utc_now(),
                json.dumps(edited, ensure_ascii=False) if edited is not None else None,
            ),
        )
        return cursor.lastrowid

    def add_undo(self, dataset_id: int, mode: str, vote: Vote) -> int:
        """Append the row that retracts `vote`; returns its id."""
        cursor = self.db.execute(
            "INSERT INTO comparisons (dataset_id, mode, item, annotator, shown, choice, undoes, created_at) "
            "VALUES (?, ?, ?, ?, ?, 'undo', ?, ?)",
            (dataset_id, mode, vote.item, vote.annotator, json.dumps(list(vote.shown)), vote.id, utc_now()),
        )
        return cursor.lastrowid

    def add_battle_votes(self, dataset_id: int, votes: Iterable[tuple]) -> None:
        """Pairwise votes mirrored from arena battles, each (item, annotator, choice, seconds, battle id,
        created_at), shown [0, 1]; a battle already mirrored onto this version is left as it is."""
        with self.transaction():
            for item, annotator, choice, seconds, battle_id, created_at in votes:
                self.db.execute(
                    "INSERT OR IGNORE INTO comparisons (dataset_id, mode, item, annotator, shown, choice, seconds, "
                    "battle_id, created_at) VALUES (?, 'pairwise', ?, ?, '[0, 1]', ?, ?, ?, ?)",
                    (dataset_id, item, annotator, choice, seconds, battle_id, created_at),
                )

    def last_row(self, dataset_id: int) -> int | None:
        """The id of the newest comparisons row of the version (undo rows included), None without any."""
        return self.db.execute("SELECT MAX(id) FROM comparisons WHERE dataset_id = ?", (dataset_id,)).fetchone()[0]

    def count_rows(self, dataset_id: int) -> int:
        """Every comparisons row of the version: votes, skips and undo rows."""
        return self.db.execute("SELECT COUNT(*) FROM comparisons WHERE dataset_id = ?", (dataset_id,)).fetchone()[0]

    # Snapshots: the votes a preference version was built from

    def add_snapshot(self, dataset_id: int, last: int, votes: int, content_hash: str) -> int:
        """The snapshot of the version's rows up to `last` (recorded once); returns its id."""
        with self.transaction():
            self.db.execute(
                "INSERT OR IGNORE INTO comparison_snapshots (dataset_id, last_comparison, votes, content_hash, "
                "created_at) VALUES (?, ?, ?, ?, ?)",
                (dataset_id, last, votes, content_hash, utc_now()),
            )
            return self.db.execute(
                "SELECT id FROM comparison_snapshots WHERE dataset_id = ? AND last_comparison = ?", (dataset_id, last)
            ).fetchone()["id"]


def _lease(row) -> Lease:
    return Lease(**{**dict(row), "shown": tuple(json.loads(row["shown"]))})  # the fields are the columns


def _narrow(where: list[str], args: list, condition: str, value) -> None:
    """Add a condition with one '?' to a WHERE clause, unless its value is None (no filter)."""
    if value is not None:
        where.append(condition)
        args.append(value)
