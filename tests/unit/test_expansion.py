"""Self-Instruct and Evol-Instruct machinery (align/expansion.py): the prompts, the parsing, the filters with
hand-checked ROUGE-L numbers, and the loop on a scripted sampler (no model)."""

import json
import random

import pytest

from align.errors import AlignError
from align.expansion import (
    EVOL_METHODS,
    OPERATORS,
    ExpandSettings,
    Rouge,
    Task,
    check_instruction,
    evol_prompt,
    expand,
    normalized,
    origin_of,
    parse_evolution,
    parse_instance,
    parse_instruction,
    refused,
    sample_tasks,
    self_instruct_prompt,
)

POOL = ["Write a poem about the sea.", "Give three tips for staying healthy.", "a b c d e f g h i j"]


def verdict(text, pool=POOL, **settings):
    seen = {normalized(t) for t in pool}
    return check_instruction(text, pool, seen, ExpandSettings(**settings), Rouge())


# ROUGE-L (rouge-score tokens: lower case, letters and digits). Hand-checked: LCS / length gives precision and
# recall, F1 = 2PR / (P + R).


def test_rouge_l_on_hand_made_instructions():
    rouge = Rouge()
    # write a [short] poem about the sea: LCS 6; P = 6/7, R = 6/6, F = 12/13
    score = rouge.score("Write a poem about the sea.", "Write a short poem about the sea.")
    assert (score.precision, score.recall) == pytest.approx((6 / 7, 1.0))
    assert score.fmeasure == pytest.approx(12 / 13)
    # write a story about a dog vs write a poem about the sea: LCS "write a about" = 3 of 6 each: F = 0.5
    assert rouge.score("Write a poem about the sea.", "Write a story about a dog.").fmeasure == pytest.approx(0.5)
    # give [me] three tips for staying healthy [and happy]: LCS 6; P = 6/9, R = 6/6, F = 0.8
    assert rouge.score(POOL[1], "Give me three tips for staying healthy and happy.").fmeasure == pytest.approx(0.8)


def test_the_similarity_filter_drops_rouge_l_of_0_7_and_more():
    near = verdict("Write a short poem about the sea.")  # 0.923 against pool[0]
    assert near.reason == "similar" and near.scores["rouge_l_max"] == pytest.approx(0.9231)
    assert near.neighbours[0] == {"instruction": POOL[0], "rouge_l": pytest.approx(0.9231)}
    at = verdict("a b c d e f g x y z")  # LCS 7 of 10 and 10: exactly 0.7, dropped (>= 0.7)
    assert at.reason == "similar" and at.scores["rouge_l_max"] == pytest.approx(0.7)
    below = verdict("a b c d e f w x y z")  # LCS 6 of 10: 0.6, kept
    assert below.reason is None and below.scores == {"rouge_l_max": pytest.approx(0.6), "words": 10}
    far = verdict("Write a story about a dog.")  # 0.5 against pool[0]
    assert far.reason is None and far.scores["rouge_l_max"] == pytest.approx(0.5)
    assert [n["instruction"] for n in far.neighbours][0] == POOL[0]
    assert verdict("a b c d e f g x y z", rouge_threshold=0.75).reason is None  # the threshold is a setting


def test_the_other_filters_each_say_why():
    assert verdict(None).reason == "unparseable"
    assert verdict("Summarize this.").reason == "too_short"  # 2 words < 3
    assert verdict(" ".join(["word"] * 151)).reason == "too_long"
    assert verdict(" ".join(["word"] * 150)).reason is None
    assert verdict("Describe the image below in detail.").reason == "keyword"
    assert verdict("Plot the sales of the last year.").reason == "keyword"
    assert verdict("Open the attached file and count words.").reason == "keyword"
    assert verdict("Explain how a profile works here.").reason is None  # 'file' only as a whole word
    assert verdict("give three tips for staying healthy").reason == "duplicate"  # case and end punctuation aside


# The prompts


def test_the_self_instruct_prompt_from_k_tasks_sampled_on_a_fixed_seed():
    human = [f"human task {i}" for i in range(10)]
    machine = ["machine task A", "machine task B", "machine task C"]
    first = sample_tasks(human, machine, 8, 2, random.Random(3))
    assert first == sample_tasks(human, machine, 8, 2, random.Random(3))  # the same seed, the same tasks
    assert first != sample_tasks(human, machine, 8, 2, random.Random(4))
    assert len(first) == 8 and len(set(first)) == 8
    assert sum(task.startswith("machine") for task in first) == 2
    # Before any machine task is kept, all k come from the seeds.
    assert all(task.startswith("human") for task in sample_tasks(human, [], 8, 2, random.Random(3)))

    prompt = self_instruct_prompt(["Sort these\nnumbers: 3 1 2", "Name a colour."])
    assert prompt == (
        "Come up with a series of tasks. Here are 2 of them:\n\n"
        "Task 1: Sort these numbers: 3 1 2\nTask 2: Name a colour.\n\n"
        "Write task 3: one new task, different from the tasks above, that a text-only assistant can do. "
        "Reply with the task only.\nTask 3:"
    )


