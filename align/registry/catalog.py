"""The SQLite catalog: tables for dataset versions, runs, artifacts and lineage.

One file, `registry.sqlite`, in WAL mode so readers never block the writer. Every write is one
transaction: a version, run or artifact is either fully recorded or not at all.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

# Each entry upgrades the catalog by one step; `PRAGMA user_version` records how many have run.
MIGRATIONS = [
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        stage TEXT NOT NULL,
        status TEXT NOT NULL,             -- running | completed | failed
        dir TEXT NOT NULL,                -- relative to the workspace
        config TEXT NOT NULL DEFAULT '{}',
        inputs TEXT NOT NULL DEFAULT '[]',
        outputs TEXT NOT NULL DEFAULT '[]',
        metrics TEXT NOT NULL DEFAULT '{}',
        seed INTEGER,
        library_versions TEXT NOT NULL DEFAULT '{}',
        pid INTEGER,
        error TEXT,
        created_at TEXT NOT NULL,
        finished_at TEXT
    );
    CREATE TABLE datasets (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        kind TEXT NOT NULL,
        content_hash TEXT NOT NULL,
        num_rows INTEGER NOT NULL,
        path TEXT NOT NULL,               -- relative to the workspace
        run_id TEXT REFERENCES runs(id),
        meta TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        UNIQUE (name, version),
        UNIQUE (name, content_hash)
    );
    CREATE TABLE artifacts (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,               -- adapter | rm | model
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        path TEXT NOT NULL,
        base_model TEXT NOT NULL,         -- a model reference
        run_id TEXT REFERENCES runs(id),
        meta TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        UNIQUE (kind, name, version)
    );
    -- Edges between nodes written as 'dataset:ID', 'artifact:ID', 'run:ID' or 'base:MODEL_REFERENCE'.
    CREATE TABLE lineage (
        child TEXT NOT NULL,
        parent TEXT NOT NULL,
        role TEXT NOT NULL DEFAULT 'input',
        PRIMARY KEY (child, parent, role)
    );
    CREATE INDEX lineage_parent ON lineage (parent);
    """,
    # Human labels: annotators, item leases, and the append-only comparisons (votes).
    """
    CREATE TABLE annotators (
        name TEXT PRIMARY KEY,
        password TEXT NOT NULL,           -- scrypt$N$r$p$SALT$HASH, salted and hashed, never the password
        admin INTEGER NOT NULL DEFAULT 0, -- admins see the Quality tab
        created_at TEXT NOT NULL
    );
    -- Who holds which item now: a lease ends with the vote that uses it, or expires.
    CREATE TABLE label_leases (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL REFERENCES datasets(id),
        mode TEXT NOT NULL,               -- pairwise | rank
        item INTEGER NOT NULL,            -- row index in the candidates version
        annotator TEXT NOT NULL,
        shown TEXT NOT NULL,              -- JSON: completion indices in the order shown (left to right)
        leased_at REAL NOT NULL,          -- unix seconds
        expires_at REAL NOT NULL,
        released_at REAL                  -- set by the vote (or undo) that ends the lease
    );
    CREATE INDEX label_leases_item ON label_leases (dataset_id, mode, item);
    CREATE INDEX label_leases_annotator ON label_leases (dataset_id, mode, annotator);
    -- One row per vote, one transaction per vote, never updated or deleted. Undo appends a row with
    -- choice 'undo' that names the vote it retracts.
    CREATE TABLE comparisons (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL REFERENCES datasets(id),
        mode TEXT NOT NULL,               -- pairwise | rank
        item INTEGER NOT NULL,
        annotator TEXT NOT NULL,
        shown TEXT NOT NULL,              -- JSON: completion indices in the order shown (left to right)
        choice TEXT NOT NULL,             -- A | B | tie | both-bad | skip | rank | undo
        ranking TEXT,                     -- JSON: the rank of each completion index, 1 = best, equal = tie
        scores TEXT,                      -- JSON: optional rubric scores
        reason TEXT,
        seconds REAL,                     -- from the item being shown to the vote
        lease_id INTEGER UNIQUE REFERENCES label_leases(id),
        undoes INTEGER UNIQUE REFERENCES comparisons(id),
        created_at TEXT NOT NULL
    );
    CREATE INDEX comparisons_item ON comparisons (dataset_id, mode, item);
    CREATE INDEX comparisons_annotator ON comparisons (dataset_id, annotator);
    -- The votes a preference version was built from: every comparisons row of the dataset up to an id.
    CREATE TABLE comparison_snapshots (
        id INTEGER PRIMARY KEY,
        dataset_id INTEGER NOT NULL REFERENCES datasets(id),
        last_comparison INTEGER NOT NULL,
        votes INTEGER NOT NULL,           -- standing votes used: skips included, undone votes not
        content_hash TEXT NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (dataset_id, last_comparison)
    );
    """,
    # The arena: blind battles between two models, one row per vote, never updated or deleted.
    """
    CREATE TABLE arena_battles (
        id INTEGER PRIMARY KEY,
        arena TEXT NOT NULL,
        battle_key TEXT NOT NULL UNIQUE,  -- drawn when the battle starts: a retried vote is recorded once
        model_left TEXT NOT NULL,         -- model references, as placed on screen
        model_right TEXT NOT NULL,
        messages_left TEXT NOT NULL,      -- JSON: the whole thread of the left model, ending with its reply
        messages_right TEXT NOT NULL,
        settings TEXT NOT NULL DEFAULT '{}',  -- JSON: the generation settings
        annotator TEXT NOT NULL,
        choice TEXT NOT NULL,             -- left | right | tie | both-bad
        seconds REAL,                     -- from the replies being shown to the vote
        created_at TEXT NOT NULL
    );
    CREATE INDEX arena_battles_arena ON arena_battles (arena, id);
    -- `align data from-labels arena:NAME` writes a comparisons row per battle against a candidates snapshot.
    ALTER TABLE comparisons ADD COLUMN battle_id INTEGER REFERENCES arena_battles(id);
    CREATE UNIQUE INDEX comparisons_battle ON comparisons (dataset_id, battle_id);
    """,
    # Labeling under load: no query on the way of a vote reads every row of a version.
    """
    -- A version's rows in id order: the rows appended since a given id, without the older ones.
    CREATE INDEX comparisons_dataset ON comparisons (dataset_id);
    -- Only the undo rows: which votes stand, without a pass over every vote.
    CREATE INDEX comparisons_undone ON comparisons (dataset_id, undoes) WHERE undoes IS NOT NULL;
    -- Only the leases no vote ended yet (every lease query but the lookup by id asks for those).
    DROP INDEX label_leases_item;
    DROP INDEX label_leases_annotator;
    CREATE INDEX label_leases_open_item ON label_leases (dataset_id, mode, item) WHERE released_at IS NULL;
    CREATE INDEX label_leases_open_annotator ON label_leases (dataset_id, mode, annotator) WHERE released_at IS NULL;
    """,
    # Reviews of machine-made sft rows (align review): comparisons and label_leases rows of mode 'review', whose
    # choice is accept | edit | reject | skip (| undo); an edit keeps the messages as the reviewer wrote them.
    """
    ALTER TABLE comparisons ADD COLUMN edited TEXT;  -- JSON: the edited messages (mode 'review', choice 'edit')
    """,
]


