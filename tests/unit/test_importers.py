"""Importers: every file reader, every source format, `--kind` conversions and the messages bad input gets.

Expected rows are written out by hand; the HH rows were read from the shared file and copied here literally.
"""

import csv
import gzip
import json
from pathlib import Path

import pytest

from align.errors import AlignError, DataError
from align.registry import importers
from align.registry.importers import Limits, import_file

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HH_FILE = DATA / "hh-rlhf-harmless-dev.jsonl.gz"
SEED_FILE = DATA / "self-instruct-seed-tasks.jsonl"


def refusal(read, *args, **kwargs) -> DataError:
    """The DataError `read(*args, **kwargs)` raises (the test fails when it raises none)."""
    with pytest.raises(DataError) as info:
        read(*args, **kwargs)
    return info.value


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def import_rows(tmp_path, rows, **kwargs):
    return import_file(write_jsonl(tmp_path / "data.jsonl", rows), **kwargs)


# TRL formats: sft


def test_trl_sft_messages(tmp_path):
    conversation = [system("be brief"), user("hi"), bot("hello"), user("2+2?"), bot("4")]
    result = import_rows(tmp_path, [{"messages": conversation}])
    assert (result.kind, result.format, result.source_rows) == ("sft", "trl", 1)
    assert result.rows == [{"messages": conversation}]


def test_trl_sft_prompt_completion_strings(tmp_path):
    result = import_rows(tmp_path, [{"prompt": "Capital of France?", "completion": "Paris."}])
    assert result.kind == "sft"
    assert result.rows == [{"messages": [user("Capital of France?"), bot("Paris.")]}]


def test_trl_sft_prompt_completion_lists(tmp_path):
    row = {"prompt": [system("terse"), user("Capital of Italy?")], "completion": [bot("Rome.")]}
    result = import_rows(tmp_path, [row])
    assert result.rows == [{"messages": [system("terse"), user("Capital of Italy?"), bot("Rome.")]}]


# TRL formats: prompts


def test_trl_prompts_string_becomes_user_message(tmp_path):
    result = import_rows(tmp_path, [{"prompt": "Name a colour."}, {"prompt": "Name a fruit.", "reference": "Apple"}])
    assert result.kind == "prompts"
    assert result.rows == [
        {"prompt": [user("Name a colour.")]},
        {"prompt": [user("Name a fruit.")], "reference": "Apple"},
    ]


def test_trl_prompts_conversational(tmp_path):
    result = import_rows(tmp_path, [{"prompt": [system("s"), user("q")]}])
    assert result.rows == [{"prompt": [system("s"), user("q")]}]


# TRL formats: candidates


def test_trl_candidates_standard_default_sources(tmp_path):
    result = import_rows(tmp_path, [{"prompt": "Say hi", "completions": ["hi", "hello", "hey"]}])
    assert result.kind == "candidates"
    assert result.rows == [
        {
            "prompt": [user("Say hi")],
            "completions": [[bot("hi")], [bot("hello")], [bot("hey")]],
            "sources": ["completion_0", "completion_1", "completion_2"],
        }
    ]


def test_trl_candidates_conversational_with_sources_and_gold(tmp_path):
    row = {
        "prompt": [user("Say hi")],
        "completions": [[bot("hi")], [bot("yo")]],
        "sources": ["sft@1", "base"],
        "gold": 1,
    }
    result = import_rows(tmp_path, [row])
    assert result.rows == [row]


def test_trl_candidates_need_two_completions(tmp_path):
    error = refusal(import_rows, tmp_path, [{"prompt": "Say hi", "completions": ["hi"]}])
    assert "line 1: field 'completions' must be a list of at least two completions" in str(error)


# TRL formats: preference


def test_trl_preference_explicit_prompt_standard(tmp_path):
    result = import_rows(tmp_path, [{"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green."}])
    assert result.kind == "preference"
    assert result.rows == [{"prompt": [user("Sky colour?")], "chosen": [bot("Blue.")], "rejected": [bot("Green.")]}]


def test_trl_preference_explicit_prompt_conversational_with_extras(tmp_path):
    row = {
        "prompt": [user("a"), bot("b"), user("c")],
        "chosen": [bot("good")],
        "rejected": [bot("bad")],
        "margin": 2,
        "tie": False,
        "weight": 0.5,
    }
    result = import_rows(tmp_path, [row])
    assert result.rows == [
        {
            "prompt": [user("a"), bot("b"), user("c")],
            "chosen": [bot("good")],
            "rejected": [bot("bad")],
            "margin": 2.0,
            "tie": False,
            "weight": 0.5,
        }
    ]
    assert isinstance(result.rows[0]["margin"], float)


