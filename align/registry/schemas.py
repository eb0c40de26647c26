"""The five dataset kinds, their canonical row schemas, and the checks every stored row passes.

Rows follow TRL's conversational formats, so a registry version loads straight into a TRL trainer:

    sft          {"messages": [msg, ...]}                   (+ optional "origin": str, JSON of how a machine made
                                                               the row: method, parent, filter scores; align expand)
    prompts      {"prompt": [msg, ...]}                       (+ optional "reference": str)
    candidates   {"prompt": [...], "completions": [[msg, ...], ...], "sources": [str, ...]}
                                                               (+ optional "gold": int, "generation": str)
    preference   {"prompt": [...], "chosen": [msg, ...], "rejected": [msg, ...]}
                                                               (+ optional "margin", "tie", "weight", and
                                                               "scores": str, JSON of rubric scores 1-5 per
                                                               attribute and reply, {"helpfulness": {"chosen":
                                                               4.5, "rejected": 2}}, either side optional)
    feedback     {"prompt": [...], "completion": [msg, ...], "label": true | false}
                                                               (TRL's unpaired preference format, for KTO:
                                                               true = a desirable reply, false = an undesirable one)

A message is {"role": "system" | "user" | "assistant" | "tool", "content": str}.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

KINDS = ("sft", "prompts", "candidates", "preference", "feedback")
ROLES = ("system", "user", "assistant", "tool")
_ROLE_SET = frozenset(ROLES)


class RowError(ValueError):
    """One bad field in one row; the importer adds the file and line."""

    def __init__(self, field: str, value: object, problem: str):
        self.field = field
        self.value = value
        self.problem = problem
        super().__init__(f"field '{field}' {problem} (got {short_repr(value)})")


def short_repr(value: object, limit: int = 80) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):  # nested too deeply, or an integer too long to print
        text = f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class KindSchema:
    required: tuple[str, ...]
    optional: tuple[str, ...]


SCHEMAS = {
    "sft": KindSchema(required=("messages",), optional=("origin",)),
    "prompts": KindSchema(required=("prompt",), optional=("reference",)),
    "candidates": KindSchema(required=("prompt", "completions", "sources"), optional=("gold", "generation")),
    "preference": KindSchema(required=("prompt", "chosen", "rejected"), optional=("margin", "tie", "weight", "scores")),
    "feedback": KindSchema(required=("prompt", "completion", "label"), optional=()),
}


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind '{kind}': choose one of {', '.join(KINDS)}")
    return kind


def validate_messages(field: str, value: object, *, last_role: str | None = None) -> list[dict]:
    """Check a conversation and return it as plain {"role", "content"} dicts."""
    if not isinstance(value, list):
        raise RowError(field, value, "must be a list of messages")
    if not value:
        raise RowError(field, value, "must hold at least one message")
    clean = []
    for i, message in enumerate(value):
        if type(message) is dict and len(message) == 2 and type(message.get("content")) is str:
            role = message.get("role")
            if role in _ROLE_SET:  # the common case, checked cheaply: an import meets it 100,000s of times
                clean.append({"role": role, "content": message["content"]})
                continue
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RowError(where, message, "must be a message object with 'role' and 'content'")
        extra = set(message) - {"role", "content"}
        if extra:
            raise RowError(f"{where}.{sorted(extra)[0]}", message[sorted(extra)[0]], "is not a message field")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"{where}.role", role, f"must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise RowError(f"{where}.content", content, "must be a string")
        clean.append({"role": role, "content": content})
    if last_role and clean[-1]["role"] != last_role:
        raise RowError(f"{field}[{len(clean) - 1}].role", clean[-1]["role"], f"must be '{last_role}' (the last turn)")
    return clean


def validate_reply(field: str, value: object) -> list[dict]:
    """A completion: assistant turns only (usually exactly one)."""
    messages = validate_messages(field, value)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise RowError(f"{field}[{i}].role", message["role"], "must be 'assistant' in a completion")
    return messages


def _number(field: str, value: object, *, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError(field, value, "must be a finite number")
    if minimum is not None and value < minimum:
        raise RowError(field, value, f"must be at least {minimum}")
    return float(value)


def _json_object(field: str, value: object) -> str:
    if isinstance(value, str):
        try:
            if isinstance(json.loads(value), dict):
                return value
        except ValueError:
            pass
    raise RowError(field, value, "must be a string holding a JSON object")


RUBRIC_SCALE = (1.0, 5.0)  # a rubric score (align label --rubric), or the mean of several
REPLY_SIDES = ("chosen", "rejected")


def _pair_scores(value: object) -> str:
    """A preference row's rubric scores as canonical JSON (sorted keys): an object, or a string holding one, of
    attribute -> {"chosen": score, "rejected": score}, each score from 1 to 5 and at least one side given."""
    scores = value
    if isinstance(value, str):
        try:
            scores = json.loads(value)
        except ValueError:
            raise RowError("scores", value, "must be a JSON object of attribute -> {chosen, rejected}") from None
    if not isinstance(scores, dict):
        raise RowError("scores", value, 'must map each attribute to {"chosen": 1-5, "rejected": 1-5}')
    low, high = RUBRIC_SCALE
    clean = {}
    for attribute, sides in scores.items():
        where = f"scores.{attribute}"
        if not isinstance(attribute, str) or not attribute.isidentifier():
            raise RowError("scores", value, f"names an attribute that is not a plain name ({attribute!r})")
        if not isinstance(sides, dict) or not sides or set(sides) - set(REPLY_SIDES):
            raise RowError(where, sides, 'must be {"chosen": score, "rejected": score} (either side may be left out)')
        clean[attribute] = {}
        for side in REPLY_SIDES:
            if sides.get(side) is not None:
                score = _number(f"{where}.{side}", sides[side])
                if not low <= score <= high:
                    raise RowError(f"{where}.{side}", sides[side], f"must be a rubric score from {low:g} to {high:g}")
                clean[attribute][side] = score
    return json.dumps(clean, sort_keys=True)


def read_scores(row: dict) -> dict[str, dict[str, float]]:
    """A preference row's rubric scores as {attribute: {"chosen": x, "rejected": y}} ({} without any)."""
    scores = row.get("scores")
    if scores is None:
        return {}
    return json.loads(scores) if isinstance(scores, str) else scores


