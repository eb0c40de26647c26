"""The registry: one workspace folder holding the catalog, the dataset files and the runs.

    workspace/
      registry.sqlite          the catalog (WAL mode)
      datasets/NAME/N.parquet  one immutable file per dataset version
      runs/ID/                 one folder per run: config, logs, checkpoints, adapters, metrics, report

A dataset version is content-addressed: registering the same rows under the same name gives back the
existing version. Refer to a version as `name` (the latest) or `name@3`.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import sqlite3
import tempfile
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from hashlib import sha256
from pathlib import Path

from align.errors import AlignError, DataError
from align.processes import pid_alive
from align.registry.arena import ArenaTables
from align.registry.catalog import Connections, open_catalog, transaction, utc_now
from align.registry.labels import LabelTables
from align.registry.schemas import KINDS, RowError, arrow_schema, convert_row, ordered_columns, validate_row

DEFAULT_WORKSPACE = "align-workspace"
ARTIFACT_KINDS = ("adapter", "rm", "model")  # model: full weights (full fine-tune or merged LoRA)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def workspace_path(workspace: str | os.PathLike | None = None) -> Path:
    """--workspace, else $ALIGN_WORKSPACE, else ./align-workspace."""
    return Path(workspace or os.environ.get("ALIGN_WORKSPACE") or DEFAULT_WORKSPACE)


def check_name(name: str, what: str = "dataset") -> str:
    """Names become folder names: letters, digits, '.', '_' and '-' only, no '..'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise AlignError(
            f"invalid {what} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
            "digit, with no path separators and no '..'"
        )
    return name


def parse_ref(ref: str, what: str = "dataset") -> tuple[str, int | None]:
    """'name' -> (name, None); 'name@3' -> (name, 3)."""
    name, at, version = str(ref).partition("@")
    check_name(name, what)
    if not at:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise AlignError(f"invalid reference {ref!r}: the version after '@' must be a positive whole number")
    return name, int(version)


@dataclass(frozen=True)
class DatasetVersion:
    id: int
    name: str
    version: int
    kind: str
    num_rows: int
    content_hash: str
    path: Path
    created_at: str
    run_id: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def node(self) -> str:
        return f"dataset:{self.id}"


@dataclass(frozen=True)
class Artifact:
    id: int
    kind: str
    name: str
    version: int
    path: Path
    base_model: str
    run_id: str | None
    created_at: str
    meta: dict = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.kind}:{self.name}@{self.version}"

    @property
    def node(self) -> str:
        return f"artifact:{self.id}"


@dataclass(frozen=True)
class Run:
    id: str
    stage: str
    status: str
    dir: Path
    config: dict
    inputs: list
    outputs: list
    metrics: dict
    seed: int | None
    library_versions: dict
    pid: int | None
    error: str | None
    created_at: str
    finished_at: str | None

    @property
    def node(self) -> str:
        return f"run:{self.id}"

    @property
    def shown_status(self) -> str:
        """A run still marked running whose process is gone was killed: say so (it can be resumed)."""
        if self.status == "running" and self.pid and not pid_alive(self.pid):
            return "interrupted"
        return self.status


@dataclass(frozen=True)
class Lineage:
    """What a walk of the lineage found (Registry.lineage): the nodes reached, {key: object} from the start
    outwards, and the (parent key, child key, role) links between them, in the order walked."""

    start: str
    nodes: dict[str, object]
    edges: list[tuple[str, str, str]]

    def parents(self, key: str) -> list[tuple[str, str]]:
        """(role, parent key) pairs of a node among the links walked, ordered by role, then parent."""
        return [(role, parent) for parent, child, role in self.edges if child == key]