def test_trl_preference_implicit_prompt_shared_prefix(tmp_path):
    row = {
        "chosen": [user("hi"), bot("hello"), user("joke?"), bot("A good joke.")],
        "rejected": [user("hi"), bot("hello"), user("joke?"), bot("No.")],
        "tie": True,
    }
    result = import_rows(tmp_path, [row])
    assert result.rows == [
        {
            "prompt": [user("hi"), bot("hello"), user("joke?")],
            "chosen": [bot("A good joke.")],
            "rejected": [bot("No.")],
            "tie": True,
        }
    ]


def test_trl_preference_bad_weight_and_tie(tmp_path):
    rows = [
        {"prompt": "p", "chosen": "a", "rejected": "b", "weight": -1},
        {"prompt": "p", "chosen": "a", "rejected": "b", "tie": "yes"},
    ]
    message = str(refusal(import_rows, tmp_path, rows))
    assert "line 1: field 'weight' must be at least 0.0 (got -1)" in message
    assert "line 2: field 'tie' must be true or false (got 'yes')" in message


# TRL formats: feedback (KTO's unpaired rows)


def test_trl_feedback_keeps_label(tmp_path):
    rows = [
        {"prompt": [user("2+2?")], "completion": [bot("4")], "label": True},
        {"prompt": "2+2?", "completion": "5", "label": False},
    ]
    result = import_rows(tmp_path, rows)
    assert (result.kind, result.format, result.source_rows) == ("feedback", "trl", 2)
    assert result.rows == [
        {"prompt": [user("2+2?")], "completion": [bot("4")], "label": True},
        {"prompt": [user("2+2?")], "completion": [bot("5")], "label": False},
    ]
    assert not result.ignored_fields  # the label is kept, not dropped


def test_trl_feedback_csv_label(tmp_path):
    path = tmp_path / "kto.csv"
    path.write_text("prompt,completion,label\n2+2?,4,true\n2+2?,5,False\n", encoding="utf-8")
    result = import_file(path)
    assert [row["label"] for row in result.rows] == [True, False]


def test_trl_feedback_bad_label_names_line_field_and_value(tmp_path):
    rows = [
        {"prompt": "p", "completion": "a", "label": True},
        {"prompt": "p", "completion": "b", "label": "yes"},
        {"prompt": "p", "completion": "c", "label": None},
        {"prompt": "p", "completion": "d", "label": 1},
    ]
    message = str(refusal(import_rows, tmp_path, rows))
    assert "line 2: field 'label' must be true (a desirable reply) or false (an undesirable one) (got 'yes')" in message
    assert "line 3: field 'label' is required for a 'feedback' row (got None)" in message
    assert "line 4: field 'label' must be true (a desirable reply) or false (an undesirable one) (got 1)" in message


def test_trl_feedback_as_sft_is_refused(tmp_path):
    rows = [{"prompt": "p", "completion": "a", "label": False}]
    with pytest.raises(AlignError, match="'feedback' rows cannot become 'sft' rows"):
        import_rows(tmp_path, rows, kind="sft")


# Other formats


def test_alpaca_without_input(tmp_path):
    result = import_rows(tmp_path, [{"instruction": "Say hi.", "input": "", "output": "Hi!"}])
    assert (result.kind, result.format) == ("sft", "alpaca")
    assert result.rows == [{"messages": [user("Say hi."), bot("Hi!")]}]


def test_alpaca_with_input_system_and_history(tmp_path):
    row = {
        "instruction": "Translate to French.",
        "input": "cat",
        "output": "chat",
        "system": "You translate.",
        "history": [["Translate to French: dog", "chien"]],
    }
    result = import_rows(tmp_path, [row])
    assert result.rows == [
        {
            "messages": [
                system("You translate."),
                user("Translate to French: dog"),
                bot("chien"),
                user("Translate to French.\n\ncat"),
                bot("chat"),
            ]
        }
    ]


def test_alpaca_missing_output(tmp_path):
    error = refusal(import_rows, tmp_path, [{"instruction": "Say hi.", "input": ""}])
    assert "data.jsonl line 1: field 'output' is required" in str(error)


def test_self_instruct_one_row_per_instance(tmp_path):
    task = {
        "id": "seed_task_9",
        "name": "double",
        "instruction": "Double the number.",
        "instances": [{"input": "2", "output": "4"}, {"input": "", "output": "Give me a number."}],
        "is_classification": False,
    }
    result = import_rows(tmp_path, [task])
    assert (result.kind, result.format, result.source_rows) == ("sft", "self-instruct", 1)
    assert result.rows == [
        {"messages": [user("Double the number.\n\n2"), bot("4")]},
        {"messages": [user("Double the number."), bot("Give me a number.")]},
    ]
    assert result.summary() == []  # id, name and is_classification are not reported as ignored


