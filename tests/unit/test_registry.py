"""The registry: content-addressed versions, references, lineage, runs, artifacts, export and concurrency."""

import json
import sqlite3
import threading
from pathlib import Path

import pytest

from align.errors import AlignError, DataError
from align.registry import Registry, check_name, parse_ref


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def pair(i: int, **extra) -> dict:
    return {"prompt": [user(f"q{i}")], "chosen": [bot(f"good {i}")], "rejected": [bot(f"bad {i}")], **extra}


def sft(i: int) -> dict:
    return {"messages": [user(f"q{i}"), bot(f"a{i}")]}


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "ws")
    yield registry
    registry.close()


def parquet_files(registry) -> list[Path]:
    return sorted((registry.root / "datasets").rglob("*.parquet"))


def dataset_count(registry) -> int:
    return registry.db.execute("SELECT COUNT(*) FROM datasets").fetchone()[0]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# Content addressing and references


def test_same_rows_same_version_even_from_another_file_format(registry, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [pair(1, margin=1.0), pair(2)]  # pyarrow takes the columns from row 1
    first, _ = registry.import_file(write_jsonl(tmp_path / "a.jsonl", rows), name="pairs")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    again, _ = registry.import_file(tmp_path / "a.parquet", name="pairs")
    assert first.ref == again.ref == "pairs@1"
    assert first.content_hash == again.content_hash
    assert registry.register(rows, name="pairs", kind="preference").ref == "pairs@1"
    assert dataset_count(registry) == 1
    assert len(parquet_files(registry)) == 1


def test_different_rows_new_version_and_refs(registry):
    one = registry.register([pair(1)], name="pairs", kind="preference")
    two = registry.register([pair(1), pair(2)], name="pairs", kind="preference")
    assert (one.ref, two.ref) == ("pairs@1", "pairs@2")
    assert registry.resolve("pairs").ref == "pairs@2"
    assert registry.resolve("pairs@1").num_rows == 1
    assert registry.rows("pairs@1") == [pair(1)]
    assert registry.rows("pairs") == [pair(1), pair(2)]
    # The same name in another case or another name is another dataset.
    assert registry.register([pair(1)], name="pairs-b", kind="preference").ref == "pairs-b@1"


@pytest.mark.parametrize("ref", ["x@0", "x@a", "x@", "x@-1", "../x", "a/b", "..", "", ".hidden", "a..b", "a b"])
def test_bad_refs_rejected(registry, ref):
    with pytest.raises(AlignError):
        parse_ref(ref)
    with pytest.raises(AlignError):
        registry.resolve(ref)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "x@1", "a\\b"])
def test_bad_names_rejected_on_register(registry, name):
    with pytest.raises(AlignError, match="invalid dataset name"):
        registry.register([pair(1)], name=name, kind="preference")
    assert dataset_count(registry) == 0


def test_good_names_and_refs():
    assert check_name("hh-rlhf_v1.2") == "hh-rlhf_v1.2"
    assert parse_ref("hh") == ("hh", None)
    assert parse_ref("hh@12") == ("hh", 12)


def test_unknown_dataset(registry):
    registry.register([pair(1)], name="pairs", kind="preference")
    with pytest.raises(AlignError, match=r"no dataset 'pairs@2'.*known: pairs@1"):
        registry.resolve("pairs@2")
    with pytest.raises(AlignError, match="no dataset 'other'"):
        registry.resolve("other")


def test_name_used_for_another_kind(registry):
    registry.register([pair(1)], name="data", kind="preference")
    files, count = parquet_files(registry), dataset_count(registry)
    with pytest.raises(AlignError, match="already used for 'preference' data"):
        registry.register([sft(1)], name="data", kind="sft")
    assert dataset_count(registry) == count == 1
    assert parquet_files(registry) == files


def test_bad_row_registers_nothing(registry, tmp_path):
    rows = [pair(i) for i in range(5)] + [{"prompt": [user("q")], "chosen": [bot("a")], "rejected": "oops"}]
    with pytest.raises(DataError) as info:
        registry.register(rows, name="pairs", kind="preference")
    assert "row 6: field 'rejected' must be a list of messages (got 'oops')" in str(info.value)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p"}])
    with pytest.raises(DataError):
        registry.import_file(path, name="pairs")
    assert dataset_count(registry) == 0
    assert parquet_files(registry) == []
    assert registry.list_datasets() == []


