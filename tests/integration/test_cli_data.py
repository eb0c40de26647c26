"""`align data ...` and `align runs list` driven in-process on the shared public files."""

import json
from pathlib import Path

import pytest

from align.cli import main

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HH_FILE = DATA / "hh-rlhf-harmless-dev.jsonl.gz"
SEED_FILE = DATA / "self-instruct-seed-tasks.jsonl"
SKIP_REASON = "the two transcripts do not share the conversation before the final assistant turn"
TWO_ASSISTANTS = "two 'assistant' turns in a row (user and assistant alternate) (got 'assistant')"


@pytest.fixture
def align(tmp_path, capsys):
    """Run `align ARGS --workspace tmp/ws`; returns (exit code, stdout, stderr)."""
    workspace = tmp_path / "ws"

    def run(*args: str) -> tuple[int, str, str]:
        code = main([*args, "--workspace", str(workspace)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def assert_user_error(code: int, err: str, *expected: str) -> None:
    assert code == 2
    assert err.startswith("error: ")
    assert err.count("error:") == 1 and "Traceback" not in err
    for text in expected:
        assert text in err


def test_data_loop(align, tmp_path):
    code, out, err = align("data", "list")
    assert code == 0 and out.startswith("no datasets in ")

    code, out, err = align("data", "import", str(HH_FILE), "--name", "hh")
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "hh@1  1597 rows  kind=preference  (format hh)",
        "skipped 3 of 1600 source rows:",
        f"  line 1177: {SKIP_REASON}",
        f"  line 1348: {SKIP_REASON}",
        f"  line 1405: {SKIP_REASON}",
        "kept 7 rows with an empty message or turns out of order (TRL trains on them as they are; fix them if they "
        "are mistakes):",
        *[f"  line {n}: field 'chosen[0].content' is empty (got '')" for n in (65, 357)],
        *[f"  line {n}: field 'prompt[{i}].role' is out of order: {TWO_ASSISTANTS}" for n, i in ((468, 4), (533, 2))],
        *[f"  line {n}: field 'chosen[0].content' is empty (got '')" for n in (642, 774)],
        f"  line 924: field 'prompt[8].role' is out of order: {TWO_ASSISTANTS}",
    ]
    code, out, _ = align("data", "import", str(SEED_FILE), "--name", "seed")
    assert (code, out) == (0, "seed@1  175 rows  kind=sft  (format self-instruct)\n")
    code, out, _ = align("data", "import", str(HH_FILE), "--name", "hh")  # same rows: same version
    assert out.splitlines()[0] == "hh@1  1597 rows  kind=preference  (format hh)"

    code, out, _ = align("data", "list")
    lines = [line.split() for line in out.splitlines()]
    assert lines[0] == ["DATASET", "KIND", "ROWS", "CREATED", "FROM"]
    assert [(cells[0], cells[1], cells[2], cells[-1]) for cells in lines[1:]] == [
        ("hh@1", "preference", "1597", "-"),
        ("seed@1", "sft", "175", "-"),
    ]

    code, out, _ = align("data", "show", "hh")
    assert code == 0
    assert out.startswith("hh@1  kind=preference  rows=1597\n")
    assert '"skipped": 3' in out and '"source_rows": 1600' in out and '"format": "hh"' in out
    schema = out.split("schema:\n")[1].split("\n\n")[0].splitlines()
    assert [line.split(":")[0].strip() for line in schema] == ["prompt", "chosen", "rejected"]
    assert all("struct<role: string, content: string>" in line for line in schema)
    assert "lineage:\n  (imported; no parents)\n" in out
    samples = out.split("sample rows (3 of 1597):\n")[1].splitlines()
    assert len(samples) == 3
    assert all(set(json.loads(line)) == {"prompt", "chosen", "rejected"} for line in samples)

    code, out, _ = align("data", "split", "hh", "--test-size", "0.1", "--seed", "1")
    # 10% of 1597 rows rounds to 160 test rows.
    assert (code, out) == (
        0,
        "hh-train@1  1437 rows  kind=preference\nhh-test@1  160 rows  kind=preference\n",
    )
    code, again, _ = align("data", "split", "hh", "--test-size", "0.1", "--seed", "1")
    assert again == out
    code, out, _ = align("data", "show", "hh-test@1", "--samples", "1")
    assert "lineage:\n  <- hh@1 (split:test)\n" in out
    assert "sample rows (1 of 160):" in out
    code, out, _ = align("data", "show", "hh")
    assert "used by: hh-test@1 (split:test), hh-train@1 (split:train)" in out

    code, out, _ = align("data", "prompts-from", "seed", "--name", "seed-prompts")
    assert (code, out) == (0, "seed-prompts@1  175 rows  kind=prompts  (from seed@1)\n")
    code, out, _ = align("data", "show", "seed-prompts")
    assert "<- seed@1 (converted-to-prompts)" in out
    assert '"reference":' in out

    target = tmp_path / "export" / "hh-test.jsonl"
    code, out, _ = align("data", "export", "hh-test", "--to", str(target))
    assert (code, out) == (0, f"wrote 160 rows of hh-test@1 to {target}\n")
    exported = target.read_text(encoding="utf-8").splitlines()
    assert len(exported) == 160
    assert set(json.loads(exported[0])) == {"prompt", "chosen", "rejected"}
    # One of the HH rows with an empty reply fell in the test split: it imports again, with its warning.
    empty_reply = "field 'chosen[0].content' is empty (got '')"
    code, out, _ = align("data", "import", str(target), "--name", "hh-test")
    assert out.splitlines()[0] == "hh-test@1  160 rows  kind=preference  (format trl)"
    assert out.splitlines()[2] == f"  line 7: {empty_reply}"
    code, out, _ = align("data", "export", "hh-test", "--to", str(tmp_path / "export" / "hh-test.parquet"))
    code, out, _ = align("data", "import", str(tmp_path / "export" / "hh-test.parquet"), "--name", "hh-test")
    assert out.splitlines()[0] == "hh-test@1  160 rows  kind=preference  (format trl)"
    assert out.splitlines()[2] == f"  row 7: {empty_reply}"


def test_workspace_before_the_subcommand(tmp_path, capsys):
    workspace = tmp_path / "ws"
    assert main(["--workspace", str(workspace), "data", "import", str(SEED_FILE), "--name", "seed"]) == 0
    assert main(["--workspace", str(workspace), "data", "list"]) == 0
    assert "seed@1" in capsys.readouterr().out
    assert (workspace / "registry.sqlite").is_file()


def test_import_with_kind(align, tmp_path):
    code, out, _ = align("data", "import", str(HH_FILE), "--name", "hh-items", "--kind", "candidates")
    assert out.splitlines()[0] == "hh-items@1  1597 rows  kind=candidates  (format hh)"
    code, out, _ = align("data", "show", "hh-items", "--samples", "1")
    sample = json.loads(out.split("sample rows (1 of 1597):\n")[1].splitlines()[0])
    assert sample["sources"] == ["chosen", "rejected"] and sample["gold"] == 0


def test_bad_input_exits_2_with_one_error_line(align, tmp_path):
    code, out, err = align("data", "show", "nope")
    assert_user_error(code, err, "no dataset 'nope'")
    assert len(err.splitlines()) == 1

    code, out, err = align("data", "show", "x@0")
    assert_user_error(code, err, "invalid reference 'x@0'")

    code, out, err = align("data", "import", str(tmp_path / "missing.jsonl"), "--name", "m")
    assert_user_error(code, err, "missing.jsonl: no such file or folder")

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 5}\n')
    code, out, err = align("data", "import", str(bad), "--name", "bad")
    assert_user_error(code, err, "nothing was registered", f"{bad} line 2: field 'completion'", "(got 5)")

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "q"}\n')
    code, out, err = align("data", "import", str(prompts), "--name", "p", "--kind", "preference")
    assert_user_error(code, err, "'prompts' rows cannot become 'preference' rows")

    code, out, err = align("data", "import", str(SEED_FILE), "--name", "../seed")
    assert_user_error(code, err, "invalid dataset name '../seed'")

    align("data", "import", str(SEED_FILE), "--name", "seed")
    code, out, err = align("data", "export", "seed", "--to", str(tmp_path / "seed.csv"))
    assert_user_error(code, err, "must end in .jsonl or .parquet")
    code, out, err = align("data", "split", "seed", "--test-size", "0")
    assert_user_error(code, err, "0 test rows out of 175")
    code, out, err = align("data", "import", str(prompts), "--name", "seed")
    assert_user_error(code, err, "already used for 'sft' data")

    code, out, _ = align("data", "list")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["seed@1"]


def test_runs_list_empty(align):
    code, out, err = align("runs", "list")
    assert (code, err) == (0, "")
    assert out.startswith("no runs in ") and out.rstrip().endswith(" yet")


def test_import_kto_file_keeps_label(align, tmp_path):
    kto = tmp_path / "kto.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": "2+2?"}], "completion": [{"role": "assistant", "content": "4"}]}
        | {"label": True},
        {"prompt": "2+2?", "completion": "5", "label": False},
    ]
    kto.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, out, err = align("data", "import", str(kto), "--name", "kto")
    assert code == 0 and "kto@1  2 rows  kind=feedback" in out, err
    exported = tmp_path / "kto-out.jsonl"
    assert align("data", "export", "kto", "--to", str(exported))[0] == 0
    assert [json.loads(line)["label"] for line in exported.read_text().splitlines()] == [True, False]

    bad = tmp_path / "bad-kto.jsonl"
    lines = [{"prompt": "a", "completion": "b", "label": True}, {"prompt": "a", "completion": "c", "label": "no"}]
    bad.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, out, err = align("data", "import", str(bad), "--name", "bad")
    assert_user_error(code, err, "nothing was registered", f"{bad} line 2: field 'label'", "(got 'no')")
