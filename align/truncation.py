"""Tokenize a prompt with its replies for a token budget, cutting the prompt from the left.

Reward and preference training read `prompt + reply` under the model's chat template. TRL drops a pair longer
than `max_length`; we keep it and shorten the prompt instead, from the left (the oldest context goes first):
whole turns while that is enough, so the conversation that remains is well formed, then tokens. All replies of
a row share the same shortened prompt, so truncation never hides a length difference between them.

Only a row whose longest reply alone does not fit cannot be kept whole. `overflow="drop"` (training) leaves it
out, `overflow="cut"` (scoring, evaluation) keeps the last `max_length` tokens of each reply: the end, where a
reward model reads its score. Either way the caller gets a count in `TruncationStats`, never a silent loss.

    encoded, stats = encode_rows(tokenizer, rows, 256)             # preference rows: chosen and rejected
    pair = encode(tokenizer, prompt_messages, [reply_a, reply_b], 256)
    pair.sequence(0)                                                # prompt ids + reply 0 ids
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from align.errors import AlignError

OVERFLOW = ("drop", "cut")


@dataclass
class Encoded:
    """One prompt and its replies as token ids: `prompt_ids + reply_ids[i]` is the i-th full sequence."""

    prompt_ids: list[int]
    reply_ids: list[list[int]]
    turns_removed: int = 0  # whole messages cut from the start of the prompt
    tokens_removed: int = 0  # prompt tokens cut in total (whole turns included)
    reply_cut: bool = False  # a reply alone was longer than max_length and lost its start

    def sequence(self, index: int) -> list[int]:
        return self.prompt_ids + self.reply_ids[index]

    @property
    def truncated(self) -> bool:
        return self.tokens_removed > 0 or self.reply_cut


@dataclass
class TruncationStats:
    max_length: int
    rows: int = 0
    truncated: int = 0  # rows whose prompt (or reply) was shortened
    dropped: int = 0  # rows left out: a reply alone did not fit (overflow="drop")
    replies_cut: int = 0  # rows whose replies lost their start (overflow="cut")
    prompt_tokens_removed: int = 0
    dropped_rows: list[int] = field(default_factory=list)  # indices into the input rows

    @property
    def kept(self) -> int:
        return self.rows - self.dropped

    def summary(self) -> dict:
        return {
            "max_length": self.max_length,
            "rows": self.rows,
            "kept": self.kept,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "replies_cut": self.replies_cut,
            "prompt_tokens_removed": self.prompt_tokens_removed,
        }

    def describe(self) -> str:
        text = f"{self.rows} rows at max_length {self.max_length}: {self.truncated} with the prompt cut from the left"
        if self.dropped:
            text += f", {self.dropped} dropped because a reply alone is longer than {self.max_length} tokens"
        if self.replies_cut:
            text += f", {self.replies_cut} with a reply longer than {self.max_length} tokens cut to its end"
        return text


def encode(
    tokenizer: Any,
    prompt: list[dict] | str,
    replies: Sequence[list[dict] | str],
    max_length: int,
    *,
    overflow: str = "drop",
) -> Encoded | None:
    """Token ids of `prompt` and each reply, the prompt cut from the left so that every `prompt + reply` fits.

    A conversational prompt (a list of messages) is rendered with the tokenizer's chat template; a reply may
    then be a list of assistant messages or a plain string. A plain-text prompt takes plain-text replies, each
    ending with the eos token as TRL does. Returns None when a reply alone is too long and overflow="drop".
    """
    if overflow not in OVERFLOW:
        raise AlignError(f"overflow must be one of {', '.join(OVERFLOW)} (got {overflow!r})")
    if max_length < 1:
        raise AlignError(f"max_length must be at least 1 (got {max_length})")
    if not replies:
        raise AlignError("encode needs at least one reply")
    conversational = isinstance(prompt, list)
    if conversational:
        replies = [[{"role": "assistant", "content": r}] if isinstance(r, str) else list(r) for r in replies]
        prompt_ids = _render(tokenizer, prompt)
        reply_ids = [_reply_ids(tokenizer, prompt, reply) for reply in replies]
    else:
        if not all(isinstance(r, str) for r in replies):
            raise AlignError("a plain-text prompt takes plain-text replies")
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenizer(prompt).input_ids
        reply_ids = [_ids(tokenizer, r if r.endswith(eos) else r + eos) for r in replies]

    longest = max(len(ids) for ids in reply_ids)
    if longest > max_length:
        if overflow == "drop":
            return None
        cut = [ids[-max_length:] for ids in reply_ids]
        return Encoded([], cut, len(prompt) if conversational else 0, len(prompt_ids), reply_cut=True)

    budget = max_length - longest
    if len(prompt_ids) <= budget:
        return Encoded(prompt_ids, reply_ids)
    full_length = len(prompt_ids)
    turns_removed = 0
    if conversational:
        prompt_ids, turns_removed = _drop_oldest_turns(tokenizer, prompt, budget)
    if len(prompt_ids) > budget:  # even the last user turn is too long: cut its tokens from the left
        prompt_ids = prompt_ids[len(prompt_ids) - budget :] if budget else []
    return Encoded(prompt_ids, reply_ids, turns_removed, full_length - len(prompt_ids))


def encode_rows(
    tokenizer: Any,
    rows: Sequence[dict],
    max_length: int,
    *,
    reply_fields: Sequence[str] = ("chosen", "rejected"),
    overflow: str = "drop",
    progress: bool = False,
) -> tuple[list[Encoded | None], TruncationStats]:
    """Encode each row's `prompt` with its `reply_fields`; None marks a dropped row (counted in the stats).

    A reply field may hold one reply (preference rows) or a list of replies (`completions` of candidates rows).
    """
    from tqdm.auto import tqdm

    stats = TruncationStats(max_length=max_length, rows=len(rows))
    encoded: list[Encoded | None] = []
    for index, row in enumerate(tqdm(rows, desc=f"tokenizing (max_length {max_length})", disable=not progress)):
        replies = []
        for name in reply_fields:
            value = row[name]
            many = isinstance(value, list) and value and isinstance(value[0], list)
            replies += list(value) if many else [value]
        item = encode(tokenizer, row["prompt"], replies, max_length, overflow=overflow)
        encoded.append(item)
        if item is None:
            stats.dropped += 1
            stats.dropped_rows.append(index)
            continue
        stats.truncated += item.truncated
        stats.replies_cut += item.reply_cut
        stats.prompt_tokens_removed += item.tokens_removed
    return encoded, stats


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _render(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The prompt as the model sees it before a reply: the chat template plus its generation header."""
    if not getattr(tokenizer, "chat_template", None):
        raise AlignError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat template, so it "
            "cannot render conversational rows"
        )
    return _ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def _reply_ids(tokenizer: Any, prompt: list[dict], reply: list[dict]) -> list[int]:
    """The tokens a reply adds after the prompt: the full rendering minus the prompt's rendering."""
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    if not full.startswith(head):
        raise AlignError(
            "the chat template does not render the prompt as the start of prompt + reply, so the reply "
            f"cannot be separated from the prompt (prompt ends {head[-40:]!r}, full text {full[:80]!r}...)"
        )
    return _ids(tokenizer, full[len(head) :])


def _drop_oldest_turns(tokenizer: Any, prompt: list[dict], budget: int) -> tuple[list[int], int]:
    """Drop whole turns from the start (keeping a system message) until the prompt fits the budget.

    The kept conversation always starts at a user turn, which every chat template accepts. Returns the ids of
    the shortest candidate when none fits: the caller then cuts its tokens.
    """
    system = prompt[:1] if prompt[0]["role"] == "system" else []
    starts = [i for i, message in enumerate(prompt) if message["role"] == "user" and i > len(system)]
    ids: list[int] = []
    removed = 0
    for start in starts:
        ids = _render(tokenizer, system + prompt[start:])
        removed = start - len(system)
        if len(ids) <= budget:
            break
    if not starts:  # a single user turn: nothing whole to drop
        ids = _render(tokenizer, prompt)
    return ids, removed