def test_unknown_run_is_refused_and_leaves_nothing(registry):
    with pytest.raises(AlignError, match="no run 'no-such-run'"):
        registry.register([sft(1)], name="chat", kind="sft", run="no-such-run")
    assert dataset_count(registry) == 0
    assert parquet_files(registry) == []


class FailingInsert:
    """The catalog connection, except that inserting a dataset row fails (as a full disk would)."""

    def __init__(self, connection):
        self.connection = connection

    def execute(self, sql, *args):
        if sql.startswith("INSERT INTO datasets"):
            raise sqlite3.OperationalError("disk I/O error")
        return self.connection.execute(sql, *args)


def test_failed_insert_leaves_no_file(registry):
    real = registry.db
    registry.db = FailingInsert(real)
    with pytest.raises(sqlite3.OperationalError):
        registry.register([sft(1)], name="chat", kind="sft")
    registry.db = real
    assert dataset_count(registry) == 0
    assert parquet_files(registry) == []


def test_unknown_kind_and_empty(registry):
    with pytest.raises(AlignError, match="unknown dataset kind 'pairs'"):
        registry.register([pair(1)], name="x", kind="pairs")
    with pytest.raises(AlignError, match="empty"):
        registry.register([], name="x", kind="sft")


# Inputs and outputs


def test_register_accepts_list_dataset_and_table(registry):
    import datasets
    import pyarrow as pa

    rows = [pair(1, margin=2.0), pair(2)]
    from_list = registry.register(rows, name="pairs", kind="preference")
    from_dataset = registry.register(datasets.Dataset.from_list(rows), name="pairs", kind="preference")
    from_table = registry.register(pa.Table.from_pylist(rows), name="pairs", kind="preference")
    assert from_list.ref == from_dataset.ref == from_table.ref == "pairs@1"
    assert registry.rows("pairs") == rows


def test_load_returns_dataset_with_canonical_columns(registry):
    import datasets

    registry.register([pair(1, tie=True), pair(2)], name="pairs", kind="preference")
    registry.register([sft(1)], name="chat", kind="sft")
    loaded = registry.load("pairs")
    assert isinstance(loaded, datasets.Dataset)
    assert loaded.column_names == ["prompt", "chosen", "rejected", "tie"]
    assert loaded[0]["chosen"] == [bot("good 1")]
    assert loaded["tie"] == [True, None]
    assert registry.load("chat", kind="sft").column_names == ["messages"]
    with pytest.raises(AlignError, match="holds 'preference' rows, but sft rows are needed"):
        registry.load("pairs", kind="sft")


# Lineage


def test_split_lineage_and_partition(registry):
    rows = [sft(i) for i in range(20)]
    source = registry.register(rows, name="chat", kind="sft")
    train, test = registry.split("chat", test_size=0.25, seed=7)
    assert (train.ref, test.ref) == ("chat-train@1", "chat-test@1")
    assert (train.num_rows, test.num_rows) == (15, 5)
    assert registry.parents(train) == [("split:train", source)]
    assert registry.parents(test) == [("split:test", source)]
    assert registry.children(source) == [("split:test", test), ("split:train", train)]
    train_rows, test_rows = registry.rows(train), registry.rows(test)
    assert sorted(json.dumps(r) for r in train_rows + test_rows) == sorted(json.dumps(r) for r in rows)
    assert not {json.dumps(r) for r in train_rows} & {json.dumps(r) for r in test_rows}
    assert train.meta == {"split": "train", "source": "chat@1", "test_size": 0.25, "seed": 7}


def test_split_is_deterministic_under_a_seed(registry):
    registry.register([sft(i) for i in range(20)], name="chat", kind="sft")
    first = registry.split("chat", test_size=5, seed=1)
    again = registry.split("chat", test_size=5, seed=1)
    assert [v.ref for v in again] == [v.ref for v in first] == ["chat-train@1", "chat-test@1"]
    other = registry.split("chat", test_size=5, seed=2)
    assert [v.ref for v in other] == ["chat-train@2", "chat-test@2"]
    assert registry.rows(other[1]) != registry.rows(first[1])


@pytest.mark.parametrize("test_size", [0, 0.0001, 20, 25, -0.5])
def test_split_refuses_an_empty_side(registry, test_size):
    registry.register([sft(i) for i in range(20)], name="chat", kind="sft")
    with pytest.raises(AlignError, match="test rows out of 20"):
        registry.split("chat", test_size=test_size)


