"""`align expand` on a tiny model built from a config (random weights, so its tasks are noise, which the filters
and the row provenance are checked on): lineage, per-row origin, determinism, kill and resume, bad input."""

import json

import pytest
from test_resume import JOURNAL_APPEND, journal_lines, kill_mid_run, lora_adapter, run_align

from align import cli
from align.errors import AlignError, DataError
from align.expand import expand_data
from align.expansion import FILTERS, OPERATORS, ExpandSettings, origin_of
from align.registry import Registry
from align.sampling import SamplingSettings

SEEDS = [
    ("Name a fruit.", "Apple."),
    ("Add 2 and 3.", "5"),
    ("Say hi in French.", "Salut."),
    ("Name a colour.", "Blue."),
]
SAMPLING = SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=3, batch_size=2, dtype="fp32")
# Short prompts for a tiny model: two tasks per prompt, four prompts per round; its noise has one word or so.
SETTINGS = {"n": 3, "k": 2, "machine_k": 1, "round_size": 4, "min_words": 1, "max_rounds": 8}
FLAGS = ["--k", "2", "--machine-k", "1", "--round-size", "4", "--min-words", "1", "--max-rounds", "8"]
FLAGS += ["--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "1.0", "--seed", "3", "--batch-size", "2"]
FLAGS += ["--dtype", "fp32"]


@pytest.fixture
def registry(tmp_path, tiny_model_dir) -> Registry:
    registry = Registry(tmp_path / "ws")
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in SEEDS]
    registry.register(rows, name="seeds", kind="sft")
    adapter = lora_adapter(tiny_model_dir, tmp_path / "adapter")
    registry.register_artifact("adapter", "tuned", adapter, base_model=str(tiny_model_dir))
    return registry


def parents(registry, version) -> set:
    return {(role, getattr(p, "ref", getattr(p, "stage", p))) for role, p in registry.parents(version)}


def test_self_instruct_registers_sft_rows_with_their_origin_and_lineage(registry):
    version, run = expand_data(
        registry, "seeds", name="grown", model="adapter:tuned", settings=ExpandSettings(**SETTINGS), sampling=SAMPLING
    )
    assert (version.ref, version.kind, version.num_rows) == ("grown@1", "sft", 3)
    assert parents(registry, version) == {("seeds", "seeds@1"), ("model", "adapter:tuned@1"), ("produced-by", "expand")}
    pool = [q for q, _ in SEEDS]
    for row in registry.rows(version):
        origin = origin_of(row)
        assert origin["method"] == "self-instruct" and isinstance(origin["round"], int)
        assert row["messages"][0] == {"role": "user", "content": origin["instruction"]}  # the tiny model: no input
        assert row["messages"][1]["role"] == "assistant" and row["messages"][1]["content"]
        assert set(origin["scores"]) == {"rouge_l_max", "words"} and 0 <= origin["scores"]["rouge_l_max"] < 0.7
        assert 1 <= len(origin["neighbours"]) <= 3
        assert all(n["instruction"] in pool or n["instruction"] != origin["instruction"] for n in origin["neighbours"])
    # The counts: every candidate read was dropped by one filter or made a row (rows past --n are not kept).
    metrics = run.metrics
    assert metrics["kept"] == 3 and metrics["candidates"] >= metrics["kept"] + sum(metrics[f] for f in FILTERS)
    assert version.meta["counts"]["kept"] == 3 and version.meta["from"] == "seeds@1"
    assert version.meta["model"] == "adapter:tuned@1" and run.status == "completed"
    assert "| unparseable |" in (run.dir / "report.md").read_text()


