"""`align eval`'s numbers by hand: win rates, the length-controlled win rate, ROUGE and BLEU,
METEOR on Debian's WordNet and failing clearly without any, few-shot prompts, and the log-probabilities behind the
KL estimate."""

import math
import os
from pathlib import Path

import numpy as np
import pytest

from align.errors import AlignError
from align.eval_metrics import (
    DEBIAN_WORDNET,
    MetricUnavailable,
    choose_examples,
    corpus_bleu,
    example_pairs,
    few_shot_prompt,
    length_controlled_win_rate,
    load_wordnet,
    meteor_scores,
    reference_metrics,
    reply_logprobs,
    rouge_scores,
    win_outcomes,
    win_rate_with_ci,
)


def test_win_outcomes_by_hand():
    assert win_outcomes([1.0, 0.2, 0.5, -3], [0.5, 0.2, 0.7, -4]).tolist() == [1.0, 0.5, 0.0, 1.0]


def test_length_controlled_win_rate_by_hand():
    # The row wins 6 of its 8 longer replies and 1 of its 4 shorter ones: 7/12 raw. The fit is saturated (two
    # groups, x = +-tanh(1/std) by symmetry), so sigmoid(a + b x) = 3/4 and 1/4: a = 0, LC = 1/2 at equal length.
    outcomes = [1] * 6 + [0] * 2 + [1] + [0] * 3
    lengths = [1] * 8 + [-1] * 4
    assert length_controlled_win_rate(outcomes, lengths, slope_penalty=0) == pytest.approx(0.5, abs=1e-3)
    assert np.mean(outcomes) == pytest.approx(7 / 12)
    # The default prior on the slope shrinks the length effect a little: between the two.
    assert 0.5 < length_controlled_win_rate(outcomes, lengths) < 7 / 12
    # Every reply shorter by about the same amount: the lengths say nothing about equal length, so no
    # extrapolation: the LC win rate stays at the raw 5/6 (with no prior the fit could put it anywhere).
    assert length_controlled_win_rate([1, 1, 1, 1, 1, 0], [-100, -101, -99, -100, -100, -100]) == pytest.approx(
        5 / 6, abs=0.02
    )
    # Wins that do not depend on length: LC = raw win rate (3 of 4 at each length: logit a = ln 3).
    outcomes = [1, 1, 1, 0] * 2
    lengths = [5] * 4 + [-5] * 4
    assert length_controlled_win_rate(outcomes, lengths) == pytest.approx(0.75, abs=1e-3)
    assert length_controlled_win_rate(outcomes, lengths, slope_penalty=0) == pytest.approx(0.75, abs=1e-3)
    # All wins: 1 exactly (no regression); equal lengths: the raw rate.
    assert length_controlled_win_rate([1, 1, 1], [3, -2, 8]) == 1.0
    assert length_controlled_win_rate([1, 0, 0.5, 1], [0, 0, 0, 0]) == pytest.approx(0.625, abs=1e-3)


def test_win_rate_with_ci_by_hand():
    found = win_rate_with_ci([3, 1, 2, 2], [1, 2, 2, 0], [10, 5, 5, 5], [5, 10, 5, 5], rounds=200, seed=0)
    assert found["win_rate"]["value"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    assert found["win_rate"]["low"] <= found["win_rate"]["value"] <= found["win_rate"]["high"]
    assert 0 <= found["lc_win_rate"]["low"] <= found["lc_win_rate"]["high"] <= 1


def test_rouge_by_hand():
    scores = rouge_scores(["the cat sat on the mat"], ["a cat sat on a mat"])
    # Unigrams: cat, sat, on, mat shared of 6 and 6 -> F1 4/6. Bigrams: "cat sat", "sat on" of 5 and 5 -> 2/5.
    # LCS: cat sat on mat -> 4/6.
    assert scores["rouge1"] == [pytest.approx(4 / 6)]
    assert scores["rouge2"] == [pytest.approx(2 / 5)]
    assert scores["rougeL"] == [pytest.approx(4 / 6)]
    assert rouge_scores(["same words"], ["same words"])["rougeLsum"] == [1.0]


def test_bleu_by_hand():
    # n-gram precisions 4/6, 2/5, 1/4 and 0/3 (smoothed by sacrebleu's default 'exp' to 1/(2*3)); no brevity
    # penalty (6 words each): BLEU = 100 * (2/3 * 2/5 * 1/4 * 1/6) ** (1/4).
    expected = 100 * (2 / 3 * 2 / 5 * 1 / 4 * 1 / 6) ** 0.25
    assert corpus_bleu(["the cat sat on the mat"], ["a cat sat on a mat"]) == pytest.approx(expected, abs=0.01)
    assert corpus_bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100)