def validate_row(kind: str, row: dict) -> dict:
    """Return the canonical form of one row of `kind`, or raise RowError naming the field."""
    if not isinstance(row, dict):
        raise RowError("(row)", row, "must be an object")
    schema = SCHEMAS[check_kind(kind)]
    for name in schema.required:
        if name not in row or row[name] is None:
            raise RowError(name, row.get(name), f"is required for a '{kind}' row")
    unknown = set(row) - set(schema.required) - set(schema.optional)
    if unknown:
        name = sorted(unknown)[0]
        raise RowError(name, row[name], f"is not a field of a '{kind}' row")

    if kind == "sft":
        messages = validate_messages("messages", row["messages"])
        if not any(m["role"] == "assistant" for m in messages):
            raise RowError("messages", row["messages"], "must contain at least one assistant turn")
        if row.get("origin") is None:
            return {"messages": messages}
        return {"messages": messages, "origin": _json_object("origin", row["origin"])}

    prompt = validate_messages("prompt", row["prompt"], last_role="user")
    out: dict = {"prompt": prompt}
    if kind == "prompts":
        if row.get("reference") is not None:
            if not isinstance(row["reference"], str):
                raise RowError("reference", row["reference"], "must be a string (a reference answer)")
            out["reference"] = row["reference"]
        return out

    if kind == "preference":
        out["chosen"] = validate_reply("chosen", row["chosen"])
        out["rejected"] = validate_reply("rejected", row["rejected"])
        if row.get("margin") is not None:
            out["margin"] = _number("margin", row["margin"])
        if row.get("weight") is not None:
            out["weight"] = _number("weight", row["weight"], minimum=0.0)
        if row.get("tie") is not None:
            if not isinstance(row["tie"], bool):
                raise RowError("tie", row["tie"], "must be true or false")
            out["tie"] = row["tie"]
        if row.get("scores") is not None:
            out["scores"] = _pair_scores(row["scores"])
        return out

    if kind == "feedback":
        out["completion"] = validate_reply("completion", row["completion"])
        if not isinstance(row["label"], bool):
            raise RowError("label", row["label"], "must be true (a desirable reply) or false (an undesirable one)")
        out["label"] = row["label"]
        return out

    # candidates
    completions, sources = row["completions"], row["sources"]
    if not isinstance(completions, list) or len(completions) < 2:
        raise RowError("completions", completions, "must be a list of at least two completions")
    out["completions"] = [validate_reply(f"completions[{i}]", c) for i, c in enumerate(completions)]
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise RowError("sources", sources, "must be a list of strings (one source name per completion)")
    if len(sources) != len(completions):
        raise RowError("sources", sources, f"must have one name per completion ({len(completions)})")
    out["sources"] = list(sources)
    if row.get("gold") is not None:
        gold = row["gold"]
        if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(completions):
            raise RowError("gold", gold, f"must be the index of the best completion (0..{len(completions) - 1})")
        out["gold"] = gold
    if row.get("generation") is not None:
        if not isinstance(row["generation"], str):
            raise RowError("generation", row["generation"], "must be a string (JSON of the sampling settings)")
        out["generation"] = row["generation"]
    return out