def open_catalog(path: Path) -> sqlite3.Connection:
    """Open (and create or upgrade) the catalog. Autocommit mode: transactions are explicit."""
    connection = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    connection.row_factory = sqlite3.Row
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")  # an acknowledged write survives a crash
    connection.execute("PRAGMA foreign_keys=ON")
    with transaction(connection):
        current = connection.execute("PRAGMA user_version").fetchone()[0]
        for number, script in enumerate(MIGRATIONS[current:], start=current + 1):
            for statement in script.split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.execute(f"PRAGMA user_version={number}")
    return connection


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE takes the write lock up front, so two writers queue instead of failing midway."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield connection
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    connection.execute("COMMIT")


def utc_now() -> str:
    """The time a row is written, as stored in created_at columns."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Connections:
    """One catalog connection per thread, opened on first use. A transaction belongs to a connection, so threads
    that write (Gradio serves each request on a worker thread) must not share one."""

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()

    @property
    def db(self) -> sqlite3.Connection:
        connection = getattr(self._local, "db", None)
        if connection is None:
            connection = self._local.db = open_catalog(self.path)
        return connection

    def close(self) -> None:
        """Close the calling thread's connection (the others close with their threads)."""
        connection = getattr(self._local, "db", None)
        if connection is not None:
            connection.close()
            self._local.db = None


class Tables:
    """Some of the catalog's tables, on the calling thread's connection. Inside `with tables.transaction():`
    every call from the same thread belongs to that one transaction."""

    def __init__(self, connections: Connections):
        self._connections = connections

    @property
    def db(self) -> sqlite3.Connection:
        return self._connections.db

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with transaction(self.db):
            yield