def test_meteor_fails_clearly_without_wordnet(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # nowhere holds NLTK's WordNet
    monkeypatch.setenv("WNSEARCHDIR", str(tmp_path / "none"))  # nor a WordNet database folder
    with pytest.raises(MetricUnavailable, match="METEOR unavailable: WordNet is installed neither for NLTK nor in"):
        meteor_scores(["a cat"], ["a cat"])
    # The other metrics still come out; METEOR says why it is missing.
    found = reference_metrics(["the cat sat on the mat"], ["a cat sat on a mat"], rounds=20)
    assert found["rouge1"]["value"] == pytest.approx(4 / 6)
    assert found["bleu"]["value"] == pytest.approx(100 * (2 / 3 * 2 / 5 * 1 / 4 * 1 / 6) ** 0.25, abs=0.01)
    assert found["meteor"]["error"].startswith("METEOR unavailable")


@pytest.mark.skipif(
    not Path(DEBIAN_WORDNET).is_dir() and not os.environ.get("CI"),
    reason=f"needs Debian's WordNet in {DEBIAN_WORDNET} (`make wordnet`: apt-get install -y wordnet-base)",
)
def test_meteor_by_hand_with_debians_wordnet(monkeypatch, tmp_path):
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])  # not NLTK's copy, if one is installed: Debian's
    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    assert load_wordnet().synsets("auto")[0].lemma_names()[:2] == ["car", "auto"]
    # NLTK's METEOR (alpha 0.9, beta 3, gamma 0.5), worked by hand:
    #   hypothesis  in(0) my(1) auto(2) the(3) cats(4) sat(5) quietly(6)   7 words
    #   reference   the(0) cat(1) sat(2) in(3) my(4) car(5)                6 words
    # Matches, in NLTK's order: exact in-3, my-4, the-0, sat-2; then on the Porter stems of what is left,
    # cats -> cat matches cat-1; then WordNet: auto's synset car.n.01 holds "car", so auto matches car-5.
    # "quietly" matches nothing. m = 6, precision P = 6/7, recall R = 6/6 = 1,
    #   Fmean = P * R / (alpha * P + (1 - alpha) * R) = (6/7) / (5.4/7 + 0.7/7) = 6 / 6.1.
    # Sorted by hypothesis position the pairs are (0,3) (1,4) (2,5) | (3,0) (4,1) (5,2): 2 chunks, so the
    # fragmentation penalty is gamma * (chunks / m) ** beta = 0.5 * (2/6) ** 3 = 1/54, and
    #   METEOR = (1 - 1/54) * 6 / 6.1 = 53/54 * 60/61 = 0.96539...
    # Without the synonym it would be m = 5: P = 5/7, R = 5/6, 3 chunks, a different number.
    hypothesis, reference = "In my auto, the cats sat quietly", "The cat sat in my car"
    [score] = meteor_scores([hypothesis.replace(",", "")], [reference])
    assert score == pytest.approx(53 / 54 * 60 / 61)
    [same, other] = meteor_scores(["the cat sat on the mat", "a dog ran"], ["the cat sat on the mat", "the cat sat"])
    assert same > 0.9 and other < same