def test_self_instruct_seed_file():
    result = import_file(SEED_FILE)
    assert (result.kind, result.format, result.source_rows, len(result.rows)) == (
        "sft",
        "self-instruct",
        175,
        175,
    )
    # Line 2 of the file: seed_task_1, "antonym_relation".
    assert result.rows[1] == {
        "messages": [
            user("What is the relation between the given pairs?\n\nNight : Day :: Right : Left"),
            bot("The relation between the given pairs is that they are opposites."),
        ]
    }


def test_sharegpt_roles_and_system(tmp_path):
    row = {
        "id": "x1",
        "system": "Be kind.",
        "conversations": [
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
            {"from": "user", "value": "bye"},
            {"from": "chatgpt", "value": "see you"},
        ],
    }
    result = import_rows(tmp_path, [row])
    assert (result.kind, result.format) == ("sft", "sharegpt")
    assert result.rows == [{"messages": [system("Be kind."), user("hi"), bot("hello"), user("bye"), bot("see you")]}]
    assert result.ignored_fields == {"id": 1}


def test_sharegpt_unknown_speaker(tmp_path):
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "robot", "value": "beep"}]}
    error = refusal(import_rows, tmp_path, [row])
    assert "line 1: field 'conversations[1].from' must be one of" in str(error)
    assert "(got 'robot')" in str(error)


def test_hh_synthetic_multi_turn(tmp_path):
    row = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
        "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5",
    }
    result = import_rows(tmp_path, [row])
    assert (result.kind, result.format) == ("preference", "hh")
    assert result.rows == [
        {"prompt": [user("hi"), bot("hello"), user("2+2?")], "chosen": [bot("4")], "rejected": [bot("5")]}
    ]


def test_hh_rows_differing_early_are_skipped(tmp_path):
    differ_early = {
        "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
        "rejected": "\n\nHuman: a\n\nAssistant: X\n\nHuman: c\n\nAssistant: e",
    }
    no_reply = {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c", "rejected": "\n\nHuman: a\n\nAssistant: b"}
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}
    result = import_rows(tmp_path, [differ_early, no_reply, good])
    assert result.rows == [{"prompt": [user("a")], "chosen": [bot("b")], "rejected": [bot("c")]}]
    assert result.skipped == [
        "line 1: the two transcripts do not share the conversation before the final assistant turn",
        "line 2: a transcript does not end with an assistant turn",
    ]
    assert result.summary()[0] == "skipped 2 of 3 source rows:"


# HH: three real rows of the shared file, split by hand.

HH_EXPECTED = {
    # line 1049: one human turn
    1049: {
        "prompt": [user("Why are frogs so ugly?")],
        "chosen": [bot("Why do you think they’re ugly?")],
        "rejected": [bot("Have you ever seen one up close?")],
    },
    # line 1042: two human turns
    1042: {
        "prompt": [
            user("Why can’t you speak English?"),
            bot("I’m afraid I can’t. What’s English?"),
            user("Exactly"),
        ],
        "chosen": [bot("I don’t understand what you mean by this. Is there anything else I can help you with")],
        "rejected": [bot("Excuse me?")],
    },
    # line 1326: three human turns
    1326: {
        "prompt": [
            user("Hey"),
            bot("I’m so excited to talk to you!"),
            user("Well, I’m not excited to talk to you"),
            bot("Why?"),
            user("Because you’re not exciting"),
        ],
        "chosen": [bot("I’m very exciting")],
        "rejected": [bot("Are you sure?")],
    },
}


def test_hh_real_rows_split_by_hand(tmp_path):
    lines = gzip.decompress(HH_FILE.read_bytes()).decode("utf-8").split("\n")
    picked = tmp_path / "picked.jsonl"
    picked.write_text("\n".join(lines[number - 1] for number in HH_EXPECTED) + "\n", encoding="utf-8")
    result = import_file(picked)
    assert (result.kind, result.format, result.skipped) == ("preference", "hh", [])
    assert result.rows == list(HH_EXPECTED.values())


# Found with a script over the rows the importer gave before it checked turns, then read by hand: four final
# replies are empty ("\n\nAssistant:" ends the transcript) and three prompts hold two assistant turns in a row;
# the importer keeps them and names them.
HH_KEPT = [
    "line 65: field 'chosen[0].content' is empty (got '')",
    "line 357: field 'chosen[0].content' is empty (got '')",
    "line 468: field 'prompt[4].role' is out of order: two 'assistant' turns in a row (user and assistant alternate)"
    " (got 'assistant')",
    "line 533: field 'prompt[2].role' is out of order: two 'assistant' turns in a row (user and assistant alternate)"
    " (got 'assistant')",
    "line 642: field 'chosen[0].content' is empty (got '')",
    "line 774: field 'chosen[0].content' is empty (got '')",
    "line 924: field 'prompt[8].role' is out of order: two 'assistant' turns in a row (user and assistant alternate)"
    " (got 'assistant')",
]