def test_convert_prompts_lineage(registry):
    source = registry.register([pair(1), pair(2, tie=True)], name="pairs", kind="preference")
    prompts = registry.convert("pairs", name="pairs-prompts", kind="prompts")
    assert prompts.kind == "prompts"
    assert registry.rows(prompts) == [
        {"prompt": [user("q1")], "reference": "good 1"},
        {"prompt": [user("q2")]},
    ]
    assert registry.parents(prompts) == [("converted-to-prompts", source)]
    with pytest.raises(AlignError, match="cannot make 'preference' rows"):
        registry.convert("pairs-prompts", name="back", kind="preference")


def test_register_with_parents_and_run(registry):
    source = registry.register([sft(1)], name="chat", kind="sft")
    run = registry.start_run("generate", config={"n": 2}, inputs=["chat@1"], seed=3)
    candidates = {"prompt": [user("q1")], "completions": [[bot("x")], [bot("y")]], "sources": ["a", "b"]}
    made = registry.register([candidates], name="cands", kind="candidates", parents=["chat@1"], run=run)
    assert made.run_id == run.id
    parents = registry.parents(made)
    assert [role for role, _ in parents] == ["input", "produced-by"]
    assert parents[0][1] == source
    assert parents[1][1].id == run.id
    assert [(role, child.ref) for role, child in registry.children(source)] == [("input", "cands@1")]
    assert [(role, child.ref) for role, child in registry.children(run)] == [("produced-by", "cands@1")]
    with pytest.raises(AlignError, match="no dataset 'missing'"):
        registry.register([sft(2)], name="chat", kind="sft", parents=["missing"])
    assert registry.resolve("chat").ref == "chat@1"


# Runs and artifacts


def test_runs_lifecycle(registry):
    assert registry.list_runs() == []
    run = registry.start_run("sft", config={"lr": 0.1}, inputs=["chat@1"], seed=5, run_id="sft-one")
    assert (run.id, run.stage, run.status, run.shown_status, run.seed) == (
        "sft-one",
        "sft",
        "running",
        "running",
        5,
    )
    assert run.dir == registry.root / "runs" / "sft-one" and run.dir.is_dir()
    assert run.config == {"lr": 0.1} and run.inputs == ["chat@1"]
    done = registry.finish_run(run, metrics={"loss": 0.5}, outputs=["adapter:a@1"])
    assert (done.status, done.metrics, done.outputs) == ("completed", {"loss": 0.5}, ["adapter:a@1"])
    assert done.finished_at is not None
    failed = registry.finish_run(registry.start_run("dpo", run_id="dpo-one"), status="failed", error="boom")
    assert (failed.status, failed.error) == ("failed", "boom")
    assert [r.id for r in registry.list_runs()] == ["sft-one", "dpo-one"]
    assert registry.get_run("dpo-one").status == "failed"
    with pytest.raises(AlignError, match="no run 'nope'"):
        registry.get_run("nope")
    with pytest.raises(ValueError):
        registry.finish_run(run, status="running")


def test_runs_started_in_one_second_list_in_start_order(registry):
    # the ids sort the other way round, and both runs share their created_at second
    for run_id in ("rm-eval-z", "rm-eval-a", "rm-eval-m"):
        registry.start_run("rm-eval", run_id=run_id)
    registry.db.execute("UPDATE runs SET created_at = '2026-11-30T12:00:00+00:00'")
    assert [r.id for r in registry.list_runs()] == ["rm-eval-z", "rm-eval-a", "rm-eval-m"]


def test_dead_pid_shows_interrupted(registry):
    run = registry.start_run("sft", run_id="killed")
    assert registry.get_run("killed").shown_status == "running"  # this process is alive
    registry.db.execute("UPDATE runs SET pid = ? WHERE id = ?", (2**22 + 12345, run.id))  # above Linux's pid_max
    stored = registry.get_run("killed")
    assert (stored.status, stored.shown_status) == ("running", "interrupted")
    assert registry.finish_run(stored, status="failed").shown_status == "failed"


