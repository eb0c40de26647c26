"""align/truncation.py: prompts cut from the left so the replies survive, counted drops, on token counts worked
out by hand. The tiny tokenizer is byte-level with no merges: one token per byte, one per special token.

ChatML turn = <|im_start|> + role + "\\n" + content + <|im_end|> + "\\n" = 1 + len(role) + 1 + len(content) + 2.
"""

import pytest

from align.errors import AlignError
from align.truncation import encode, encode_rows

PROMPT = [
    {"role": "user", "content": "aaaa"},  # 1 + 4 + 1 + 4 + 2 = 12 tokens
    {"role": "assistant", "content": "bb"},  # 1 + 9 + 1 + 2 + 2 = 15
    {"role": "user", "content": "cc"},  # 1 + 4 + 1 + 2 + 2 = 10
]  # + the generation header <|im_start|>assistant\n: 11 -> 48 prompt tokens
CHOSEN = [{"role": "assistant", "content": "x"}]  # x<|im_end|>\n: 3 tokens
REJECTED = [{"role": "assistant", "content": "yy"}]  # 4 tokens


def text(tokenizer, ids):
    return tokenizer.decode(ids)


def test_a_pair_that_fits_is_untouched(tiny_tokenizer):
    pair = encode(tiny_tokenizer, PROMPT, [CHOSEN, REJECTED], 52)
    assert (len(pair.prompt_ids), [len(r) for r in pair.reply_ids]) == (48, [3, 4])
    assert not pair.truncated
    full = tiny_tokenizer.apply_chat_template(PROMPT + CHOSEN, tokenize=False)
    assert text(tiny_tokenizer, pair.sequence(0)) == full


def test_oldest_whole_turns_go_first(tiny_tokenizer):
    pair = encode(tiny_tokenizer, PROMPT, [CHOSEN, REJECTED], 40)  # budget 40 - 4 = 36 for the prompt
    assert text(tiny_tokenizer, pair.prompt_ids) == "<|im_start|>user\ncc<|im_end|>\n<|im_start|>assistant\n"
    assert (pair.turns_removed, pair.tokens_removed) == (2, 27)
    assert text(tiny_tokenizer, pair.sequence(1)).endswith("yy<|im_end|>\n")  # both replies whole, same prompt
    assert len(pair.sequence(1)) <= 40


def test_then_tokens_from_the_left_of_the_last_turn(tiny_tokenizer):
    pair = encode(tiny_tokenizer, PROMPT, [CHOSEN, REJECTED], 20)  # budget 16 < 21 tokens of the last turn
    assert len(pair.prompt_ids) == 16 and pair.tokens_removed == 48 - 16
    assert text(tiny_tokenizer, pair.prompt_ids) == "\ncc<|im_end|>\n<|im_start|>assistant\n"
    assert len(pair.sequence(1)) == 20 and len(pair.sequence(0)) == 19


def test_a_system_message_is_kept_when_turns_are_dropped(tiny_tokenizer):
    prompt = [{"role": "system", "content": "s"}, *PROMPT]  # system turn: 1 + 6 + 1 + 1 + 2 = 11 tokens
    pair = encode(tiny_tokenizer, prompt, [CHOSEN, REJECTED], 40)  # 11 + 21 = 32 <= 36
    assert text(tiny_tokenizer, pair.prompt_ids).startswith("<|im_start|>system\ns<|im_end|>\n<|im_start|>user\ncc")
    assert pair.turns_removed == 2


def test_a_reply_longer_than_max_length_drops_the_row_or_keeps_its_end(tiny_tokenizer):
    assert encode(tiny_tokenizer, PROMPT, [CHOSEN, REJECTED], 3) is None
    cut = encode(tiny_tokenizer, PROMPT, [CHOSEN, REJECTED], 3, overflow="cut")
    assert cut.prompt_ids == [] and cut.reply_cut and cut.truncated
    assert text(tiny_tokenizer, cut.reply_ids[1]) == "y<|im_end|>\n"
    assert text(tiny_tokenizer, cut.reply_ids[0]) == "x<|im_end|>\n"


def test_encode_rows_counts_truncated_and_dropped_rows(tiny_tokenizer):
    long_reply = [{"role": "assistant", "content": "z" * 50}]
    rows = [
        {"prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
        {"prompt": PROMPT[-1:], "chosen": CHOSEN, "rejected": REJECTED},  # 21 + 4 fits
        {"prompt": PROMPT, "chosen": long_reply, "rejected": REJECTED},  # 53-token reply
    ]
    encoded, stats = encode_rows(tiny_tokenizer, rows, 40)
    assert encoded[2] is None and encoded[0].truncated and not encoded[1].truncated
    assert stats.summary() == {
        "max_length": 40,
        "rows": 3,
        "kept": 2,
        "truncated": 1,
        "dropped": 1,
        "replies_cut": 0,
        "prompt_tokens_removed": 27,
    }
    assert stats.dropped_rows == [2] and "1 dropped" in stats.describe()
    _, cut_stats = encode_rows(tiny_tokenizer, rows, 40, overflow="cut")
    assert (cut_stats.dropped, cut_stats.replies_cut, cut_stats.truncated) == (0, 1, 2)


def test_candidates_rows_and_string_replies(tiny_tokenizer):
    row = {"prompt": PROMPT[-1:], "completions": [CHOSEN, REJECTED, [{"role": "assistant", "content": "w"}]]}
    [item], _ = encode_rows(tiny_tokenizer, [row], 64, reply_fields=("completions",))
    assert len(item.reply_ids) == 3
    as_text = encode(tiny_tokenizer, PROMPT[-1:], ["x"], 64)
    assert as_text.reply_ids[0] == item.reply_ids[0]  # a string reply is one assistant message


def test_plain_text_prompts_end_replies_with_eos(tiny_tokenizer):
    pair = encode(tiny_tokenizer, "Q: hi\nA:", [" yes", " no<|im_end|>"], 64)
    assert text(tiny_tokenizer, pair.sequence(0)) == "Q: hi\nA: yes<|im_end|>"
    assert text(tiny_tokenizer, pair.sequence(1)) == "Q: hi\nA: no<|im_end|>"
    with pytest.raises(AlignError, match="plain-text replies"):
        encode(tiny_tokenizer, "Q", [CHOSEN], 64)


def test_bad_arguments_are_clear_errors(tiny_tokenizer):
    with pytest.raises(AlignError, match="overflow must be one of"):
        encode(tiny_tokenizer, PROMPT, [CHOSEN], 64, overflow="skip")
    tiny_tokenizer.chat_template = None
    with pytest.raises(AlignError, match="no chat template"):
        encode(tiny_tokenizer, PROMPT, [CHOSEN], 64)