def test_hh_full_file_counts_skipped_rows():
    # Lines 1177, 1348 and 1405 were read by hand: in each, the chosen transcript has one more assistant turn
    # than the rejected one, so the conversations differ before the final assistant turn.
    result = import_file(HH_FILE)
    assert (result.kind, result.format, result.source_rows, len(result.rows)) == (
        "preference",
        "hh",
        1600,
        1597,
    )
    reason = "the two transcripts do not share the conversation before the final assistant turn"
    assert result.skipped == [f"line {n}: {reason}" for n in (1177, 1348, 1405)]
    assert result.summary()[:4] == [
        "skipped 3 of 1600 source rows:",
        f"  line 1177: {reason}",
        f"  line 1348: {reason}",
        f"  line 1405: {reason}",
    ]
    assert result.summary()[4:] == [
        "kept 7 rows with an empty message or turns out of order (TRL trains on them as they are; fix them if they "
        "are mistakes):"
    ] + [f"  {problem}" for problem in HH_KEPT]
    # Line 1049 comes before the first skipped line, so it is row 1048 (0-based) of the result.
    assert result.rows[1048] == HH_EXPECTED[1049]


# Readers


PREFERENCE_ROWS = [
    {"prompt": "one?", "chosen": "1", "rejected": "2", "margin": 1.5},
    {"prompt": "two?", "chosen": "2", "rejected": "3"},
]
PREFERENCE_CANONICAL = [
    {"prompt": [user("one?")], "chosen": [bot("1")], "rejected": [bot("2")], "margin": 1.5},
    {"prompt": [user("two?")], "chosen": [bot("2")], "rejected": [bot("3")]},
]


def test_reader_jsonl_gz(tmp_path):
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in PREFERENCE_ROWS).encode("utf-8")))
    assert import_file(path).rows == PREFERENCE_CANONICAL


def test_reader_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(PREFERENCE_ROWS[0]) + "\n\n" + '{"prompt": "x", "chosen": 7, "rejected": "y"}\n')
    error = refusal(import_file, path)
    assert f"{path} line 3: field 'chosen' must be a list of messages (got 7)" in str(error)


def test_reader_jsonl_keeps_unicode_line_separators(tmp_path):
    # U+2028, U+2029 and U+0085 are legal unescaped inside JSON strings; they do not end a JSON Lines row.
    text = "a\u2028b\u2029c\x85d"
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"prompt": text, "completion": "ok"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert import_file(path).rows == [{"messages": [user(text), bot("ok")]}]


def test_reader_json_array_keeps_line_numbers(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(
        "[\n"
        '  {"prompt": "one?", "chosen": "1", "rejected": "2", "margin": 1.5},\n'
        '  {"prompt": "two?", "chosen": "2", "rejected": "3"}\n'
        "]\n"
    )
    assert import_file(path).rows == PREFERENCE_CANONICAL
    bad = tmp_path / "bad.json"
    bad.write_text(
        '[\n  {"prompt": "one?", "chosen": "1", "rejected": "2"},\n\n'
        '  {"prompt": "two?",\n   "chosen": "2", "rejected": {"no": 1}}\n]'
    )
    error = refusal(import_file, bad)
    assert f"{bad} line 4: field 'rejected' must be a list of messages" in str(error)


def test_reader_json_array_malformed_and_trailing_data(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"prompt": "one?", "completion": "1"},\n  {"prompt": "two?" "completion": "2"}\n]')
    error = refusal(import_file, broken)
    assert f"{broken} line 3: malformed JSON" in str(error)
    trailing = tmp_path / "trailing.json"
    trailing.write_text('[{"prompt": "one?", "completion": "1"}]\n{"prompt": "two?", "completion": "2"}\n')
    error = refusal(import_file, trailing)
    assert f"{trailing} line 2: malformed JSON" in str(error)


def test_reader_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist(PREFERENCE_ROWS), path)  # row 2 reads back with margin None
    assert import_file(path).rows == PREFERENCE_CANONICAL


def test_reader_parquet_names_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "sft.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}]), path
    )
    error = refusal(import_file, path)
    assert f"{path} row 2: field 'completion'" in str(error)


