"""Read a data file, recognise its format, and turn every row into the canonical rows of one kind.

Files: JSON Lines (optionally .gz), a JSON array, Parquet, CSV, or a folder saved by `datasets`.
Formats: TRL (standard or conversational), alpaca, self-instruct seed tasks, ShareGPT, Anthropic HH.

Every problem names the file, the line (or row), the field and the value. Nothing here touches the
registry: the caller registers the rows only when the whole file converted cleanly.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from align.errors import AlignError, DataError
from align.registry.schemas import RowError, convert_row, short_repr, validate_row

FORMATS = ("auto", "trl", "alpaca", "self-instruct", "sharegpt", "hh")
MAX_PROBLEMS = 100


@dataclass
class ImportResult:
    kind: str
    format: str
    rows: list[dict]
    source_rows: int
    skipped: list[str] = field(default_factory=list)  # "line 12: why", one per skipped source row
    ignored_fields: Counter = field(default_factory=Counter)  # field name -> rows that carried it

    def summary(self) -> list[str]:
        lines = []
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} of {self.source_rows} source rows:")
            lines += [f"  {reason}" for reason in self.skipped[:10]]
            if len(self.skipped) > 10:
                lines.append(f"  ... and {len(self.skipped) - 10} more")
        if self.ignored_fields:
            names = ", ".join(f"{name} ({count} rows)" for name, count in sorted(self.ignored_fields.items()))
            lines.append(f"ignored fields that no '{self.kind}' row holds: {names}")
        return lines


# Reading files: yield (location, raw row) pairs.


def read_rows(path: Path) -> Iterator[tuple[str, object]]:
    if not path.exists():
        raise AlignError(f"{path}: no such file or folder")
    if path.is_dir():
        yield from _read_saved_dataset(path)
        return
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _read_parquet(path)
        return
    text = _read_text(path)
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        yield from _read_csv(path, text)
    elif text.lstrip().startswith("["):
        yield from _read_json_array(path, text)
    else:
        yield from _read_jsonl(path, text)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as exc:
            raise DataError([f"{path}: not a valid gzip file ({exc})"], str(path)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        bad = data[exc.start : exc.start + 1].hex()
        raise DataError(
            [f"{path} line {line}: text is not UTF-8 (byte 0x{bad} at column {column}); re-save the file as UTF-8"],
            str(path),
        ) from None


def _read_jsonl(path: Path, text: str) -> Iterator[tuple[str, object]]:
    # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 etc., which JSON strings may hold.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                [f"{path} line {number}: malformed JSON: {exc.msg} at column {exc.colno} ({short_repr(line)})"],
                str(path),
            ) from None


def _read_json_array(path: Path, text: str) -> Iterator[tuple[str, object]]:
    # Decode item by item so each row keeps the line it starts on.
    decoder = json.JSONDecoder()
    position = text.index("[") + 1
    number = 0
    while True:
        position = _skip_space(text, position)
        if position < len(text) and text[position] == "]":
            rest = _skip_space(text, position + 1)
            if rest < len(text):
                line = text.count("\n", 0, rest) + 1
                raise DataError([f"{path} line {line}: malformed JSON: extra data after the closing ']'"], str(path))
            return
        try:
            item, end = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise DataError(
                [f"{path} line {exc.lineno}: malformed JSON: {exc.msg} at column {exc.colno}"], str(path)
            ) from None
        number += 1
        yield f"line {text.count(chr(10), 0, position) + 1}", item
        position = _skip_space(text, end)
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            line = text.count("\n", 0, position) + 1
            raise DataError([f"{path} line {line}: malformed JSON: expected ',' or ']' after item {number}"], str(path))


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


# CSV cells are strings: these fields are decoded from JSON or numbers when they look like them.
_CSV_JSON_FIELDS = {
    "messages",
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "completions",
    "sources",
    "conversations",
    "instances",
    "history",
}
_CSV_NUMBER_FIELDS = {"margin", "weight", "gold"}


def _read_csv(path: Path, text: str) -> Iterator[tuple[str, object]]:
    reader = csv.DictReader(io.StringIO(text))
    for row in reader:
        line = reader.line_num
        clean = {}
        for key, value in row.items():
            if key is None:
                raise DataError(
                    [f"{path} line {line}: more cells than header columns ({short_repr(value)})"], str(path)
                )
            clean[key] = _csv_cell(key, value)
        yield f"line {line}", clean


def _csv_cell(key: str, value: str | None) -> object:
    if value is None or (value == "" and key in _CSV_NUMBER_FIELDS | {"tie"}):
        return None
    stripped = value.strip()
    try:
        if key in _CSV_JSON_FIELDS and stripped[:1] in ("[", "{"):
            return json.loads(stripped)
        if key in _CSV_NUMBER_FIELDS:
            return json.loads(stripped)
    except json.JSONDecodeError:
        return value  # left as text: validation names the field and value
    if key == "tie" and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    return value


def _read_parquet(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError([f"{path}: not a readable Parquet file ({exc})"], str(path)) from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", row


def _read_saved_dataset(path: Path) -> Iterator[tuple[str, object]]:
    if not (
        (path / "dataset_info.json").exists() or (path / "state.json").exists() or (path / "dataset_dict.json").exists()
    ):
        raise AlignError(f"{path}: a folder must be a dataset saved with datasets' save_to_disk")
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            splits = ", ".join(loaded)
            raise AlignError(f"{path} holds several splits ({splits}): import one, e.g. {path / next(iter(loaded))}")
        loaded = next(iter(loaded.values()))
    for number, row in enumerate(loaded, start=1):
        yield f"row {number}", row


# Formats: each turns one raw row into (kind, canonical row) pairs, or raises RowError.


def detect_format(row: dict) -> str | None:
    keys = set(row)
    if {"instruction", "instances"} <= keys:
        return "self-instruct"
    if "instruction" in keys:
        return "alpaca"
    if "conversations" in keys:
        return "sharegpt"
    chosen = row.get("chosen")
    if "prompt" not in keys and isinstance(chosen, str) and "\n\nAssistant:" in chosen:
        return "hh"
    if trl_kind(keys):
        return "trl"
    return None


def trl_kind(keys: set) -> str | None:
    """The kind a TRL-format row holds, judged by its fields."""
    if "messages" in keys:
        return "sft"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "completions" in keys:
        return "candidates"
    if "completion" in keys:
        return "sft"
    if "prompt" in keys:
        return "prompts"
    return None


def _as_user(name: str, value: object) -> object:
    """TRL's standard (plain text) format becomes the conversational one."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


