"""Read a data file, recognise its format, and turn every row into the canonical rows of one kind.

Files: JSON Lines (optionally .gz), a JSON array, Parquet, CSV, or a folder saved by `datasets`.
Formats: TRL (standard or conversational; KTO's unpaired prompt/completion/label rows too), alpaca, self-instruct
seed tasks, ShareGPT, Anthropic HH.

Every problem names the file, the line (or row), the field and the value. Nothing here touches the
registry: the caller registers the rows only when the whole file converted cleanly.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import sys
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from align.errors import AlignError, DataError
from align.registry.schemas import RowError, check_turns, convert_row, short_repr, validate_row

FORMATS = ("auto", "trl", "alpaca", "self-instruct", "sharegpt", "hh")
MAX_PROBLEMS = 100


@dataclass(frozen=True)
class Limits:
    """How much one import may read, so that a small compressed file cannot fill the memory or the disk.

    max_rows: rows read from the file; max_row_bytes: bytes of one JSON Lines line, JSON array item or CSV
    record (of one row's decoded columns in Parquet); max_bytes: bytes of the whole file, counted after
    decompression (Parquet: after decoding). Parquet files and saved datasets are also checked against max_rows
    and max_bytes from their metadata, before any row is read.
    `align data import --max-rows N --max-row-bytes SIZE --max-bytes SIZE` raises them.
    """

    max_rows: int = 5_000_000
    max_row_bytes: int = 10_000_000  # 10 MB
    max_bytes: int = 2_000_000_000  # 2 GB

    def __post_init__(self):
        for name in ("max_rows", "max_row_bytes", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AlignError(f"{name} (--{name.replace('_', '-')}) must be a positive whole number, got {value!r}")

    @classmethod
    def parse(cls, *, rows: int | None = None, row_bytes: str | None = None, total_bytes: str | None = None):
        """Limits from the command line's values (sizes like '10MB', '2GB', '512KiB' or plain bytes); None keeps
        a default."""
        given = {"max_rows": rows, "max_row_bytes": parse_size(row_bytes), "max_bytes": parse_size(total_bytes)}
        return cls(**{name: value for name, value in given.items() if value is not None})


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")


def parse_size(text: str | int | None) -> int | None:
    """'10MB' -> 10_000_000, '2GiB' -> 2**31, '1500' -> 1500; None stays None."""
    if text is None or isinstance(text, int):
        return text
    found = _SIZE.fullmatch(str(text).lower())
    if not found or found.group(2) not in _UNITS:
        raise AlignError(f"invalid size {text!r}: give bytes, or a number with KB, MB, GB (or KiB, MiB, GiB)")
    return int(float(found.group(1)) * _UNITS[found.group(2)])


def format_size(size: int) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if size >= factor:
            return f"{size / factor:g} {unit}"
    return f"{size} bytes"


@dataclass
class ImportResult:
    kind: str
    format: str
    rows: list[dict]
    source_rows: int
    skipped: list[str] = field(default_factory=list)  # "line 12: why", one per skipped source row
    ignored_fields: Counter = field(default_factory=Counter)  # field name -> rows that carried it
    duplicates: list[str] = field(default_factory=list)  # "line 9: same row as line 4", one per dropped row
    odd_turns: list[str] = field(default_factory=list)  # kept, with a warning: "line 65: field ... must not be empty"

    def summary(self) -> list[str]:
        lines = []
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} of {self.source_rows} source rows:")
            lines += _first_ten(self.skipped)
        if self.duplicates:
            lines.append(f"dropped {len(self.duplicates)} exact duplicate rows (the first copy of each is kept):")
            lines += _first_ten(self.duplicates)
        if self.odd_turns:
            lines.append(
                f"kept {len(self.odd_turns)} rows with an empty message or turns out of order (TRL trains on them "
                "as they are; fix them if they are mistakes):"
            )
            lines += _first_ten(self.odd_turns)
        if self.ignored_fields:
            names = ", ".join(f"{name} ({count} rows)" for name, count in sorted(self.ignored_fields.items()))
            lines.append(f"ignored fields that no '{self.kind}' row holds: {names}")
        return lines


def _first_ten(reasons: list[str]) -> list[str]:
    lines = [f"  {reason}" for reason in reasons[:10]]
    if len(reasons) > 10:
        lines.append(f"  ... and {len(reasons) - 10} more")
    return lines


# Reading files: yield (location, raw row) pairs. Text files are read as a stream, decompressed as they are
# read, so the limits stop a decompression bomb after max_bytes rather than after inflating it whole.


def read_rows(path: Path, limits: Limits | None = None) -> Iterator[tuple[str, object]]:
    limits = limits or Limits()
    if not path.exists():
        raise AlignError(f"{path}: no such file or folder")
    if path.is_dir():
        yield from _read_saved_dataset(path, limits)
        return
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _read_parquet(path, limits)
        return
    stream = _TextStream(path, limits)
    if name.endswith(".csv") or name.endswith(".csv.gz"):
        yield from _read_csv(stream)
    elif stream.first_byte() == b"[":
        yield from _read_json_array(stream)
    else:
        yield from _read_jsonl(stream)


class _TextStream:
    """A text file's lines (decompressed when it ends in .gz), within the limits, with clear errors."""

    def __init__(self, path: Path, limits: Limits):
        self.path = path
        self.limits = limits
        self.compressed = path.name.lower().endswith(".gz")
        self.line = 0  # the last line read, for messages

    def _open(self):
        try:
            return gzip.open(self.path, "rb") if self.compressed else open(self.path, "rb")
        except OSError as exc:
            raise AlignError(f"cannot read {self.path}: {exc.strerror or exc}") from None

    def _reading(self, read, size: int) -> bytes:
        try:
            return read(size)
        except (OSError, EOFError, zlib.error) as exc:
            if not self.compressed:
                raise AlignError(f"cannot read {self.path}: {getattr(exc, 'strerror', None) or exc}") from None
            after = f" (after line {self.line})" if self.line else ""
            raise self.error(None, f"not a valid gzip file, or a damaged one{after}: {exc}") from None

    def first_byte(self) -> bytes:
        """The first byte that is not whitespace (b"" for an empty file)."""
        total = 0
        with self._open() as handle:
            while chunk := self._reading(handle.read, 65536):
                stripped = chunk.lstrip(b" \t\r\n")
                if stripped:
                    return stripped[:1]
                total += len(chunk)
                self._check_total(total)
        return b""

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, bytes of the line with its newline); a line over max_row_bytes stops the import."""
        limit, total = self.limits.max_row_bytes, 0
        with self._open() as handle:
            while line := self._reading(handle.readline, limit + 2):
                self.line += 1
                total += len(line)
                self._check_total(total)
                if len(line) > limit and len(line.rstrip(b"\r\n")) > limit:
                    raise self._too_long(f"line {self.line}")
                yield self.line, line

    def text(self) -> str:
        """The whole file as text (a JSON array is decoded whole), read no further than max_bytes."""
        data = bytearray()
        with self._open() as handle:
            while chunk := self._reading(handle.read, 1 << 20):
                data += chunk
                self._check_total(len(data))
        return self.decode(data, 1)

    def decode(self, data: bytes, first_line: int) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = first_line + data.count(b"\n", 0, exc.start)
            column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
            bad = data[exc.start : exc.start + 1].hex()
            raise self.error(
                f"line {line}", f"text is not UTF-8 (byte 0x{bad} at column {column}); re-save the file as UTF-8"
            ) from None

    def _check_total(self, total: int) -> None:
        if total > self.limits.max_bytes:
            where = f" (stopped at line {self.line})" if self.line else ""
            unpacked = " once decompressed" if self.compressed else ""
            raise self.error(
                None,
                f"more than {format_size(self.limits.max_bytes)}{unpacked}{where}, the limit max_bytes; "
                "raise it with --max-bytes",
            )

    def _too_long(self, location: str) -> DataError:
        return self.error(
            location,
            f"a row longer than {format_size(self.limits.max_row_bytes)}, the limit max_row_bytes; "
            "raise it with --max-row-bytes",
        )

    def error(self, location: str | None, problem: str) -> DataError:
        where = f"{self.path} {location}" if location else str(self.path)
        return DataError([f"{where}: {problem}"], str(self.path))


def _too_deep(stream: _TextStream, location: str) -> DataError:
    return stream.error(
        location, f"JSON nested too deeply to read (over the {sys.getrecursionlimit():,} levels Python allows)"
    )


class _HugeNumber:
    """An integer too long for Python to convert (over 4,300 digits): validation names the field that holds it."""

    def __init__(self, digits: str):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<an integer of {len(self.digits.lstrip('-'))} digits>"


def _parse_int(digits: str) -> int | _HugeNumber:
    limit = sys.get_int_max_str_digits()
    return _HugeNumber(digits) if limit and len(digits.lstrip("-")) > limit else int(digits)


_DECODER = json.JSONDecoder(parse_int=_parse_int)


def _read_jsonl(stream: _TextStream) -> Iterator[tuple[str, object]]:
    # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 etc., which JSON strings may hold.
    for number, raw in stream.lines():
        line = stream.decode(raw[:-1] if raw.endswith(b"\n") else raw, number)
        if not line.strip():
            continue
        try:
            yield f"line {number}", _DECODER.decode(line)
        except json.JSONDecodeError as exc:
            raise stream.error(
                f"line {number}", f"malformed JSON: {exc.msg} at column {exc.colno} ({short_repr(line)})"
            ) from None
        except RecursionError:
            raise _too_deep(stream, f"line {number}") from None


def _read_json_array(stream: _TextStream) -> Iterator[tuple[str, object]]:
    # Decode item by item so each row keeps the line it starts on (lines counted as the position moves on).
    text = stream.text()
    counted, line = 0, 1

    def line_at(position: int) -> int:
        nonlocal counted, line
        line += text.count("\n", counted, position)
        counted = position
        return line

    position = text.index("[") + 1
    number = 0
    while True:
        position = _skip_space(text, position)
        if position < len(text) and text[position] == "]":
            rest = _skip_space(text, position + 1)
            if rest < len(text):
                raise stream.error(f"line {line_at(rest)}", "malformed JSON: extra data after the closing ']'")
            return
        start = line_at(position)
        try:
            item, end = _DECODER.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise stream.error(f"line {exc.lineno}", f"malformed JSON: {exc.msg} at column {exc.colno}") from None
        except RecursionError:
            raise _too_deep(stream, f"line {start}") from None
        limit = stream.limits.max_row_bytes
        if end - position > limit // 4 and len(text[position:end].encode()) > limit:  # 1-4 bytes a character
            raise stream._too_long(f"line {start}")
        number += 1
        yield f"line {start}", item
        position = _skip_space(text, end)
        if position < len(text) and text[position] == ",":
            position += 1
        elif position >= len(text) or text[position] != "]":
            raise stream.error(f"line {line_at(position)}", f"malformed JSON: expected ',' or ']' after item {number}")


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


def _read_csv(stream: _TextStream) -> Iterator[tuple[str, object]]:
    # A quoted cell may span lines: a record's size is what the reader consumed between two records.
    limit = stream.limits.max_row_bytes
    csv.field_size_limit(max(csv.field_size_limit(), limit))
    consumed = 0

    def lines() -> Iterator[str]:
        nonlocal consumed
        for number, raw in stream.lines():
            consumed += len(raw)
            yield stream.decode(raw, number)

    reader = csv.DictReader(lines())
    while True:
        start = consumed
        try:
            if reader.fieldnames is None:  # reads the header: an empty file has none
                return
            start = start or consumed  # the header is not a row
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise stream.error(f"line {reader.line_num}", f"malformed CSV: {exc}") from None
        line = reader.line_num
        if consumed - start > limit:
            raise stream._too_long(f"line {line}")
        clean = {}
        for key, value in row.items():
            if key is None:
                raise stream.error(f"line {line}", f"more cells than header columns ({short_repr(value)})")
            clean[key] = _csv_cell(key, value)
        yield f"line {line}", clean


def _csv_cell(key: str, value: str | None) -> object:
    if value is None or (value == "" and key in _CSV_NUMBER_FIELDS | {"tie", "label"}):
        return None
    stripped = value.strip()
    try:
        if key in _CSV_JSON_FIELDS and stripped[:1] in ("[", "{"):
            return _DECODER.decode(stripped)
        if key in _CSV_NUMBER_FIELDS:
            return _DECODER.decode(stripped)
    except (json.JSONDecodeError, RecursionError):
        return value  # left as text: validation names the field and value
    if key in ("tie", "label") and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    return value


def _read_parquet(path: Path, limits: Limits) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    def unreadable(exc: Exception) -> DataError:
        return DataError([f"{path}: not a readable Parquet file ({exc})"], str(path))

    try:
        parquet = pq.ParquetFile(path)
        meta = parquet.metadata
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))  # uncompressed
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise unreadable(exc) from None
    _check_counts(path, meta.num_rows, size, limits)
    # Those sizes are of the encoded data: a dictionary-encoded column may decode to far more. Decode a few rows
    # at a time and count what they take.
    batches = parquet.iter_batches(batch_size=64)
    number = total = 0
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            total += batch.nbytes
            if total > limits.max_bytes:
                raise DataError(
                    [
                        f"{path}: more than {format_size(limits.max_bytes)} once decoded (stopped at row "
                        f"{number + batch.num_rows}), the limit max_bytes; raise it with --max-bytes"
                    ],
                    str(path),
                )
            if batch.nbytes > limits.max_row_bytes:  # maybe one row is too long: measure each
                for i in range(batch.num_rows):
                    if batch.slice(i, 1).nbytes > limits.max_row_bytes:
                        raise DataError(
                            [
                                f"{path} row {number + i + 1}: a row longer than {format_size(limits.max_row_bytes)},"
                                " the limit max_row_bytes; raise it with --max-row-bytes"
                            ],
                            str(path),
                        )
            rows = batch.to_pylist()
        except DataError:
            raise
        except Exception as exc:
            raise unreadable(exc) from None
        for row in rows:
            number += 1
            yield f"row {number}", row


def _check_counts(path: Path, rows: int, size: int, limits: Limits) -> None:
    """Parquet files and saved datasets say how many rows and bytes they hold: check before reading them."""
    if rows > limits.max_rows:
        raise DataError(
            [f"{path}: {rows:,} rows, more than {limits.max_rows:,}, the limit max_rows; raise it with --max-rows"],
            str(path),
        )
    if size > limits.max_bytes:
        raise DataError(
            [
                f"{path}: {format_size(size)} of data, more than {format_size(limits.max_bytes)}, the limit "
                "max_bytes; raise it with --max-bytes"
            ],
            str(path),
        )


_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _read_saved_dataset(path: Path, limits: Limits) -> Iterator[tuple[str, object]]:
    if not any((path / marker).exists() for marker in _SAVED_MARKERS):
        raise AlignError(f"{path}: a folder must be a dataset saved with datasets' save_to_disk")
    for marker in _SAVED_MARKERS:
        if (path / marker).is_file():
            try:
                json.loads((path / marker).read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise AlignError(
                    f"{path / marker}: not valid JSON ({exc}), so {path} is a damaged saved dataset; save it again"
                ) from None
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # a missing or damaged data file, a state.json that names the wrong files, ...
        cause = str(exc).splitlines()[0] if str(exc) else ""
        raise AlignError(
            f"{path}: cannot load this saved dataset ({type(exc).__name__}: {cause}); save it again"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        if len(loaded) != 1:
            splits = ", ".join(loaded)
            raise AlignError(f"{path} holds several splits ({splits}): import one, e.g. {path / next(iter(loaded))}")
        loaded = next(iter(loaded.values()))
    _check_counts(path, loaded.num_rows, loaded.data.nbytes, limits)
    rows = iter(loaded)
    number = 0
    while True:
        try:
            row = next(rows, None)
        except Exception as exc:
            raise DataError([f"{path} row {number + 1}: cannot read this saved dataset ({exc})"], str(path)) from None
        if row is None:
            return
        number += 1
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
    if "completion" in keys and "label" in keys:
        return "feedback"  # TRL's unpaired preference rows (KTO)
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
        "preference": {"prompt", "chosen", "rejected", "margin", "tie", "weight", "scores"},
        "feedback": {"prompt", "completion", "label"},
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
    for key in ("chosen", "rejected", "completion"):
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


def import_file(
    path: str | Path, *, kind: str | None = None, fmt: str = "auto", limits: Limits | None = None
) -> ImportResult:
    """Read and convert a whole file. Raises DataError listing every bad row; returns nothing half-done.

    Rows that hold an empty message or turns out of order (see schemas.check_turns) are kept and counted, with
    the first few named: TRL trains on them, the registry stores them (generated replies may be empty, the HH
    data holds both kinds), and an exported version must import again. Exact duplicates of an earlier row are
    dropped and counted.
    """
    path = Path(path)
    limits = limits or Limits()
    if fmt not in FORMATS:
        raise AlignError(f"unknown format '{fmt}': choose one of {', '.join(FORMATS)}")
    result: ImportResult | None = None
    problems: list[str] = []
    source_kind = None
    seen: dict[int, int] = {}  # hash of a stored row -> index of the first row with that hash
    origins: list[str] = []  # where each stored row came from
    for location, raw in read_rows(path, limits):
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
        if result.source_rows > limits.max_rows:
            raise DataError(
                [f"{path}: more than {limits.max_rows:,} rows, the limit max_rows; raise it with --max-rows"],
                str(path),
            )
        try:
            rows, ignored = _convert(fmt, source_kind, raw)
            result.ignored_fields.update(ignored)
            checked = []
            for row in rows:
                try:
                    target = convert_row(row, source_kind, result.kind)
                except RowError:
                    raise
                except ValueError as exc:
                    raise AlignError(f"cannot import {fmt} rows as '{result.kind}': {exc}") from None
                target = validate_row(result.kind, target)
                try:
                    check_turns(result.kind, target)
                except RowError as exc:
                    result.odd_turns.append(f"{location}: {exc}")
                checked.append(target)
        except SkipRow as reason:
            result.skipped.append(f"{location}: {reason}")
            continue
        except RowError as exc:
            problems.append(f"{path} {location}: {exc}")
        except RecursionError:  # a value nested so deeply that comparing or printing it overflows the stack
            problems.append(f"{path} {location}: a value is nested too deeply to check")
        else:
            for row in checked:
                key = hash(_hashable(row))
                first = seen.get(key)
                if first is not None and result.rows[first] == row:
                    result.duplicates.append(f"{location}: same row as {origins[first]}")
                    continue
                seen.setdefault(key, len(result.rows))  # two different rows with one hash: both kept
                result.rows.append(row)
                origins.append(location)
        if len(problems) >= MAX_PROBLEMS:
            break
    if problems:
        raise DataError(problems, str(path))
    if result is None or not result.rows:
        why = "it holds no rows" if result is None else f"all {result.source_rows} rows were skipped"
        raise DataError([f"{path} is empty: {why}"], str(path))
    return result


def _hashable(row: dict) -> tuple:
    """A canonical row as nested tuples, to find exact duplicates: validate_row builds every row, and every
    message in it, with its keys in one order."""
    return tuple([(key, _hashable_value(value)) for key, value in row.items()])


def _hashable_value(value: object) -> object:
    if isinstance(value, list):
        return tuple([_hashable_value(item) for item in value])
    if isinstance(value, dict):  # a message: {"role": ..., "content": ...}
        return tuple(value.values())
    return value


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
        "(messages | prompt/completion | prompt/completion/label | prompt/chosen/rejected | prompt/completions | "
        "prompt), alpaca "
        "(instruction/input/output), self-instruct (instruction/instances), ShareGPT (conversations) or "
        "Anthropic HH (chosen/rejected transcripts). Pass --format to say which."
    )