def check_turns(kind: str, row: dict) -> None:
    """The checks an imported row passes beyond its schema, or a RowError naming the message: no empty message,
    and turns in the order chat templates take (an optional system message first, then user and assistant turns
    alternating from a user turn; tool turns only after an assistant or tool turn, and followed by an assistant
    turn). `row` is a valid canonical row of `kind`; stored rows a stage generates are not held to this."""
    if not _plain_turns(kind, row):
        _check_all_turns(kind, row)


def _check_all_turns(kind: str, row: dict) -> None:
    if kind == "sft":
        conversations = [[("messages", i, m) for i, m in enumerate(row["messages"])]]
    else:
        prompt = [("prompt", i, m) for i, m in enumerate(row["prompt"])]
        replies = {"preference": [("chosen", row.get("chosen")), ("rejected", row.get("rejected"))]}
        replies["feedback"] = [("completion", row.get("completion"))]
        replies["candidates"] = [(f"completions[{n}]", c) for n, c in enumerate(row.get("completions", []))]
        conversations = [
            prompt + [(name, i, m) for i, m in enumerate(reply)] for name, reply in replies.get(kind, [])
        ] or [prompt]
    for conversation in conversations:
        for name, i, message in conversation:
            if not message["content"] or message["content"].isspace():
                raise RowError(f"{name}[{i}].content", message["content"], "is empty")
    for conversation in conversations:
        _check_order(conversation)


def _plain_turns(kind: str, row: dict) -> bool:
    """True when the row certainly passes check_turns: no empty message, an optional system message, then user
    and assistant turns alternating from the user, and each reply one assistant turn. A cheap test for the usual
    row; anything else (tool turns, multi-turn replies, a problem) takes the full check, which names the field."""
    messages = row["messages"] if kind == "sft" else row["prompt"]
    expected = "user"
    for position, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if not content or content.isspace():
            return False
        if role == "system" and position == 0:
            continue
        if role != expected:
            return False
        expected = "assistant" if role == "user" else "user"
    replies = {"preference": ("chosen", "rejected"), "feedback": ("completion",)}.get(kind)
    if replies is None:
        return kind in ("sft", "prompts") or (kind == "candidates" and not row.get("completions"))
    if expected != "assistant":
        return False
    for name in replies:
        reply = row.get(name)
        if not reply or len(reply) != 1:
            return False
        content = reply[0]["content"]
        if reply[0]["role"] != "assistant" or not content or content.isspace():
            return False
    return True