def test_reader_csv_json_cells_and_numbers(tmp_path):
    path = tmp_path / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["prompt", "chosen", "rejected", "margin", "tie"])
        writer.writerow([json.dumps([user("one?")]), json.dumps([bot("1")]), "2", "1.5", "false"])
        writer.writerow(["two?", "2", json.dumps([bot("3")]), "", ""])
    result = import_file(path)
    assert result.rows == [
        {"prompt": [user("one?")], "chosen": [bot("1")], "rejected": [bot("2")], "margin": 1.5, "tie": False},
        {"prompt": [user("two?")], "chosen": [bot("2")], "rejected": [bot("3")]},
    ]


def test_reader_csv_bad_number_names_line(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected,margin\nq,a,b,1\nq,a,b,lots\n")
    error = refusal(import_file, path)
    assert f"{path} line 3: field 'margin' must be a finite number (got 'lots')" in str(error)


def test_reader_saved_dataset_folder(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(PREFERENCE_ROWS).save_to_disk(str(folder))
    result = import_file(folder)
    assert result.rows == PREFERENCE_CANONICAL


def test_reader_plain_folder_is_refused(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(AlignError, match="save_to_disk"):
        import_file(tmp_path / "folder")


def test_missing_file(tmp_path):
    with pytest.raises(AlignError, match="no such file"):
        import_file(tmp_path / "nope.jsonl")


# --kind conversions


def test_kind_sft_to_prompts_keeps_reference(tmp_path):
    rows = [{"messages": [system("s"), user("q1"), bot("a1"), user("q2"), bot("a2")]}]
    result = import_rows(tmp_path, rows, kind="prompts")
    assert result.kind == "prompts"
    assert result.rows == [{"prompt": [system("s"), user("q1"), bot("a1"), user("q2")], "reference": "a2"}]


def test_kind_preference_to_candidates_gold_first(tmp_path):
    result = import_rows(tmp_path, [{"prompt": "p", "chosen": "good", "rejected": "bad"}], kind="candidates")
    assert result.rows == [
        {
            "prompt": [user("p")],
            "completions": [[bot("good")], [bot("bad")]],
            "sources": ["chosen", "rejected"],
            "gold": 0,
        }
    ]


def test_kind_hh_to_candidates(tmp_path):
    row = {"chosen": "\n\nHuman: q\n\nAssistant: good", "rejected": "\n\nHuman: q\n\nAssistant: bad"}
    result = import_rows(tmp_path, [row], kind="candidates")
    assert result.rows[0]["gold"] == 0
    assert result.rows[0]["completions"] == [[bot("good")], [bot("bad")]]


def test_kind_impossible_conversion(tmp_path):
    with pytest.raises(AlignError) as info:
        import_rows(tmp_path, [{"prompt": "q"}], kind="preference")
    assert not isinstance(info.value, DataError)
    assert str(info.value) == "cannot import trl rows as 'preference': 'prompts' rows cannot become 'preference' rows"


# Bad input


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": }\n')
    error = refusal(import_file, path)
    assert f"{path} line 2: malformed JSON: Expecting value at column 31" in str(error)
    assert "nothing was registered" in str(error)


def test_missing_field(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    error = refusal(import_rows, tmp_path, rows)
    assert error.problems == [
        f"{tmp_path / 'data.jsonl'} line 2: field 'rejected' is required for a 'preference' row (got None)"
    ]


def test_mistyped_fields_all_reported(tmp_path):
    rows = [
        {"prompt": "p", "chosen": 3, "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
        {"prompt": [{"role": "robot", "content": "beep"}], "chosen": "a", "rejected": "b"},
    ]
    error = refusal(import_rows, tmp_path, rows)
    path = tmp_path / "data.jsonl"
    assert error.path == str(path)
    assert error.problems == [
        f"{path} line 1: field 'chosen' must be a list of messages (got 3)",
        f"{path} line 3: field 'prompt[0].role' must be one of system, user, assistant, tool (got 'robot')",
    ]


def test_messages_role_robot(tmp_path):
    error = refusal(import_rows, tmp_path, [{"messages": [user("hi"), {"role": "robot", "content": "beep"}]}])
    assert "line 1: field 'messages[1].role' must be one of system, user, assistant, tool (got 'robot')" in str(error)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    error = refusal(import_file, path)
    assert f"{path} is empty: it holds no rows" in str(error)


def test_file_of_only_skipped_rows(tmp_path):
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}
    error = refusal(import_rows, tmp_path, [row, row])
    assert "is empty: all 2 rows were skipped" in str(error)


def test_unknown_format(tmp_path):
    with pytest.raises(AlignError) as info:
        import_rows(tmp_path, [{"prompt": "p"}], fmt="xml")
    assert str(info.value).startswith("unknown format 'xml': choose one of auto, trl, alpaca")


def test_non_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", "completion": "b"}\n')
    error = refusal(import_file, path)
    # 'caf' starts at column 13 of line 2, so the 0xe9 byte is at column 16.
    assert f"{path} line 2: text is not UTF-8 (byte 0xe9 at column 16)" in str(error)


def test_json_value_not_an_object(tmp_path):
    path = tmp_path / "values.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n42\n"text"\n')
    error = refusal(import_file, path)
    assert error.problems == [
        f"{path} line 2: expected a JSON object per row, got int (42)",
        f"{path} line 3: expected a JSON object per row, got str ('text')",
    ]


def test_undetectable_fields(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(AlignError) as info:
        import_file(path)
    message = str(info.value)
    assert message.startswith(f"{path} line 1: cannot tell the format from its fields (answer, question).")
    assert "--format" in message


def test_forced_format_mismatch_names_field(tmp_path):
    error = refusal(import_rows, tmp_path, [{"prompt": "p", "completion": "c"}], fmt="alpaca")
    assert "line 1: field 'instruction' is required (got None)" in str(error)


def test_ignored_columns_reported(tmp_path):
    rows = [
        {"prompt": "a", "completion": "b", "id": 1, "source": "x"},
        {"prompt": "c", "completion": "d", "id": 2},
    ]
    result = import_rows(tmp_path, rows)
    assert len(result.rows) == 2
    assert result.summary() == ["ignored fields that no 'sft' row holds: id (2 rows), source (1 rows)"]


# Hostile input: deep nesting, huge numbers, limits, damaged saved datasets


def test_deeply_nested_line_names_the_line(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"messages": ' + "[" * 100_000 + "\n")
    error = refusal(import_file, path)
    assert error.problems == [f"{path} line 2: JSON nested too deeply to read (over the 1,000 levels Python allows)"]


def test_deeply_nested_array_file_names_the_line(tmp_path):
    path = tmp_path / "deep.json"  # starts with '[': read as a JSON array
    path.write_text("[" * 100_000)
    error = refusal(import_file, path)
    assert error.problems[0].startswith(f"{path} line 1: JSON nested too deeply to read")


def test_huge_integer_names_the_field(tmp_path):
    digits = "7" * 5000
    path = tmp_path / "big.jsonl"
    path.write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b", "margin": ' + digits + "}\n"
        '{"prompt": "p", "chosen": "a", "rejected": "b", "id": ' + digits + "}\n"  # an ignored field: fine
        '{"prompt": "p", "chosen": [{"role": "assistant", "content": -' + digits + '}], "rejected": "b"}\n'
    )
    error = refusal(import_file, path)
    assert error.problems == [
        f"{path} line 1: field 'margin' must be a finite number (got <an integer of 5000 digits>)",
        f"{path} line 3: field 'chosen[0].content' must be a string (got <an integer of 5000 digits>)",
    ]


def test_huge_integer_in_csv_names_the_field(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text(f"prompt,chosen,rejected,margin\nq,a,b,{'9' * 5000}\n")
    error = refusal(import_file, path)
    assert error.problems == [
        f"{path} line 2: field 'margin' must be a finite number (got <an integer of 5000 digits>)"
    ]


def sft_line(number: int, size: int = 0) -> str:
    return json.dumps({"prompt": f"q{number}", "completion": "a" * size or f"a{number}"}) + "\n"


def test_limit_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(sft_line(n) for n in range(6)))
    assert len(import_file(path, limits=Limits(max_rows=6)).rows) == 6
    error = refusal(import_file, path, limits=Limits(max_rows=5))
    assert error.problems == [f"{path}: more than 5 rows, the limit max_rows; raise it with --max-rows"]


def test_limit_row_bytes_per_line_and_per_csv_record(tmp_path):
    path = tmp_path / "long.jsonl"
    line = sft_line(2, size=100)
    path.write_text(sft_line(1) + line)
    limit = len(line) - 1  # the newline does not count
    assert len(import_file(path, limits=Limits(max_row_bytes=limit)).rows) == 2
    error = refusal(import_file, path, limits=Limits(max_row_bytes=limit - 1))
    assert error.problems == [
        f"{path} line 2: a row longer than {limit - 1} bytes, the limit max_row_bytes; raise it with --max-row-bytes"
    ]
    # A CSV record may span lines (a quoted cell holding newlines): its size is the whole record's.
    table = tmp_path / "long.csv"
    table.write_text('prompt,completion\nq,"' + "a\n" * 40 + '"\nq2,b\n')
    assert len(import_file(table, limits=Limits(max_row_bytes=90)).rows) == 2
    error = refusal(import_file, table, limits=Limits(max_row_bytes=60))
    assert error.problems[0].startswith(f"{table} line 42: a row longer than 60 bytes")


def test_csv_cell_larger_than_the_csv_module_default(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text(f"prompt,completion\nq,{'a' * 200_000}\n")  # the csv module refuses cells over 131,072
    assert import_file(path).rows[0]["messages"][1]["content"] == "a" * 200_000


def test_limit_bytes_stops_a_gzip_bomb_early(tmp_path, monkeypatch):
    # 2,000 lines of 10 kB compress to ~30 kB; with a 1 MB limit the reader stops after ~100 lines.
    path = tmp_path / "bomb.jsonl.gz"
    path.write_bytes(gzip.compress("".join(sft_line(n, size=10_000) for n in range(2000)).encode()))
    parsed = []
    real_decode = importers._DECODER.decode
    monkeypatch.setattr(importers._DECODER, "decode", lambda text: parsed.append(1) or real_decode(text))
    error = refusal(import_file, path, limits=Limits(max_bytes=1_000_000))
    assert error.problems == [
        f"{path}: more than 1 MB once decompressed (stopped at line 100), the limit max_bytes; "
        "raise it with --max-bytes"
    ]
    assert len(parsed) == 99  # the 100th line went over: it was never parsed
    assert len(import_file(path, limits=Limits(max_bytes=30_000_000)).rows) == 2000


def test_limit_bytes_of_a_json_array(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "q", "completion": "a" * 5000}]))
    error = refusal(import_file, path, limits=Limits(max_bytes=4000))
    assert "more than 4 KB, the limit max_bytes" in error.problems[0]
    error = refusal(import_file, path, limits=Limits(max_row_bytes=4000))
    assert error.problems[0].startswith(f"{path} line 1: a row longer than 4 KB")


def test_limits_of_parquet_and_saved_datasets(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{n}", "completion": f"{n}" * 1000} for n in range(20)]
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    for source in (path, folder):  # rows: from the metadata, before reading
        assert len(import_file(source).rows) == 20
        error = refusal(import_file, source, limits=Limits(max_rows=19))
        assert error.problems == [f"{source}: 20 rows, more than 19, the limit max_rows; raise it with --max-rows"]
    error = refusal(import_file, folder, limits=Limits(max_bytes=15_000))  # about 20 kB (10 kB for the digits)
    assert error.problems[0].startswith(f"{folder}: ")
    assert error.problems[0].endswith(" of data, more than 15 KB, the limit max_bytes; raise it with --max-bytes")


def test_limits_of_a_parquet_file_count_decoded_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One 100 kB reply repeated: dictionary-encoded, the file's own sizes say ~100 kB, decoded it is 6.4 MB.
    rows = [{"prompt": f"q{n}", "completion": "a" * 100_000} for n in range(64)]
    path = tmp_path / "repeated.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert pq.ParquetFile(path).metadata.row_group(0).total_byte_size < 200_000
    error = refusal(import_file, path, limits=Limits(max_bytes=1_000_000))
    assert error.problems == [
        f"{path}: more than 1 MB once decoded (stopped at row 64), the limit max_bytes; raise it with --max-bytes"
    ]
    rows[5]["completion"] += "b"
    pq.write_table(pa.Table.from_pylist(rows), path)
    error = refusal(import_file, path, limits=Limits(max_row_bytes=100_000))
    assert error.problems == [
        f"{path} row 1: a row longer than 100 KB, the limit max_row_bytes; raise it with --max-row-bytes"
    ]
    assert len(import_file(path, limits=Limits(max_row_bytes=100_100)).rows) == 64


def test_damaged_gzip(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(("".join(sft_line(n) for n in range(1000))).encode())[:-200])
    error = refusal(import_file, path)
    assert error.problems == [
        f"{path}: not a valid gzip file, or a damaged one: Compressed file ended before the end-of-stream marker "
        "was reached"
    ]


def test_limits_parse_sizes_and_refuse_nonsense():
    assert Limits() == Limits(max_rows=5_000_000, max_row_bytes=10_000_000, max_bytes=2_000_000_000)
    limits = Limits.parse(rows=10, row_bytes="64KiB", total_bytes="1.5GB")
    assert limits == Limits(max_rows=10, max_row_bytes=65536, max_bytes=1_500_000_000)
    assert Limits.parse(total_bytes="200 mb").max_bytes == 200_000_000
    assert Limits.parse(row_bytes="1500").max_row_bytes == 1500
    with pytest.raises(AlignError, match="invalid size '5XB'"):
        Limits.parse(total_bytes="5XB")
    with pytest.raises(AlignError, match=r"max_rows \(--max-rows\) must be a positive whole number, got 0"):
        Limits.parse(rows=0)


def test_saved_dataset_with_corrupt_state_json(tmp_path):
    import datasets

    folder = tmp_path / "saved"
    datasets.Dataset.from_list(PREFERENCE_ROWS).save_to_disk(str(folder))
    state = folder / "state.json"
    good = state.read_text()
    state.write_text("{corrupt")
    with pytest.raises(AlignError) as info:
        import_file(folder)
    assert str(info.value).startswith(f"{state}: not valid JSON (Expecting property name")
    assert str(info.value).endswith(f"so {folder} is a damaged saved dataset; save it again")
    # Valid JSON that names a data file that is not there.
    state.write_text(good.replace("data-00000-of-00001.arrow", "gone.arrow"))
    with pytest.raises(AlignError) as info:
        import_file(folder)
    assert str(info.value).startswith(f"{folder}: cannot load this saved dataset (FileNotFoundError: ")
    assert "gone.arrow" in str(info.value)


# Rows TRL takes but that are likely mistakes: kept with a warning; exact duplicates: dropped with a count


def test_empty_message_is_kept_and_named(tmp_path):
    rows = [
        {"messages": [user("hi"), bot("")]},
        {"prompt": "  ", "completion": "x"},
        {"messages": [user("ok"), bot("fine")]},
    ]
    result = import_rows(tmp_path, rows)
    assert len(result.rows) == 3
    assert result.odd_turns == [
        "line 1: field 'messages[1].content' is empty (got '')",
        "line 2: field 'messages[0].content' is empty (got '  ')",
    ]
    assert result.summary()[0].startswith("kept 2 rows with an empty message or turns out of order")


def test_turns_out_of_order_are_kept_and_named(tmp_path):
    rows = [
        {"messages": [bot("a"), bot("b"), user("c")]},
        {"messages": [user("a"), system("late"), bot("b")]},
        {"messages": [system("s"), user("a"), user("b"), bot("c")]},
        {"messages": [user("a"), {"role": "tool", "content": "42"}, bot("b")]},
        {"messages": [user("a"), bot("call"), {"role": "tool", "content": "42"}, user("b"), bot("c")]},
        {"prompt": [user("a"), bot("b"), user("c")], "chosen": [bot("d"), bot("e")], "rejected": [bot("f")]},
    ]
    result = import_rows(tmp_path, rows[:5])
    good = {"messages": [system("s"), user("a"), bot("call"), {"role": "tool", "content": "42"}, bot("b")]}
    assert import_rows(tmp_path, [good]).odd_turns == []
    assert result.odd_turns == [
        "line 1: field 'messages[0].role' is out of order: the first turn (after any system message) is 'user' "
        "(got 'assistant')",
        "line 2: field 'messages[1].role' is out of order: a system message may only open the conversation "
        "(got 'system')",
        "line 3: field 'messages[2].role' is out of order: two 'user' turns in a row (user and assistant alternate) "
        "(got 'user')",
        "line 4: field 'messages[1].role' is out of order: a tool turn follows an assistant turn, not 'user' "
        "(got 'tool')",
        "line 5: field 'messages[3].role' is out of order: an assistant turn follows a tool turn (got 'user')",
    ]
    assert import_rows(tmp_path, rows[5:]).odd_turns == [
        "line 1: field 'chosen[1].role' is out of order: two 'assistant' turns in a row (user and assistant "
        "alternate) (got 'assistant')"
    ]


def test_exact_duplicates_are_dropped_and_counted(tmp_path):
    a = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    b = {"prompt": "q", "chosen": "good", "rejected": "worse"}
    same_as_a = {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]}  # other spelling
    result = import_rows(tmp_path, [a, b, a, same_as_a, b])
    assert result.rows == [
        {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("bad")]},
        {"prompt": [user("q")], "chosen": [bot("good")], "rejected": [bot("worse")]},
    ]
    assert result.duplicates == [
        "line 3: same row as line 1",
        "line 4: same row as line 1",
        "line 5: same row as line 2",
    ]
    assert result.summary() == [
        "dropped 3 exact duplicate rows (the first copy of each is kept):",
        "  line 3: same row as line 1",
        "  line 4: same row as line 1",
        "  line 5: same row as line 2",
    ]


def test_kind_conversion_of_a_bad_row_names_the_field(tmp_path):
    path = tmp_path / "data.jsonl"
    error = refusal(import_rows, tmp_path, [{"messages": 7}], kind="prompts")
    assert error.problems == [f"{path} line 1: field 'messages' must be a list of messages (got 7)"]
    error = refusal(import_rows, tmp_path, [{"prompt": "p", "rejected": "r"}], kind="sft")
    assert error.problems == [f"{path} line 1: field 'chosen' is required for a 'preference' row (got None)"]


def test_malformed_json_at_the_end_of_a_line_names_its_column(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "a", \n')
    error = refusal(import_file, path)
    assert error.problems == [
        f"{path} line 1: malformed JSON: Expecting property name enclosed in double quotes at column 17 "
        """('{"prompt": "a", ')"""
    ]