def test_the_loop_samples_its_prompts_on_a_fixed_seed():
    seeds = [Task(f"Seed task number {i} about something.") for i in range(20)]
    seen_prompts = []

    def sampler(key, number, prompts):
        seen_prompts.append((key, prompts))
        return ["" for _ in prompts]  # nothing parses: every round runs

    settings = ExpandSettings(n=5, k=4, round_size=2, max_rounds=2, seed=11)
    expand(seeds, settings, sampler)
    first = list(seen_prompts)
    seen_prompts.clear()
    expand(seeds, settings, sampler)
    assert seen_prompts == first and [key for key, _ in first] == ["round 0 instructions", "round 1 instructions"]
    shown = [line for line in first[0][1][0].splitlines() if line.startswith("Task ") and not line.endswith(":")]
    assert len(shown) == 4 and all(line.split(": ", 1)[1] in [s.instruction for s in seeds] for line in shown)
    seen_prompts.clear()
    expand(seeds, ExpandSettings(n=5, k=4, round_size=2, max_rounds=2, seed=12), sampler)
    assert seen_prompts != first


@pytest.mark.parametrize("operator", OPERATORS)
def test_each_evol_operator_gives_its_documented_template(operator):
    prompt = evol_prompt(operator, "Name three rivers.")
    assert EVOL_METHODS[operator] in prompt
    if operator == "broaden":
        assert prompt.startswith("I want you to act as a prompt creator.")
        assert prompt.endswith("#Given Prompt#:\nName three rivers.\n\n#Created Prompt#:\n")
    else:
        assert prompt.startswith("I want you to act as a prompt rewriter.")
        assert prompt.endswith("#The Given Prompt#:\nName three rivers.\n\n#Rewritten Prompt#:\n")
        assert "add 10 to 20 words" in prompt
    others = [EVOL_METHODS[other] for other in OPERATORS if other != operator]
    assert not any(method in prompt for method in others)


# Parsing


def test_parsing_replies():
    assert parse_instruction("Task 9: Name a fruit.\nTask 10: Name a car.") == "Name a fruit."
    assert parse_instruction("  **Task 3:** Translate to French:\nhello") == "Translate to French:\nhello"
    assert parse_instruction("List two birds.") == "List two birds."
    assert parse_instruction("1. Name a task\n2. Name another task") == "Name a task"  # a model that lists several
    assert parse_instruction("Sort 3 numbers: 3. 1. 2.") == "Sort 3 numbers: 3. 1. 2."
    assert parse_instruction("") is None and parse_instruction("Task 4:  ") is None
    assert parse_instruction("- a bullet") is None  # starts with punctuation
    assert parse_instance("Input: <noinput>\nOutput: Paris.") == ("", "Paris.")
    assert parse_instance("Input: 3, 1, 2\nOutput: 1, 2, 3") == ("3, 1, 2", "1, 2, 3")
    assert parse_instance("Paris is the capital.") == ("", "Paris is the capital.")
    assert parse_instance("Input: x\nOutput:   ") is None and parse_instance("") is None
    assert parse_evolution("#Rewritten Prompt#: Name three long rivers.") == "Name three long rivers."
    assert parse_evolution("Created Prompt: Name a rare bird.") == "Name a rare bird."
    assert parse_evolution("   ") is None
    assert refused("I'm sorry, but I cannot help with that.") and refused("As an AI, I do not have opinions.")
    assert not refused("The Seine, the Rhine and the Loire.")


# The loop


def scripted(instructions: dict[int, list[str]], answers: str = "Input: <noinput>\nOutput: an answer"):
    def sampler(key, number, prompts):
        if key.endswith("instructions"):
            return instructions.get(number, [""] * len(prompts))[: len(prompts)]
        return [answers for _ in prompts]

    return sampler