def _as_reply(value: object) -> object:
    return [{"role": "assistant", "content": value}] if isinstance(value, str) else value


def _require_text(row: dict, name: str, *, optional: bool = False) -> str:
    value = row.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise RowError(name, value, "must be a string" if name in row else "is required")
    return value


def _join_instruction(instruction: str, extra: str) -> str:
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


def convert_trl(row: dict, kind: str) -> tuple[dict, set]:
    known = {
        "sft": {"messages", "prompt", "completion"},
        "prompts": {"prompt", "reference"},
        "candidates": {"prompt", "completions", "sources", "gold", "generation"},
        "preference": {"prompt", "chosen", "rejected", "margin", "tie", "weight"},
    }[kind]
    ignored = set(row) - known
    if kind == "sft":
        if "messages" in row:
            return {"messages": row["messages"]}, ignored
        if "prompt" not in row:
            raise RowError("prompt", None, "is required next to 'completion'")
        if "completion" not in row:
            raise RowError("completion", None, "is required next to 'prompt'")
        prompt, completion = _as_user("prompt", row["prompt"]), _as_reply(row["completion"])
        if not isinstance(prompt, list) or not isinstance(completion, list):
            raise RowError("completion", row["completion"], "must be a string or a list of messages")
        return {"messages": prompt + completion}, ignored
    out = {key: row[key] for key in known if key in row}
    if kind == "preference" and "prompt" not in row:
        out.update(_implicit_prompt(row))
    if "prompt" in out:
        out["prompt"] = _as_user("prompt", out["prompt"])
    for key in ("chosen", "rejected"):
        if key in out:
            out[key] = _as_reply(out[key])
    if kind == "candidates":
        if isinstance(out.get("completions"), list):
            out["completions"] = [_as_reply(c) for c in out["completions"]]
            out.setdefault("sources", [f"completion_{i}" for i in range(len(out["completions"]))])
    return out, ignored


def _implicit_prompt(row: dict) -> dict:
    """TRL's implicit-prompt preference rows: two whole conversations that share their opening turns."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not isinstance(chosen, list) or not isinstance(rejected, list):
        raise RowError("prompt", None, "is required (or give 'chosen' and 'rejected' as whole conversations)")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return {"prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def convert_alpaca(row: dict) -> tuple[dict, set]:
    instruction = _require_text(row, "instruction")
    user = _join_instruction(instruction, _require_text(row, "input", optional=True))
    output = _require_text(row, "output")
    messages = []
    if row.get("system"):
        messages.append({"role": "system", "content": _require_text(row, "system")})
    history = row.get("history") or []
    if not isinstance(history, list):
        raise RowError("history", history, "must be a list of [instruction, response] pairs")
    for i, turn in enumerate(history):
        if not (isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise RowError(f"history[{i}]", turn, "must be an [instruction, response] pair of strings")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}, set(row) - {"instruction", "input", "output", "system", "history"}


def convert_self_instruct(row: dict) -> tuple[list[dict], set]:
    instruction = _require_text(row, "instruction")
    instances = row.get("instances")
    if not isinstance(instances, list) or not instances:
        raise RowError("instances", instances, "must be a non-empty list of {input, output}")
    rows = []
    for i, instance in enumerate(instances):
        if not isinstance(instance, dict):
            raise RowError(f"instances[{i}]", instance, "must be an object with 'input' and 'output'")
        extra = instance.get("input", "")
        output = instance.get("output")
        if not isinstance(extra, str):
            raise RowError(f"instances[{i}].input", extra, "must be a string")
        if not isinstance(output, str):
            raise RowError(f"instances[{i}].output", output, "must be a string")
        user = _join_instruction(instruction, extra)
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]})
    # id, name and is_classification describe the task, not the conversation.
    return rows, set(row) - {"instruction", "instances", "id", "name", "is_classification"}


SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
}


def convert_sharegpt(row: dict) -> tuple[dict, set]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RowError("conversations", turns, "must be a non-empty list of {from, value} turns")
    messages = []
    if isinstance(row.get("system"), str) and row["system"]:
        messages.append({"role": "system", "content": row["system"]})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowError(f"conversations[{i}]", turn, "must be an object with 'from' and 'value'")
        speaker, value = turn.get("from"), turn.get("value")
        if speaker not in SHAREGPT_ROLES:
            raise RowError(f"conversations[{i}].from", speaker, f"must be one of {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(value, str):
            raise RowError(f"conversations[{i}].value", value, "must be a string")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": value})
    return {"messages": messages}, set(row) - {"conversations", "system"}


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_hh_transcript(field_name: str, text: object) -> list[dict]:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> [{"role": "user", ...}, {"role": "assistant", ...}]."""
    if not isinstance(text, str):
        raise RowError(field_name, text, "must be a transcript string")
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise RowError(field_name, text, "must be a transcript of '\\n\\nHuman:' and '\\n\\nAssistant:' turns")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[speaker], "content": content.strip()} for speaker, content in zip(parts[1::2], parts[2::2])]