def test_artifacts_register_resolve_and_lineage(registry, tmp_path):
    run = registry.start_run("sft", run_id="sft-run")
    folder = run.dir / "adapter"
    folder.mkdir()
    first = registry.register_artifact("adapter", "sft", folder, base_model="smollm2-135m", run=run)
    second = registry.register_artifact("adapter", "sft", folder, base_model="smollm2-135m")
    assert (first.ref, second.ref) == ("adapter:sft@1", "adapter:sft@2")
    assert first.path == folder and first.run_id == "sft-run"
    assert registry.resolve_artifact("adapter:sft").version == 2
    assert registry.resolve_artifact("adapter:sft@1").id == first.id
    assert dict((role, getattr(p, "id", p)) for role, p in registry.parents(first)) == {
        "base-model": "smollm2-135m",
        "produced-by": "sft-run",
    }
    assert [a.ref for a in registry.list_artifacts()] == ["adapter:sft@1", "adapter:sft@2"]
    for bad in ("adapter:sft@3", "adapter:other", "rm:sft"):
        with pytest.raises(AlignError, match="no artifact"):
            registry.resolve_artifact(bad)
    for bad in ("lora:sft", "sft", "adapter:sft@0"):
        with pytest.raises(AlignError, match="invalid"):
            registry.resolve_artifact(bad)
    with pytest.raises(AlignError, match="^invalid adapter name '../x': use"):
        registry.resolve_artifact("adapter:../x")
    with pytest.raises(AlignError, match="^invalid rm name 'a/b': use"):
        registry.register_artifact("rm", "a/b", folder, base_model="m")
    with pytest.raises(AlignError, match="unknown artifact kind"):
        registry.register_artifact("lora", "x", folder, base_model="m")
    with pytest.raises(AlignError, match="does not exist"):
        registry.register_artifact("adapter", "x", tmp_path / "missing", base_model="m")


def test_a_resumed_run_registering_its_folder_again_gets_its_artifact_back(registry):
    """A run killed after registering its artifact, then resumed, registers the same folder again: no second version."""
    run = registry.start_run("sft", run_id="sft-run")
    folder = run.dir / "adapter"
    folder.mkdir()
    first = registry.register_artifact("adapter", "sft", folder, base_model="m", run=run, meta={"loss": 1.0})
    again = registry.register_artifact("adapter", "sft", folder, base_model="m", run=run, meta={"loss": 0.5})
    assert again.ref == first.ref == "adapter:sft@1" and again.meta == {"loss": 0.5}
    other_run = registry.start_run("sft", run_id="other-run")
    assert registry.register_artifact("adapter", "sft", folder, base_model="m", run=other_run).ref == "adapter:sft@2"
    assert [a.ref for a in registry.list_artifacts()] == ["adapter:sft@1", "adapter:sft@2"]


def test_lineage_walks_by_direction_depth_and_limit(registry):
    # chat -> chat-train -> chat-train-prompts, and chat -> chat-test: a chain of three with a side branch.
    chat = registry.register([sft(i) for i in range(20)], name="chat", kind="sft")
    train, test = registry.split("chat", test_size=5, seed=0)
    prompts = registry.convert(train.ref, name="chat-train-prompts", kind="prompts")

    up = registry.lineage(prompts)
    assert up.start == prompts.node and list(up.nodes) == [prompts.node, train.node, chat.node]  # nearest first
    assert up.nodes[chat.node] == chat
    assert up.edges == [(train.node, prompts.node, "converted-to-prompts"), (chat.node, train.node, "split:train")]
    assert up.parents(train.node) == [("split:train", chat.node)]
    assert list(registry.lineage(prompts.node, depth=1).nodes) == [prompts.node, train.node]  # a key works too

    down = registry.lineage(chat, direction="down")
    assert list(down.nodes) == [chat.node, test.node, train.node, prompts.node]  # by role: split:test first
    assert (train.node, prompts.node, "converted-to-prompts") in down.edges

    both = registry.lineage(train, direction="both")
    assert set(both.nodes) == {train.node, chat.node, prompts.node}  # not the sibling
    assert len(registry.lineage(train, direction="both", limit=2).nodes) == 2  # stops once two are found
    assert registry.lineage(chat).edges == []
    with pytest.raises(ValueError, match="up, down or both"):
        registry.lineage(chat, direction="sideways")


def test_dataset_made_from_an_artifact(registry):
    folder = registry.root / "runs" / "a"
    folder.mkdir(parents=True)
    adapter = registry.register_artifact("adapter", "sft", folder, base_model="smollm2-135m")
    prompts = registry.register([{"prompt": [user("q")]}], name="p", kind="prompts")
    made = registry.register(
        [
            {
                "prompt": [user("q")],
                "completions": [[bot("x")], [bot("y")]],
                "sources": ["adapter:sft@1", "base"],
            }
        ],
        name="cands",
        kind="candidates",
        parents=[("adapter:sft", "policy"), (prompts, "prompts")],
    )
    assert registry.parents(made) == [("policy", adapter), ("prompts", prompts)]