def test_evol_rows_name_their_operator_and_parent_and_the_same_seed_gives_the_same_version(registry, tiny_model_dir):
    settings = ExpandSettings(**SETTINGS, method="evol", operators=("deepen", "broaden"))
    version, run = expand_data(registry, "seeds", name="evolved", model=str(tiny_model_dir), settings=settings,
                               sampling=SAMPLING)  # fmt: skip
    expected = {("seeds", "seeds@1"), ("model", str(tiny_model_dir)), ("produced-by", "expand")}
    assert parents(registry, version) == expected
    for row in registry.rows(version):
        origin = origin_of(row)
        assert origin["method"] == "evol" and origin["operator"] in ("deepen", "broaden")
        assert origin["depth"] >= 1 and origin["parent_method"] in ("seed", "evol")
        if origin["depth"] == 1:
            assert origin["parent"] in [q for q, _ in SEEDS]
        assert {"rouge_l_parent", "rouge_l_parent_precision", "words"} <= set(origin["scores"])
        assert origin["scores"]["rouge_l_parent_precision"] < 0.95  # a copy of its parent is dropped
    kept = version.meta["by_operator"]
    assert set(kept) == {"deepen", "broaden"} and sum(t.get("kept", 0) for t in kept.values()) == version.num_rows
    again, _ = expand_data(registry, "seeds", name="evolved", model=str(tiny_model_dir), settings=settings,
                           sampling=SAMPLING)  # fmt: skip
    assert again.ref == version.ref == "evolved@1"  # the same rows: content addressing gives the same version


def test_expand_killed_then_resumed_registers_what_an_uninterrupted_run_does(registry, tiny_model_dir, monkeypatch):
    import align.expand

    tiny = str(tiny_model_dir)
    argv = ["expand", "--from", "seeds", "--model", tiny, "--name", "grown", "--n", "3", *FLAGS]
    # Round 0 writes its instructions in two batches of two prompts: killed after the second batch is saved.
    killed = kill_mid_run(registry, argv, pause_after=JOURNAL_APPEND, calls=2, stage="expand")
    saved = journal_lines(killed.dir / "replies.jsonl")
    assert [line["source"] for line in saved] == ["round 0 instructions"] * 2

    loaded = []
    real_load = align.expand.load_model
    monkeypatch.setattr(align.expand, "load_model", lambda ref, *a, **k: loaded.append(ref) or real_load(ref, *a, **k))
    run_align(registry, "expand", "--resume")
    resumed = registry.get_run(killed.id)
    assert resumed.status == "completed" and loaded == [tiny]
    lines = journal_lines(killed.dir / "replies.jsonl")
    assert lines[:2] == saved and len(lines) > 2  # the saved batches kept, the rest sampled

    run_align(registry, *argv)
    straight = registry.list_runs()[-1]
    assert straight.id != killed.id
    assert resumed.outputs == straight.outputs == ["grown@1"]  # bit-exact: the very same rows
    assert journal_lines(straight.dir / "replies.jsonl") == lines
    assert resumed.metrics == straight.metrics


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--n", "0"], "error: --n must be a whole number of at least 1 (got 0)"),
        (["--method", "evol", "--operators", "deepen,shorten"],
         "error: unknown operator 'shorten' in --operators: choose from deepen, constrain, concretize, broaden"),
        (["--operators", "deepen"], "error: --operators applies to --method evol only"),
        (["--from", "qs"], "error: --from qs@1 holds 'prompts' rows, but align expand grows 'sft' data"),
        (["--from", "nothing"], "error: no dataset 'nothing' in the registry"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_a_clear_message(registry, tiny_model_dir, capsys, argv, message):
    registry.register([{"prompt": [{"role": "user", "content": "hi"}]}], name="qs", kind="prompts")
    base = ["--from", "seeds", "--model", str(tiny_model_dir), "--name", "grown"]
    code = cli.main(["--workspace", str(registry.root), "expand", *base, *argv])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.startswith(message), captured.err
    assert "Traceback" not in captured.err
    assert [run for run in registry.list_runs() if run.stage == "expand"] == []  # refused before any run starts


def test_the_origin_of_an_sft_row_is_a_json_object(registry):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    version = registry.register([row | {"origin": json.dumps({"method": "evol"})}, row], name="mixed", kind="sft")
    assert [origin_of(r) for r in registry.rows(version)] == [{"method": "evol"}, None]
    with pytest.raises(DataError, match="field 'origin' must be a string holding a JSON object"):
        registry.register([row | {"origin": "[1, 2]"}], name="bad", kind="sft")
    with pytest.raises(AlignError, match="the seed pool is empty"):
        from align.expansion import expand

        expand([], ExpandSettings(), lambda *a: [])
    assert OPERATORS == ("deepen", "constrain", "concretize", "broaden")