def _check_order(conversation: list[tuple[str, int, dict]]) -> None:
    previous = None
    for position, (name, i, message) in enumerate(conversation):
        role, where = message["role"], f"{name}[{i}].role"
        if role == "system":
            if position:
                raise RowError(where, role, "is out of order: a system message may only open the conversation")
        elif previous in (None, "system"):
            if role != "user":
                raise RowError(where, role, "is out of order: the first turn (after any system message) is 'user'")
        elif role == "tool":
            if previous not in ("assistant", "tool"):
                raise RowError(where, role, f"is out of order: a tool turn follows an assistant turn, not '{previous}'")
        elif previous == "tool":
            if role != "assistant":
                raise RowError(where, role, "is out of order: an assistant turn follows a tool turn")
        elif role == previous:
            raise RowError(where, role, f"is out of order: two '{role}' turns in a row (user and assistant alternate)")
        previous = role


def arrow_schema(kind: str, columns: list[str]):
    """The Parquet schema of a kind, for the columns present (optional ones only when used)."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    messages = pa.list_(message)
    types = {
        "messages": messages,
        "prompt": messages,
        "chosen": messages,
        "rejected": messages,
        "completions": pa.list_(messages),
        "sources": pa.list_(pa.string()),
        "reference": pa.string(),
        "gold": pa.int64(),
        "generation": pa.string(),
        "origin": pa.string(),
        "margin": pa.float64(),
        "tie": pa.bool_(),
        "weight": pa.float64(),
        "scores": pa.string(),
        "completion": messages,
        "label": pa.bool_(),
    }
    return pa.schema([(name, types[name]) for name in columns])


def ordered_columns(kind: str, rows: list[dict]) -> list[str]:
    schema = SCHEMAS[kind]
    used = set().union(*(row.keys() for row in rows)) if rows else set()
    return list(schema.required) + [name for name in schema.optional if name in used]


# Conversions between kinds: what `--kind` and `align data prompts-from` may ask for.


def last_assistant_split(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """Split a conversation into (context up to the last user turn, the assistant turns after it)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return messages[: last_user + 1], messages[last_user + 1 :]


CONVERSIONS = {("sft", "prompts"), ("preference", "prompts"), ("candidates", "prompts"), ("feedback", "prompts")}
CONVERSIONS |= {("preference", "candidates"), ("preference", "sft")}


def convert_row(row: dict, source_kind: str, target_kind: str) -> dict:
    """Turn a canonical row of one kind into another kind, where that makes sense."""
    if source_kind == target_kind:
        return row
    if (source_kind, target_kind) not in CONVERSIONS:
        raise ValueError(f"'{source_kind}' rows cannot become '{target_kind}' rows")
    # The importer hands over rows not validated yet: check what is read here, naming the field.
    if source_kind == "sft":
        row = {"messages": validate_messages("messages", row.get("messages"))}
    else:
        row = validate_row(source_kind, row)
    if target_kind == "prompts":
        if source_kind == "sft":
            context, replies = last_assistant_split(row["messages"])
            if not context:
                raise RowError("messages", row["messages"], "has no user turn to use as a prompt")
            out = {"prompt": context}
            text = "\n".join(m["content"] for m in replies if m["role"] == "assistant")
            if text:
                out["reference"] = text
            return out
        if source_kind in ("preference", "candidates", "feedback"):
            out = {"prompt": row["prompt"]}
            if source_kind == "preference" and not row.get("tie"):
                out["reference"] = "\n".join(m["content"] for m in row["chosen"])
            return out
    if target_kind == "candidates" and source_kind == "preference":
        # A known pair becomes a gold item for the ranking UI: completion 0 is the preferred one.
        out = {
            "prompt": row["prompt"],
            "completions": [row["chosen"], row["rejected"]],
            "sources": ["chosen", "rejected"],
        }
        if not row.get("tie"):
            out["gold"] = 0
        return out
    if target_kind == "sft" and source_kind == "preference":
        return {"messages": row["prompt"] + row["chosen"]}
    raise ValueError(f"'{source_kind}' rows cannot become '{target_kind}' rows")


def unpair(rows: list[dict]) -> list[dict]:
    """Preference rows as feedback rows (TRL's unpair_preference_dataset): the chosen reply desirable, the rejected
    one undesirable. Ties say neither is better, so they give no rows."""
    out = []
    for row in rows:
        if row.get("tie"):
            continue
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return out