class SkipRow(Exception):
    """A source row that cannot become a row of its kind but is not an error: it is counted, not fatal."""


def convert_hh(row: dict) -> tuple[dict, set]:
    chosen = parse_hh_transcript("chosen", row.get("chosen"))
    rejected = parse_hh_transcript("rejected", row.get("rejected"))
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise SkipRow("a transcript does not end with an assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise SkipRow("the two transcripts do not share the conversation before the final assistant turn")
    if not chosen[:-1] or chosen[-2]["role"] != "user":
        raise SkipRow("no human turn before the final assistant turn")
    return {"prompt": chosen[:-1], "chosen": chosen[-1:], "rejected": rejected[-1:]}, set(row) - {
        "chosen",
        "rejected",
    }


NATURAL_KIND = {"alpaca": "sft", "self-instruct": "sft", "sharegpt": "sft", "hh": "preference"}


def import_file(path: str | Path, *, kind: str | None = None, fmt: str = "auto") -> ImportResult:
    """Read and convert a whole file. Raises DataError listing every bad row; returns nothing half-done."""
    path = Path(path)
    if fmt not in FORMATS:
        raise AlignError(f"unknown format '{fmt}': choose one of {', '.join(FORMATS)}")
    result: ImportResult | None = None
    problems: list[str] = []
    source_kind = None
    for location, raw in read_rows(path):
        if not isinstance(raw, dict):
            problems.append(
                f"{path} {location}: expected a JSON object per row, got {type(raw).__name__} ({short_repr(raw)})"
            )
            continue
        if result is None:
            fmt = fmt if fmt != "auto" else detect_format(raw) or _undetectable(path, location, raw)
            source_kind = NATURAL_KIND.get(fmt) or trl_kind(set(raw)) or _undetectable(path, location, raw)
            result = ImportResult(kind=kind or source_kind, format=fmt, rows=[], source_rows=0)
        result.source_rows += 1
        try:
            rows, ignored = _convert(fmt, source_kind, raw)
            result.ignored_fields.update(ignored)
            for row in rows:
                try:
                    target = convert_row(row, source_kind, result.kind)
                except RowError:
                    raise
                except ValueError as exc:
                    raise AlignError(f"cannot import {fmt} rows as '{result.kind}': {exc}") from None
                result.rows.append(validate_row(result.kind, target))
        except SkipRow as reason:
            result.skipped.append(f"{location}: {reason}")
        except RowError as exc:
            problems.append(f"{path} {location}: {exc}")
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        raise DataError(problems, str(path))
    if result is None or not result.rows:
        why = "it holds no rows" if result is None else f"all {result.source_rows} rows were skipped"
        raise DataError([f"{path} is empty: {why}"], str(path))
    return result


def _convert(fmt: str, source_kind: str, raw: dict) -> tuple[list[dict], set]:
    """One source row -> its canonical rows (self-instruct gives one per instance) and the ignored fields."""
    if fmt == "self-instruct":
        return convert_self_instruct(raw)
    if fmt == "trl":
        row, ignored = convert_trl(raw, source_kind)
    else:
        row, ignored = {"alpaca": convert_alpaca, "sharegpt": convert_sharegpt, "hh": convert_hh}[fmt](raw)
    return [row], ignored


def _undetectable(path: Path, location: str, raw: dict):
    fields = ", ".join(sorted(raw)) or "none"
    raise AlignError(
        f"{path} {location}: cannot tell the format from its fields ({fields}). Expected TRL fields "
        "(messages | prompt/completion | prompt/chosen/rejected | prompt/completions | prompt), alpaca "
        "(instruction/input/output), self-instruct (instruction/instances), ShareGPT (conversations) or "
        "Anthropic HH (chosen/rejected transcripts). Pass --format to say which."
    )