class Registry:
    """The Python API: `Registry(workspace).load("name@3")`, `.register(rows, name=, kind=, parents=, run=)`.

    `registry.labels` (annotators, leases, votes) and `registry.arena` (battles) give each thread its own
    connection, for the apps that serve requests on many threads; `registry.db` is the creating thread's."""

    def __init__(self, workspace: str | os.PathLike | None = None):
        self.root = workspace_path(workspace).resolve()
        (self.root / "datasets").mkdir(parents=True, exist_ok=True)
        (self.root / "runs").mkdir(exist_ok=True)
        self.db = open_catalog(self.root / "registry.sqlite")
        self._connections = Connections(self.root / "registry.sqlite")
        self.labels = LabelTables(self._connections)
        self.arena = ArenaTables(self._connections)

    def close(self) -> None:
        self.db.close()
        self._connections.close()

    def __repr__(self) -> str:
        return f"Registry({str(self.root)!r})"

    # Datasets

    def register(
        self,
        dataset,
        *,
        name: str,
        kind: str,
        parents: Iterable = (),
        run: Run | str | None = None,
        meta: dict | None = None,
    ) -> DatasetVersion:
        """Validate and store rows as a new version of `name`, or return the version that already holds them.

        `dataset` is a `datasets.Dataset`, a pyarrow Table or a list of dicts. `parents` are what the rows
        were made from: versions, artifacts, runs, references ('name@2', 'adapter:x@1', 'base:MODEL_REF') or
        (parent, role) pairs.
        """
        check_name(name)
        if kind not in KINDS:
            raise AlignError(f"unknown dataset kind {kind!r}: choose one of {', '.join(KINDS)}")
        rows = _as_rows(dataset)
        if not rows:
            raise AlignError(f"cannot register an empty dataset as {name!r}")
        clean, problems = [], []
        for number, row in enumerate(rows, start=1):
            try:
                clean.append(validate_row(kind, row))
            except RowError as exc:
                problems.append(f"row {number}: {exc}")
        if problems:
            raise DataError(problems)
        return self._register_valid(clean, name=name, kind=kind, parents=parents, run=run, meta=meta)

    def _register_valid(self, clean: list[dict], *, name: str, kind: str, parents=(), run=None, meta=None):
        """register() for rows already in canonical form (validate_row's output), e.g. an importer's."""
        edges = [self._parent_edge(parent) for parent in parents]
        run_id = run.id if isinstance(run, Run) else run
        if run_id:
            self.get_run(run_id)  # an unknown run is the caller's mistake: say so rather than fail in SQL
            edges.append((f"run:{run_id}", "produced-by"))
        content_hash = _content_hash(kind, clean)

        with transaction(self.db):
            existing = self._version_row("name = ? AND content_hash = ?", (name, content_hash))
            if existing:
                return existing
            known = self.db.execute("SELECT kind FROM datasets WHERE name = ? LIMIT 1", (name,)).fetchone()
            if known and known["kind"] != kind:
                raise AlignError(
                    f"dataset name {name!r} is already used for '{known['kind']}' data; "
                    f"choose another name for this '{kind}' data"
                )
            version = self.db.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM datasets WHERE name = ?", (name,)
            ).fetchone()[0]
            relative = Path("datasets") / name / f"{version}.parquet"
            _write_parquet(kind, clean, self.root / relative)
            try:
                cursor = self.db.execute(
                    "INSERT INTO datasets (name, version, kind, content_hash, num_rows, path, run_id, meta, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        name,
                        version,
                        kind,
                        content_hash,
                        len(clean),
                        str(relative),
                        run_id,
                        json.dumps(meta or {}),
                        utc_now(),
                    ),
                )
                for parent, role in edges:
                    self.db.execute(
                        "INSERT OR IGNORE INTO lineage (child, parent, role) VALUES (?, ?, ?)",
                        (f"dataset:{cursor.lastrowid}", parent, role),
                    )
            except BaseException:
                (self.root / relative).unlink(missing_ok=True)
                raise
        return self.resolve(f"{name}@{version}")

    def resolve(self, ref: str | DatasetVersion, *, kind: str | Sequence[str] | None = None) -> DatasetVersion:
        """'name' (latest) or 'name@3' -> the version; with `kind`, insist on that kind."""
        if isinstance(ref, DatasetVersion):
            found = ref
        else:
            name, version = parse_ref(ref)
            if version is None:
                found = self._version_row("name = ? ORDER BY version DESC LIMIT 1", (name,))
            else:
                found = self._version_row("name = ? AND version = ?", (name, version))
            if found is None:
                known = [v.ref for v in self.list_datasets() if v.name == name]
                hint = f" (known: {', '.join(known)})" if known else " (see `align data list`)"
                raise AlignError(f"no dataset {ref!r} in the registry at {self.root}{hint}")
        kinds = (kind,) if isinstance(kind, str) else tuple(kind or ())
        if kinds and found.kind not in kinds:
            raise AlignError(f"dataset {found.ref} holds '{found.kind}' rows, but {' or '.join(kinds)} rows are needed")
        return found

    def rows(self, ref: str | DatasetVersion) -> list[dict]:
        import pyarrow.parquet as pq

        version = self.resolve(ref)
        return [_drop_nulls(row) for row in pq.read_table(version.path).to_pylist()]

    def load(self, ref: str | DatasetVersion, *, kind: str | Sequence[str] | None = None):
        """A version as a `datasets.Dataset`, the form the trainers take (in memory, no cache files)."""
        import datasets
        import pyarrow.parquet as pq

        version = self.resolve(ref, kind=kind)
        return datasets.Dataset(pq.read_table(version.path))

    def list_datasets(self) -> list[DatasetVersion]:
        found = self.db.execute("SELECT * FROM datasets ORDER BY name, version").fetchall()
        return [self._version(row) for row in found]

    def import_file(self, path, *, name: str, kind: str | None = None, fmt: str = "auto", limits=None):
        """Import a file; returns (version, ImportResult). Nothing is registered unless every row is valid.
        `limits` (importers.Limits) bounds the rows and bytes read."""
        from align.registry.importers import import_file

        check_name(name)
        result = import_file(path, kind=kind, fmt=fmt, limits=limits)
        meta = {
            "source": str(Path(path).resolve()),
            "format": result.format,
            "skipped": len(result.skipped),
            "source_rows": result.source_rows,
        }
        if result.duplicates:
            meta["duplicates_dropped"] = len(result.duplicates)
        # The importer's rows are validate_row's output already: checking 100,000 pairs twice costs seconds.
        version = self._register_valid(result.rows, name=name, kind=result.kind, meta=meta)
        return version, result

    def convert(self, ref: str, *, name: str, kind: str) -> DatasetVersion:
        """A new version of `kind` built from another kind's rows (e.g. prompts from sft data), with lineage."""
        source = self.resolve(ref)
        try:
            rows = [convert_row(row, source.kind, kind) for row in self.rows(source)]
        except RowError as exc:
            raise AlignError(f"cannot make '{kind}' rows from {source.ref}: {exc}") from None
        except ValueError as exc:
            raise AlignError(f"cannot make '{kind}' rows from {source.ref}: {exc}") from None
        return self.register(rows, name=name, kind=kind, parents=[(source, f"converted-to-{kind}")])

    def split(
        self,
        ref: str,
        *,
        test_size: float = 0.1,
        seed: int = 0,
        train_name: str | None = None,
        test_name: str | None = None,
    ) -> tuple[DatasetVersion, DatasetVersion]:
        """A seeded split into NAME-train and NAME-test versions, each with lineage to the source."""
        source = self.resolve(ref)
        rows = self.rows(source)
        count = round(len(rows) * test_size) if test_size < 1 else int(test_size)
        if test_size <= 0 or not 1 <= count < len(rows):
            raise AlignError(
                f"--test-size {test_size} gives {count} test rows out of {len(rows)}: "
                "give a fraction in (0, 1) or a row count that leaves rows on both sides"
            )
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        test_indices = set(order[:count])
        parts = {}
        for part, part_name in (
            ("train", train_name or f"{source.name}-train"),
            ("test", test_name or f"{source.name}-test"),
        ):
            chosen = [row for i, row in enumerate(rows) if (i in test_indices) == (part == "test")]
            meta = {"split": part, "source": source.ref, "test_size": test_size, "seed": seed}
            parts[part] = self.register(
                chosen, name=part_name, kind=source.kind, parents=[(source, f"split:{part}")], meta=meta
            )
        return parts["train"], parts["test"]

    def export(self, ref: str, to: str | os.PathLike) -> Path:
        """Write a version to .jsonl or .parquet (atomically: a reader never sees half a file)."""
        target = Path(to)
        suffix = target.suffix.lower()
        if suffix not in (".jsonl", ".parquet"):
            raise AlignError(f"cannot export to {target}: the file name must end in .jsonl or .parquet")
        version = self.resolve(ref)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
        os.close(handle)
        try:
            if suffix == ".parquet":
                shutil.copyfile(version.path, temporary)
            else:
                with open(temporary, "w", encoding="utf-8") as out:
                    for row in self.rows(version):
                        out.write(json.dumps(row, ensure_ascii=False) + "\n")
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return target

    # Lineage

    def parents(self, node) -> list[tuple[str, object]]:
        """(role, parent) pairs of a version, artifact or run; a parent is an object or a plain reference."""
        node = node if isinstance(node, str) else node.node
        return [(role, self.node(parent)) for parent, role in self._links(node, upward=True)]

    def children(self, node) -> list[tuple[str, object]]:
        node = node if isinstance(node, str) else node.node
        return [(role, self.node(child)) for child, role in self._links(node, upward=False)]

    def lineage(self, node, *, direction: str = "up", depth: int | None = None, limit: int | None = None) -> Lineage:
        """Walk the lineage breadth first from a version, artifact or run (or its key, 'dataset:12'): "up" to its
        ancestors, "down" to its descendants, or "both" (up first). `depth`: at most that many links from the
        start; `limit`: read no further node once that many are found, the start included (the links of the node
        being read are all kept, so a few more may be found)."""
        if direction not in ("up", "down", "both"):
            raise ValueError(f"direction is up, down or both (got {direction!r})")
        start = node if isinstance(node, str) else node.node
        nodes = {start: self.node(node) if isinstance(node, str) else node}
        edges = []
        for upward in (True, False) if direction == "both" else (direction == "up",):
            distance, queue = {start: 0}, deque([start])
            while queue and (limit is None or len(nodes) < limit):
                key = queue.popleft()
                if depth is not None and distance[key] >= depth:
                    continue
                for other, role in self._links(key, upward=upward):
                    edges.append((other, key, role) if upward else (key, other, role))
                    if other not in distance:
                        distance[other] = distance[key] + 1
                        queue.append(other)
                    if other not in nodes:
                        nodes[other] = self.node(other)
        return Lineage(start, nodes, edges)

    def _links(self, key: str, *, upward: bool) -> list[tuple[str, str]]:
        """(parent, role) pairs of a node key, or (child, role) pairs; ordered by role, then the other key."""
        if upward:
            query = "SELECT parent AS other, role FROM lineage WHERE child = ? ORDER BY role, parent"
        else:
            query = "SELECT child AS other, role FROM lineage WHERE parent = ? ORDER BY role, child"
        return [(row["other"], row["role"]) for row in self.db.execute(query, (key,)).fetchall()]

    def node(self, node: str):
        """'dataset:12' -> DatasetVersion, 'artifact:3' -> Artifact, 'run:ID' -> Run, 'base:REF' -> 'REF'."""
        kind, _, key = node.partition(":")
        if kind == "dataset":
            return self._version_row("id = ?", (int(key),)) or node
        if kind == "artifact":
            row = self.db.execute("SELECT * FROM artifacts WHERE id = ?", (int(key),)).fetchone()
            return self._artifact(row) if row else node
        if kind == "run":
            row = self.db.execute("SELECT * FROM runs WHERE id = ?", (key,)).fetchone()
            return self._run(row) if row else node
        return key if kind == "base" else node

    def _parent_edge(self, parent) -> tuple[str, str]:
        role = "input"
        if isinstance(parent, tuple):
            parent, role = parent
        if isinstance(parent, (DatasetVersion, Artifact, Run)):
            return parent.node, role
        text = str(parent)
        if text.startswith("base:") or text.startswith("comparisons:"):
            return text, role
        if text.split(":", 1)[0] in ARTIFACT_KINDS:
            return self.resolve_artifact(text).node, role
        return self.resolve(text).node, role

    # Runs

    def start_run(
        self,
        stage: str,
        *,
        config: dict | None = None,
        inputs: Sequence[str] = (),
        seed: int | None = None,
        run_id: str | None = None,
    ) -> Run:
        """Record a run as running and make its folder runs/ID/."""
        run_id = run_id or f"{stage}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
        relative = Path("runs") / run_id
        (self.root / relative).mkdir(parents=True, exist_ok=True)
        with transaction(self.db):
            self.db.execute(
                "INSERT INTO runs (id, stage, status, dir, config, inputs, seed, library_versions, pid, created_at)"
                " VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    stage,
                    str(relative),
                    json.dumps(config or {}, default=str),
                    json.dumps(list(inputs)),
                    seed,
                    json.dumps(library_versions()),
                    os.getpid(),
                    utc_now(),
                ),
            )
        return self.get_run(run_id)

    def resume_run(self, run_id: str) -> Run:
        """Mark an interrupted or failed run as running again, in this process."""
        self.get_run(run_id)
        with transaction(self.db):
            self.db.execute(
                "UPDATE runs SET status = 'running', pid = ?, error = NULL, finished_at = NULL WHERE id = ?",
                (os.getpid(), run_id),
            )
        return self.get_run(run_id)

    def finish_run(
        self,
        run: Run | str,
        *,
        status: str = "completed",
        metrics: dict | None = None,
        outputs: Sequence[str] = (),
        error: str | None = None,
    ) -> Run:
        run_id = run.id if isinstance(run, Run) else run
        if status not in ("completed", "failed"):
            raise ValueError(f"a run finishes as completed or failed, not {status!r}")
        with transaction(self.db):
            self.db.execute(
                "UPDATE runs SET status = ?, metrics = ?, outputs = ?, error = ?, finished_at = ? WHERE id = ?",
                (
                    status,
                    json.dumps(metrics or {}, default=float),
                    json.dumps(list(outputs)),
                    error,
                    utc_now(),
                    run_id,
                ),
            )
        return self.get_run(run_id)

    def get_run(self, run_id: str) -> Run:
        row = self.db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise AlignError(f"no run {run_id!r} in the registry at {self.root} (see `align runs list`)")
        return self._run(row)

    def list_runs(self) -> list[Run]:
        """Every run, oldest first. created_at has whole seconds, so runs started within one second keep their
        insertion order (rowid), not the order of their random ids."""
        return [self._run(row) for row in self.db.execute("SELECT * FROM runs ORDER BY created_at, rowid").fetchall()]

    # Artifacts: adapters, reward models, merged models

    def register_artifact(
        self,
        kind: str,
        name: str,
        path: str | os.PathLike,
        *,
        base_model: str,
        run: Run | str | None = None,
        parents: Iterable = (),
        meta: dict | None = None,
    ) -> Artifact:
        """Register the folder `path` as the next version of KIND:NAME. A run that registers the same folder under
        the same name again (a resumed run whose first attempt was killed after registering) gets the artifact it
        registered back, with the new `meta`, rather than a second version."""
        if kind not in ARTIFACT_KINDS:
            raise AlignError(f"unknown artifact kind {kind!r}: choose one of {', '.join(ARTIFACT_KINDS)}")
        check_name(name, kind)
        location = Path(path).resolve()
        if not location.exists():
            raise AlignError(f"cannot register {kind}:{name}: {location} does not exist")
        stored = location.relative_to(self.root) if location.is_relative_to(self.root) else location
        base_is_artifact = base_model.split(":", 1)[0] in ARTIFACT_KINDS
        base_node = self.resolve_artifact(base_model).node if base_is_artifact else f"base:{base_model}"
        edges = [self._parent_edge(parent) for parent in parents] + [(base_node, "base-model")]
        run_id = run.id if isinstance(run, Run) else run
        if run_id:
            edges.append((f"run:{run_id}", "produced-by"))
        meta_text = json.dumps(meta or {}, default=str)
        with transaction(self.db):
            again = self.db.execute(
                "SELECT id, version FROM artifacts WHERE kind = ? AND name = ? AND path = ? AND run_id = ?",
                (kind, name, str(stored), run_id),
            ).fetchone()
            if again is not None:
                self.db.execute("UPDATE artifacts SET meta = ? WHERE id = ?", (meta_text, again["id"]))
                version = again["version"]
            else:
                version = self.db.execute(
                    "SELECT COALESCE(MAX(version), 0) + 1 FROM artifacts WHERE kind = ? AND name = ?",
                    (kind, name),
                ).fetchone()[0]
                cursor = self.db.execute(
                    "INSERT INTO artifacts (kind, name, version, path, base_model, run_id, meta, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (kind, name, version, str(stored), base_model, run_id, meta_text, utc_now()),
                )
                for parent, role in edges:
                    self.db.execute(
                        "INSERT OR IGNORE INTO lineage (child, parent, role) VALUES (?, ?, ?)",
                        (f"artifact:{cursor.lastrowid}", parent, role),
                    )
        return self.resolve_artifact(f"{kind}:{name}@{version}")

    def resolve_artifact(self, ref: str) -> Artifact:
        """'adapter:NAME' (latest) or 'rm:NAME@2' -> the artifact."""
        kind, colon, rest = str(ref).partition(":")
        if not colon or kind not in ARTIFACT_KINDS:
            raise AlignError(
                f"invalid artifact reference {ref!r}: write KIND:NAME[@V] with KIND one of {', '.join(ARTIFACT_KINDS)}"
            )
        name, version = parse_ref(rest, kind)
        if version is None:
            query, args = "kind = ? AND name = ? ORDER BY version DESC LIMIT 1", (kind, name)
        else:
            query, args = "kind = ? AND name = ? AND version = ?", (kind, name, version)
        row = self.db.execute(f"SELECT * FROM artifacts WHERE {query}", args).fetchone()
        if row is None:
            raise AlignError(f"no artifact {ref!r} in the registry at {self.root} (see `align runs list`)")
        return self._artifact(row)

    def list_artifacts(self) -> list[Artifact]:
        found = self.db.execute("SELECT * FROM artifacts ORDER BY kind, name, version").fetchall()
        return [self._artifact(row) for row in found]

    # Row -> object

    def _version_row(self, where: str, args: tuple) -> DatasetVersion | None:
        row = self.db.execute(f"SELECT * FROM datasets WHERE {where}", args).fetchone()
        return self._version(row) if row else None

    def _version(self, row: sqlite3.Row) -> DatasetVersion:
        return DatasetVersion(
            id=row["id"],
            name=row["name"],
            version=row["version"],
            kind=row["kind"],
            num_rows=row["num_rows"],
            content_hash=row["content_hash"],
            path=self.root / row["path"],
            created_at=row["created_at"],
            run_id=row["run_id"],
            meta=json.loads(row["meta"]),
        )

    def _artifact(self, row: sqlite3.Row) -> Artifact:
        return Artifact(
            id=row["id"],
            kind=row["kind"],
            name=row["name"],
            version=row["version"],
            path=self.root / row["path"],
            base_model=row["base_model"],
            run_id=row["run_id"],
            created_at=row["created_at"],
            meta=json.loads(row["meta"]),
        )

    def _run(self, row: sqlite3.Row) -> Run:
        return Run(
            id=row["id"],
            stage=row["stage"],
            status=row["status"],
            dir=self.root / row["dir"],
            config=json.loads(row["config"]),
            inputs=json.loads(row["inputs"]),
            outputs=json.loads(row["outputs"]),
            metrics=json.loads(row["metrics"]),
            seed=row["seed"],
            library_versions=json.loads(row["library_versions"]),
            pid=row["pid"],
            error=row["error"],
            created_at=row["created_at"],
            finished_at=row["finished_at"],
        )