def test_self_instruct_counts_every_filter_and_keeps_tasks_in_the_pool():
    seeds = [Task(text) for text in POOL]
    replies = {
        0: [
            "Task 4: Write a story about a dog.",  # kept
            "Task 4: Write a story about a dog!",  # duplicate of the one kept just before
            "Task 4: Write a short poem about the sea.",  # similar to a seed
            "Task 4: Draw a map of France.",  # keyword
            "Task 4: Hi.",  # too short
            "",  # unparseable
            "Task 4: one new task, different from the tasks above, that a text-only AI assistant can do.",  # echo
        ],
        1: ["Task 4: Write a long story about a dog.", "Task 4: Name the largest planet in the solar system."],
    }
    settings = ExpandSettings(n=10, round_size=7, max_rounds=2, seed=0)
    found = expand(seeds, settings, scripted(replies))
    counts = {key: value for key, value in found.counts.items() if value}
    assert counts == {"candidates": 9, "kept": 2, "duplicate": 1, "similar": 2, "keyword": 1, "too_short": 1,
                      "unparseable": 1, "template": 1}  # fmt: skip
    # Round 1's "long story about a dog" is similar to round 0's kept task: kept tasks join the pool.
    assert [row["messages"][0]["content"] for row in found.rows] == [
        "Write a story about a dog.",
        "Name the largest planet in the solar system.",
    ]
    origin = origin_of(found.rows[0])
    assert origin["method"] == "self-instruct" and origin["round"] == 0 and origin["input"] == ""
    assert origin["scores"] == {"rouge_l_max": 0.5, "words": 6}
    assert [n["instruction"] for n in origin["neighbours"]][0] == POOL[0]
    assert found.rows[0]["messages"][1] == {"role": "assistant", "content": "an answer"}


def test_self_instruct_drops_refused_and_empty_answers_and_stops_at_n():
    seeds = [Task(text) for text in POOL]
    replies = {0: ["Task 4: Name the largest planet in the solar system."]}
    found = expand(seeds, ExpandSettings(n=3, round_size=1, max_rounds=1), scripted(replies, "I'm sorry, I can't."))
    assert found.rows == [] and found.counts["refused"] == 1
    found = expand(seeds, ExpandSettings(n=3, round_size=1, max_rounds=1), scripted(replies, "Output: "))
    assert found.rows == [] and found.counts["unparseable"] == 1
    distinct = [
        "Describe a river to a child.", "Name the largest planet.", "Translate hello into Spanish.",
        "Suggest a name for my cat.", "Why is the sky blue?", "Convert 5 miles into kilometres.",
        "Summarize the plot of Hamlet.", "Recommend three classic novels.",
    ]  # fmt: skip
    many = {r: [f"Task 4: {text}" for text in distinct[4 * r : 4 * r + 4]] for r in range(2)}
    found = expand(seeds, ExpandSettings(n=5, round_size=4, seed=0), scripted(many))
    assert len(found.rows) == 5 and found.rounds == 2 and found.counts["kept"] == 5


def test_evol_drops_copies_refusals_and_template_words_and_records_the_parent():
    seeds = [Task("Name three rivers in Europe.")]

    def sampler(key, number, prompts):
        if key.endswith("evolutions"):
            return [
                "#Rewritten Prompt#: Name three rivers in Europe that flow into the North Sea, with their lengths.",
                "Name three rivers in Europe.",  # copies its parent
                "I'm sorry, but I cannot rewrite this prompt.",  # refused
                "The given prompt asks for rivers; name three.",  # template words
                "",  # unparseable
            ]
        return ["The Rhine, the Elbe and the Thames." for _ in prompts]

    settings = ExpandSettings(method="evol", n=10, round_size=5, max_rounds=1, operators=("constrain", "deepen"))
    found = expand(seeds, settings, sampler)
    counts = {key: value for key, value in found.counts.items() if value}
    assert counts == {"candidates": 5, "kept": 1, "copies_parent": 1, "refused": 1, "template": 1, "unparseable": 1}
    [row] = found.rows
    origin = origin_of(row)
    assert origin["operator"] == "constrain" and origin["parent"] == "Name three rivers in Europe."
    assert (origin["method"], origin["parent_method"], origin["depth"]) == ("evol", "seed", 1)
    # parent tokens: name three rivers in europe (5); evolved: 14 tokens, LCS 5: P = 5/14, R = 1, F = 10/19
    assert origin["scores"]["rouge_l_parent"] == pytest.approx(10 / 19, abs=1e-4)
    assert origin["scores"]["rouge_l_parent_precision"] == pytest.approx(5 / 14, abs=1e-4)
    assert row["messages"][1]["content"] == "The Rhine, the Elbe and the Thames."
    # Operators take turns: constrain, deepen, constrain, deepen, constrain.
    assert found.by_operator == {
        "constrain": {"kept": 1, "refused": 1, "unparseable": 1},
        "deepen": {"copies_parent": 1, "template": 1},
    }
    assert json.loads(row["origin"]) == origin


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"n": 0}, "--n must be a whole number of at least 1 (got 0)"),
        ({"operators": ("deepen", "shorten")}, "unknown operator 'shorten' in --operators"),
        ({"method": "magic"}, "unknown --method 'magic'"),
        ({"machine_k": 9}, "--machine-k must be from 0 to --k"),
        ({"rouge_threshold": 0}, "--rouge-threshold must be in (0, 1]"),
    ],
)
def test_bad_settings_are_refused_with_a_clear_message(settings, message):
    with pytest.raises(AlignError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        ExpandSettings(**settings)