# Export


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_export_round_trips_to_the_same_version(registry, tmp_path, suffix):
    rows = [pair(1, margin=0.5), pair(2, tie=True, weight=2.0), pair(3)]
    rows[2]["prompt"] = [user("odd\u2028line\x85breaks")]
    version = registry.register(rows, name="pairs", kind="preference")
    target = registry.export("pairs", tmp_path / "out" / f"pairs{suffix}")
    assert target.is_file()
    again, result = registry.import_file(target, name="pairs")
    assert again.ref == "pairs@1" and again.content_hash == version.content_hash
    assert result.summary() == []
    assert dataset_count(registry) == 1


def test_export_bad_suffix(registry, tmp_path):
    registry.register([sft(1)], name="chat", kind="sft")
    with pytest.raises(AlignError, match=r"must end in \.jsonl or \.parquet"):
        registry.export("chat", tmp_path / "chat.csv")
    assert list(tmp_path.glob("chat*")) == []


# Catalog


def test_catalog_in_wal_mode(registry):
    assert registry.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    other = Registry(registry.root)
    try:
        assert other.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        other.close()


def test_concurrent_registries_get_distinct_versions(tmp_path):
    workspace = tmp_path / "ws"
    registries = [Registry(workspace), Registry(workspace)]
    barrier = threading.Barrier(2)
    made, errors = [[], []], []
    steps = 20

    def work(index: int) -> None:
        try:
            barrier.wait()
            for step in range(steps):
                rows = [sft(1000 * index + step)]
                made[index].append(registries[index].register(rows, name="chat", kind="sft").version)
        except Exception as exc:  # collected: an exception in a thread would not fail the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    try:
        assert errors == []
        assert sorted(made[0] + made[1]) == list(range(1, 2 * steps + 1))
        check = Registry(workspace)
        assert [v.version for v in check.list_datasets()] == list(range(1, 2 * steps + 1))
        assert len(list((workspace / "datasets" / "chat").glob("*.parquet"))) == 2 * steps
        check.close()
    finally:
        for registry in registries:
            registry.close()


def test_artifact_on_an_artifact_links_to_it(registry):
    folder = registry.root / "runs" / "m"
    folder.mkdir(parents=True)
    merged = registry.register_artifact("model", "merged", folder, base_model="smollm2-135m")
    adapter = registry.register_artifact("adapter", "dpo", folder, base_model="model:merged")
    assert registry.parents(adapter) == [("base-model", merged)]
    assert registry.parents(merged) == [("base-model", "smollm2-135m")]
    assert registry.children(merged) == [("base-model", adapter)]
    with pytest.raises(AlignError, match="no artifact 'adapter:missing'"):
        registry.register_artifact("rm", "r", folder, base_model="adapter:missing")
    assert [a.ref for a in registry.list_artifacts()] == ["adapter:dpo@1", "model:merged@1"]


def test_the_quick_turn_check_never_passes_a_row_the_full_check_refuses():
    """check_turns skips its full check for rows that look plain; every row it skips must pass the full check."""
    import itertools

    from align.registry.schemas import RowError, _check_all_turns, _plain_turns

    def turns(roles, contents):
        return [{"role": r, "content": c} for r, c in zip(roles, contents)]

    roles = ("system", "user", "assistant", "tool")
    skipped = refused_by_full = 0
    for n in (1, 2, 3):
        for prompt_roles in itertools.product(roles, repeat=n):
            for contents in (["hi"] * n, ["hi"] * (n - 1) + ["  "]):
                prompt = turns(prompt_roles, contents)
                for reply_roles in (("assistant",), ("user",), ("assistant", "tool"), ()):
                    reply = turns(reply_roles, ["ok"] * len(reply_roles))
                    rows = {
                        "sft": {"messages": prompt},
                        "prompts": {"prompt": prompt},
                        "preference": {"prompt": prompt, "chosen": reply, "rejected": turns(["assistant"], ["no"])},
                        "feedback": {"prompt": prompt, "completion": reply, "label": True},
                    }
                    for kind, row in rows.items():
                        if not _plain_turns(kind, row):
                            continue
                        skipped += 1
                        try:
                            _check_all_turns(kind, row)
                        except RowError:
                            refused_by_full += 1
    assert skipped > 50
    assert refused_by_full == 0