def _as_rows(dataset) -> list[dict]:
    if isinstance(dataset, list):
        return dataset
    if hasattr(dataset, "to_pylist"):  # pyarrow Table
        return [_drop_nulls(row) for row in dataset.to_pylist()]
    if hasattr(dataset, "to_list"):  # datasets.Dataset
        return [_drop_nulls(row) for row in dataset.to_list()]
    return list(dataset)


def _drop_nulls(row: dict) -> dict:
    """Optional columns read back as None where a row lacks them; the canonical row leaves them out."""
    return {key: value for key, value in row.items() if value is not None}


def _content_hash(kind: str, rows: list[dict]) -> str:
    """sha256 of json.dumps({"kind": kind, "rows": rows}, sort_keys=True, ensure_ascii=False, separators=(",", ":")),
    fed row by row so that no copy of the whole dataset is built as one string."""
    encoder = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = sha256(f'{{"kind":{encoder.encode(kind)},"rows":['.encode())
    for number, row in enumerate(rows):
        digest.update((("," if number else "") + encoder.encode(row)).encode("utf-8"))
    digest.update(b"]}")
    return digest.hexdigest()


def _write_parquet(kind: str, rows: list[dict], target: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    target.parent.mkdir(parents=True, exist_ok=True)
    schema = arrow_schema(kind, ordered_columns(kind, rows))
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        # A slice of rows at a time: a whole table built at once peaks at about twice the data's size.
        with pq.ParquetWriter(temporary, schema) as writer:
            for start in range(0, len(rows), 10_000):
                writer.write_table(pa.Table.from_pylist(rows[start : start + 10_000], schema=schema))
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def library_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("align-service", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found