def test_few_shot_examples():
    sft = [
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1"}]},
        {"messages": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    ]  # fmt: skip
    assert example_pairs("sft", sft) == [("q1", "a1"), ("q2", "a2")]
    prompts = [
        {"prompt": [{"role": "user", "content": "q3"}], "reference": "a3"},
        {"prompt": [{"role": "user", "content": "q4"}]},
    ]
    assert example_pairs("prompts", prompts) == [("q3", "a3")]
    with pytest.raises(AlignError, match="sft or prompts"):
        example_pairs("preference", [])

    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    assert few_shot_prompt(prompt, [("q1", "a1")]) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q"},
    ]

    asked = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    pool = [(f"q{i}", f"a{i}") for i in range(4)]
    own = choose_examples(pool, asked, 2, seed=0, own=True)
    assert all(("q" + str(i), "a" + str(i)) not in chosen for i, chosen in enumerate(own))  # never its own answer
    assert all(len(chosen) == 2 for chosen in own)
    assert own == choose_examples(pool, asked, 2, seed=0, own=True)  # seeded
    shared = choose_examples(pool, asked[:1], 2, seed=0, own=False)
    assert ("q0", "a0") not in shared[0]  # an example asking the very question is skipped
    with pytest.raises(AlignError, match="needs 4 examples"):
        choose_examples(pool, asked, 4, seed=0, own=True)


def test_reply_logprobs_match_a_forward_pass_and_padding_does_not_matter(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question here"}]]
    replies = ["hello there", "ok"]
    one, _ = reply_logprobs(model, tokenizer, prompts, replies, batch_size=1)
    both, same = reply_logprobs(model, tokenizer, prompts, replies, batch_size=2, reference=model)
    assert both == pytest.approx(one, abs=1e-4)  # right padding in a batch changes nothing
    assert [a - b for a, b in zip(both, same)] == [0.0, 0.0]  # a model against itself: KL terms exactly 0
    # By hand for the first reply: the sum of log p(token | everything before it) over the reply's tokens.
    text = tokenizer.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    reply_ids = tokenizer("hello there", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + reply_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0], dim=-1)
    expected = sum(float(logp[len(prompt_ids) + k - 1, token]) for k, token in enumerate(reply_ids))
    assert one[0] == pytest.approx(expected, abs=1e-4)
    assert math.isfinite(one[1]) and one[1] < 0


def test_the_summary_says_what_each_interval_shows(capsys):
    from types import SimpleNamespace

    from align.eval_report import print_summary
    from align.evaluate import EvalResult

    def ci(value, low, high):
        return {"value": value, "low": low, "high": high}

    rows = {
        "sft": {"reward": ci(0.1, 0.0, 0.2), "length_tokens": ci(40, 38, 42)},
        "dpo": {"win_rate": ci(0.62, 0.55, 0.69), "lc_win_rate": ci(0.55, 0.47, 0.63), "length_tokens": ci(30, 28, 32)},
        "ppo": {"win_rate": ci(0.40, 0.33, 0.47), "lc_win_rate": ci(0.35, 0.28, 0.44), "length_tokens": ci(50, 48, 52)},
    }
    result = EvalResult(
        version=SimpleNamespace(ref="evals@1", num_rows=24),
        run=SimpleNamespace(dir=Path("runs/eval-1")),
        metrics={"baseline": "sft", "rows": rows},
    )
    print_summary(result)
    out = capsys.readouterr().out
    assert "dpo: win rate vs sft 0.620 [0.550, 0.690]: better (length-controlled 0.550 [0.470, 0.630]: " \
        "no detectable difference)" in out  # fmt: skip
    assert "ppo: win rate vs sft 0.400 [0.330, 0.470]: worse" in out
    assert "sft: reward 0.100 [0.000, 0.200], 40.0 tokens" in out
