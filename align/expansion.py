"""Growing instruction data with the model itself: Self-Instruct and Evol-Instruct. Nothing here knows of the
registry or of models: `expand` drives a `sampler` (prompts in, one reply per prompt out) that the stage wires to
a model and a journal (align/expand.py).

    found = expand(seeds, ExpandSettings(method="self-instruct", n=200, seed=0), sampler)
    found.rows      # {"messages": [user, assistant], "origin": JSON}, at most n
    found.counts    # what each filter dropped, and what was kept

Self-Instruct (Wang et al., 2023). Each round writes `round_size` prompts; each shows k tasks sampled from the
pool (`k - machine_k` human seeds and up to `machine_k` machine tasks kept in earlier rounds, on a seeded
generator of its own per round) and asks for task k+1 (SELF_INSTRUCT_TEMPLATE). The new instructions pass the
filters, in this order, each counting what it drops:
    unparseable   no task in the reply (empty, or it starts with punctuation)
    template      it repeats the prompt's own request (ROUGE-L precision >= 0.7 against its last sentences)
    too_short     fewer than `min_words` words          too_long   more than `max_words` words
    keyword       a word a text model cannot serve: image, graph, file, video, draw, plot, ... (KEYWORDS)
    duplicate     the same text (case, spaces and end punctuation aside) as a pool task or a task kept before
    similar       ROUGE-L F1 >= `rouge_threshold` (0.7) against any instruction of the pool (the paper's rule)
Then every kept instruction gets an input and an output (INSTANCE_TEMPLATE, "Input: ... Output: ..."; a reply
without the markers is all output), dropped as `unparseable` when the output is empty and as `refused` when the
model declined (REFUSAL). Kept tasks join the pool, so later rounds are compared with them and may show them.

Evol-Instruct (Xu et al., 2023, WizardLM). Each prompt rewrites one instruction of the pool (the seeds and the
evolutions kept so far, drawn on the round's generator) with one operator, in turn from `operators`:
    deepen       ask about the issue in more depth and breadth          (in-depth evolving)
    constrain    add one more constraint or requirement                  (in-depth evolving)
    concretize   replace general concepts with more specific ones        (in-depth evolving)
    broaden      a new task of the same domain, rarer, of the same length (in-breadth evolving)
(EVOL_TEMPLATES, the paper's in-depth and in-breadth prompts, each with its one-line method). An evolution is
dropped as `unparseable` (empty), `template` (it repeats the template's own words, "#Rewritten Prompt#", "given
prompt", ...), `copies_parent` (it adds nothing: ROUGE-L precision against its parent >= 0.95, every word of it is
the parent's in the parent's order), `refused` (the model declined), then by the length, keyword and duplicate
filters above. The model then answers each kept evolution; an empty or refused answer drops it.

Every row carries its origin, a JSON object: method, round, the instruction and input, the filter scores
(`rouge_l_max` against the pool, `words`; evol adds `rouge_l_parent` and `rouge_l_parent_precision`), and the
parent (evol: its text, operator, the parent's method and the depth) or the neighbours (self-instruct: the three
pool instructions closest by ROUGE-L), for the people who review it.

Determinism: the prompts of a round depend on the seed, the round and the pool, and the pool on the replies of the
rounds before, so replaying saved replies rebuilds every round exactly (what `align expand --resume` does).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from align.errors import AlignError

METHODS = ("self-instruct", "evol")
OPERATORS = ("deepen", "constrain", "concretize", "broaden")
FILTERS = (
    "unparseable",
    "template",
    "copies_parent",
    "refused",
    "too_short",
    "too_long",
    "keyword",
    "duplicate",
    "similar",
)
# Self-Instruct's list of what a language model cannot do (it cannot see or make images, files, sound, maps).
KEYWORDS = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps", "draw", "plot",
    "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip
_KEYWORD = re.compile(r"\b(" + "|".join(re.escape(word) for word in KEYWORDS) + r")\b", re.IGNORECASE)
REFUSAL = re.compile(
    r"\b(as an ai\b|as a language model|i'?m sorry|i am sorry|i apologi[sz]e|i cannot\b|i can'?t\b|i can not\b|"
    r"i'?m unable|i am unable|i'?m not able|i am not able|sorry, but)",
    re.IGNORECASE,
)
_TEMPLATE_WORDS = re.compile(r"#|\b(given|rewritten|created) prompt\b", re.IGNORECASE)
COPY_PRECISION = 0.95  # an evolution whose words are (almost) all its parent's, in order, adds nothing
ECHO_PRECISION = 0.7  # a self-instruct task whose words are mostly the prompt's own request echoes it

SELF_INSTRUCT_REQUEST = (
    "Write task {next}: one new task, different from the tasks above, that a text-only assistant can do. "
    "Reply with the task only."
)
SELF_INSTRUCT_TEMPLATE = "Come up with a series of tasks. Here are {k} of them:\n\n{tasks}\n\n" + SELF_INSTRUCT_REQUEST
SELF_INSTRUCT_TEMPLATE += "\nTask {next}:"
INSTANCE_TEMPLATE = (
    "Task: {instruction}\n\n"
    "Write an input for this task (write <noinput> if the task needs none), then the correct output, as:\n"
    "Input: ...\nOutput: ..."
)
_IN_DEPTH = (
    "I want you to act as a prompt rewriter. Rewrite the given prompt into a more complex version, one that "
    "famous AI systems would find a bit harder to handle; it must stay reasonable, and people must understand it "
    "and be able to answer it. Keep the non-text parts of the given prompt (tables, code, inputs). Complicate it "
    "with this method:\n{method}\n"
    "Do not make the rewritten prompt verbose: add 10 to 20 words to the given prompt at most. The words "
    "'#The Given Prompt#', '#Rewritten Prompt#', 'given prompt' and 'rewritten prompt' must not appear in it.\n\n"
    "#The Given Prompt#:\n{instruction}\n\n#Rewritten Prompt#:\n"
)
_IN_BREADTH = (
    "I want you to act as a prompt creator. Take inspiration from the given prompt to create a brand new prompt. "
    "{method} Its length and complexity must be similar to the given prompt's; it must be reasonable, and people "
    "must understand it and be able to answer it. The words '#Given Prompt#', '#Created Prompt#', 'given prompt' "
    "and 'created prompt' must not appear in it.\n\n"
    "#Given Prompt#:\n{instruction}\n\n#Created Prompt#:\n"
)
EVOL_METHODS = {
    "deepen": "If the given prompt asks about certain issues, increase the depth and breadth of the inquiry.",
    "constrain": "Add one more constraint or requirement to the given prompt.",
    "concretize": "Replace general concepts with more specific concepts.",
    "broaden": "It must belong to the same domain as the given prompt but be rarer.",
}
EVOL_TEMPLATES = {
    "deepen": _IN_DEPTH,
    "constrain": _IN_DEPTH,
    "concretize": _IN_DEPTH,
    "broaden": _IN_BREADTH,
}


@dataclass
class ExpandSettings:
    method: str = "self-instruct"
    n: int = 200  # rows to make
    operators: tuple[str, ...] = OPERATORS  # evol
    k: int = 8  # tasks shown in a self-instruct prompt
    machine_k: int = 2  # of which machine-made tasks, once the pool has some
    round_size: int = 8  # prompts per round
    rouge_threshold: float = 0.7
    min_words: int = 3
    max_words: int = 150
    max_rounds: int | None = None  # None: 4 rounds per round's worth of rows asked for, and at least 10
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise AlignError(f"unknown --method {self.method!r}: choose self-instruct or evol")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise AlignError(f"--n must be a whole number of at least 1 (got {self.n!r})")
        self.operators = tuple(self.operators)
        if not self.operators:
            raise AlignError(f"--operators is empty: name one or more of {', '.join(OPERATORS)}")
        for operator in self.operators:
            if operator not in OPERATORS:
                raise AlignError(f"unknown operator {operator!r} in --operators: choose from {', '.join(OPERATORS)}")
        if self.k < 1:
            raise AlignError(f"--k must be at least 1 (got {self.k})")
        if not 0 <= self.machine_k <= self.k:
            raise AlignError(f"--machine-k must be from 0 to --k ({self.k}) (got {self.machine_k})")
        if self.round_size < 1:
            raise AlignError(f"--round-size must be at least 1 (got {self.round_size})")
        if not 0 < self.rouge_threshold <= 1:
            raise AlignError(f"--rouge-threshold must be in (0, 1] (got {self.rouge_threshold})")
        if not 1 <= self.min_words <= self.max_words:
            raise AlignError(f"need 1 <= --min-words <= --max-words (got {self.min_words} and {self.max_words})")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise AlignError(f"--max-rounds must be at least 1 (got {self.max_rounds})")

    @property
    def rounds(self) -> int:
        if self.max_rounds is not None:
            return self.max_rounds
        return max(10, 4 * -(-self.n // self.round_size))


# Prompts


def sample_tasks(human: Sequence[str], machine: Sequence[str], k: int, machine_k: int, rng: random.Random) -> list:
    """k tasks for one prompt: up to `machine_k` machine tasks, the rest human seeds (all of them when there are
    fewer), in a shuffled order."""
    picked = rng.sample(list(machine), min(machine_k, len(machine)))
    picked += rng.sample(list(human), min(k - len(picked), len(human)))
    rng.shuffle(picked)
    return picked


def self_instruct_prompt(tasks: Sequence[str]) -> str:
    """The Self-Instruct prompt for tasks 1..k (each on one line, its spaces collapsed), asking for task k+1."""
    listed = "\n".join(f"Task {number}: {one_line(task)}" for number, task in enumerate(tasks, start=1))
    return SELF_INSTRUCT_TEMPLATE.format(k=len(tasks), tasks=listed, next=len(tasks) + 1)


def instance_prompt(instruction: str) -> str:
    return INSTANCE_TEMPLATE.format(instruction=instruction)


def evol_prompt(operator: str, instruction: str) -> str:
    """The Evol-Instruct prompt that rewrites `instruction` with `operator`."""
    if operator not in OPERATORS:
        raise AlignError(f"unknown operator {operator!r}: choose from {', '.join(OPERATORS)}")
    return EVOL_TEMPLATES[operator].format(method=EVOL_METHODS[operator], instruction=instruction)


# Parsing the replies


def one_line(text: str) -> str:
    return " ".join(text.split())


def parse_instruction(reply: str) -> str | None:
    """The first task of a reply to the Self-Instruct prompt: without a leading 'Task N:' (or 'N.'), up to the next
    'Task N:' or 'N.' line (a model that lists several). None when there is none, or it starts with punctuation."""
    text = re.sub(r"^\s*\**\s*(?:task\s*\d*|\d+)\s*[:.)]\s*", "", reply, flags=re.IGNORECASE)
    text = re.split(r"\n\s*\**\s*(?:task\s*)?\d+\s*[:.)]", text, maxsplit=1, flags=re.IGNORECASE)[0]
    text = text.strip().strip("*").strip()
    if not text or not text[0].isalnum():
        return None
    return text


def parse_instance(reply: str) -> tuple[str, str] | None:
    """(input, output) from 'Input: ... Output: ...'; a reply without the markers is all output, with no input.
    '<noinput>' (or none, n/a) is no input. None when the output is empty."""
    found = re.match(r"\s*input\s*:(.*?)(?:^|\n|\s)output\s*:(.*)\Z", reply, flags=re.IGNORECASE | re.DOTALL)
    if found:
        extra, output = found.group(1).strip(), found.group(2).strip()
    else:
        extra, output = "", re.sub(r"^\s*output\s*:", "", reply, flags=re.IGNORECASE).strip()
    if extra.strip("<>").strip().lower() in ("noinput", "no input", "none", "n/a", ""):
        extra = ""
    return (extra, output) if output else None


def parse_evolution(reply: str) -> str | None:
    """The rewritten prompt of a reply to an Evol-Instruct prompt, without a leading '#Rewritten Prompt#:' (or
    created prompt). None when empty."""
    text = re.sub(r"^\s*#*\s*(rewritten|created)\s+prompt\s*#*\s*:?", "", reply, flags=re.IGNORECASE)
    text = text.strip().strip("*").strip()
    return text or None


def refused(text: str) -> bool:
    """The model declined: a refusal phrase near the start, or 'sorry' in a short text (WizardLM's rule)."""
    return bool(REFUSAL.search(text[:200])) or ("sorry" in text.lower() and len(text.split()) < 80)


def join_instruction(instruction: str, extra: str) -> str:
    """The user turn of a task: its instruction, then its input after a blank line (as the importers join them)."""
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


# Filters


def normalized(text: str) -> str:
    return one_line(text).lower().rstrip(" .!?;:")


def has_keyword(text: str) -> bool:
    return bool(_KEYWORD.search(text))


class Rouge:
    """ROUGE-L with rouge-score (no stemming, as `evaluate`'s rouge): the paper's similarity filter."""

    def __init__(self):
        from rouge_score import rouge_scorer

        self._scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def score(self, reference: str, candidate: str):
        """Score(precision, recall, fmeasure) of `candidate` against `reference`."""
        return self._scorer.score(reference, candidate)["rougeL"]

    def against(self, pool: Sequence[str], candidate: str) -> list[float]:
        """The F1 of `candidate` against each instruction of the pool."""
        return [self.score(other, candidate).fmeasure for other in pool]


@dataclass
class Verdict:
    """What the filters said of one candidate instruction: kept (reason None) or the filter that dropped it."""

    reason: str | None
    scores: dict = field(default_factory=dict)
    neighbours: list = field(default_factory=list)


def check_instruction(
    text: str | None,
    pool: Sequence[str],
    seen: set[str],
    settings: ExpandSettings,
    rouge: Rouge,
    *,
    similar_filter: bool = True,
) -> Verdict:
    """The length, keyword, duplicate and (with `similar_filter`) ROUGE-L filters, in the module docstring's order.
    `seen`: the normalized texts of the pool and of the tasks kept so far."""
    if text is None:
        return Verdict("unparseable")
    words = len(text.split())
    if words < settings.min_words:
        return Verdict("too_short", {"words": words})
    if words > settings.max_words:
        return Verdict("too_long", {"words": words})
    if has_keyword(text):
        return Verdict("keyword", {"words": words})
    if normalized(text) in seen:
        return Verdict("duplicate", {"words": words})
    scores = rouge.against(pool, text)
    best = max(scores, default=0.0)
    verdict = Verdict(None, {"rouge_l_max": round(best, 4), "words": words})
    nearest = sorted(range(len(pool)), key=lambda i: -scores[i])[:3]
    verdict.neighbours = [{"instruction": pool[i], "rouge_l": round(scores[i], 4)} for i in nearest]
    if similar_filter and best >= settings.rouge_threshold:
        verdict.reason = "similar"
    return verdict


# The loop

Sampler = Callable[[str, int, list[str]], list[str]]  # (journal key, round, prompts) -> one reply per prompt


@dataclass
class Task:
    """A task of the pool: its user turn, and where it came from."""

    instruction: str
    method: str = "seed"  # seed | self-instruct | evol
    depth: int = 0  # evolutions from a seed


@dataclass
class Expansion:
    rows: list[dict]
    counts: Counter  # filter -> candidates it dropped; "candidates" (replies read); "kept" (rows, at most n)
    rounds: int
    by_operator: dict = field(default_factory=dict)  # evol: operator -> {"kept": rows, filter: dropped}


def expand(seeds: Sequence[Task], settings: ExpandSettings, sampler: Sampler, progress=None) -> Expansion:
    """Rounds of prompts until `settings.n` rows are kept or `settings.rounds` rounds have run."""
    if not seeds:
        raise AlignError("the seed pool is empty: there is nothing to expand")
    pool = list(seeds)
    seen = {normalized(task.instruction) for task in pool}
    rouge = Rouge()
    rows: list[dict] = []
    counts: Counter = Counter()
    by_operator: dict[str, Counter] = {}
    if settings.method == "evol":
        by_operator = {operator: Counter() for operator in settings.operators}
    step = _self_instruct_round if settings.method == "self-instruct" else _evol_round
    rounds = 0
    while len(rows) < settings.n and rounds < settings.rounds:
        made = step(rounds, pool, seen, settings, sampler, rouge, counts, by_operator)[: settings.n - len(rows)]
        rows += made
        rounds += 1
        if progress is not None:
            progress.update(len(made))
            progress.set_postfix(round=rounds, dropped=sum(counts[name] for name in FILTERS))
    counts["kept"] = len(rows)
    for row in rows:
        origin = origin_of(row)
        if origin["method"] == "evol":
            by_operator[origin["operator"]]["kept"] += 1
    return Expansion(rows, counts, rounds, {op: dict(tally) for op, tally in by_operator.items()})


def _round_rng(settings: ExpandSettings, number: int) -> random.Random:
    return random.Random(f"expand:{settings.method}:{settings.seed}:{number}")


def _self_instruct_round(number, pool, seen, settings, sampler, rouge, counts, by_operator) -> list[dict]:
    rng = _round_rng(settings, number)
    human = [task.instruction for task in pool if task.method == "seed"]
    machine = [task.instruction for task in pool if task.method != "seed"]
    prompts = [
        self_instruct_prompt(sample_tasks(human, machine, settings.k, settings.machine_k, rng))
        for _ in range(settings.round_size)
    ]
    replies = sampler(f"round {number} instructions", number, prompts)
    counts["candidates"] += len(replies)
    kept: list[tuple[str, Verdict]] = []
    texts = [task.instruction for task in pool]
    for reply in replies:
        text = parse_instruction(reply)
        if text is not None and rouge.score(SELF_INSTRUCT_REQUEST, text).precision >= ECHO_PRECISION:
            counts["template"] += 1
            continue
        verdict = check_instruction(text, texts, seen, settings, rouge)
        if verdict.reason:
            counts[verdict.reason] += 1
            continue
        kept.append((text, verdict))
        seen.add(normalized(text))
        texts.append(text)  # later candidates of the round are compared with it too
    answers = sampler(f"round {number} instances", number, [instance_prompt(text) for text, _ in kept]) if kept else []
    rows = []
    for (text, verdict), answer in zip(kept, answers):
        instance = parse_instance(answer)
        if instance is None:
            counts["unparseable"] += 1
            continue
        extra, output = instance
        if refused(output):
            counts["refused"] += 1
            continue
        pool.append(Task(text, "self-instruct"))
        origin = {
            "method": "self-instruct",
            "round": number,
            "instruction": text,
            "input": extra,
            "scores": verdict.scores,
            "neighbours": verdict.neighbours,
        }
        rows.append(_row(join_instruction(text, extra), output, origin))
    return rows


def _evol_round(number, pool, seen, settings, sampler, rouge, counts, by_operator) -> list[dict]:
    rng = _round_rng(settings, number)
    jobs = []
    for slot in range(settings.round_size):
        operator = settings.operators[(number * settings.round_size + slot) % len(settings.operators)]
        jobs.append((operator, rng.choice(pool)))
    prompts = [evol_prompt(operator, parent.instruction) for operator, parent in jobs]
    replies = sampler(f"round {number} evolutions", number, prompts)
    counts["candidates"] += len(replies)
    kept = []
    texts = [task.instruction for task in pool]
    for (operator, parent), reply in zip(jobs, replies):
        text = parse_evolution(reply)
        reason, scores = None, {}
        if text is None:
            reason = "unparseable"
        elif _TEMPLATE_WORDS.search(text):
            reason = "template"
        else:
            to_parent = rouge.score(parent.instruction, text)
            scores = {"rouge_l_parent": round(to_parent.fmeasure, 4)}
            scores["rouge_l_parent_precision"] = round(to_parent.precision, 4)
            if to_parent.precision >= COPY_PRECISION:
                reason = "copies_parent"
            elif refused(text):
                reason = "refused"
        verdict = None
        if reason is None:
            others = [other for other in texts if other != parent.instruction]
            verdict = check_instruction(text, others, seen, settings, rouge, similar_filter=False)
            reason = verdict.reason
        if reason:
            counts[reason] += 1
            by_operator[operator][reason] += 1
            continue
        verdict.scores = scores | verdict.scores
        kept.append((operator, parent, text, verdict))
        seen.add(normalized(text))
        texts.append(text)
    answers = sampler(f"round {number} answers", number, [text for _, _, text, _ in kept]) if kept else []
    rows = []
    for (operator, parent, text, verdict), answer in zip(kept, answers):
        answer = answer.strip()
        reason = "unparseable" if not answer else "refused" if refused(answer) else None
        if reason:
            counts[reason] += 1
            by_operator[operator][reason] += 1
            continue
        pool.append(Task(text, "evol", parent.depth + 1))
        origin = {
            "method": "evol",
            "operator": operator,
            "round": number,
            "instruction": text,
            "input": "",
            "parent": parent.instruction,
            "parent_method": parent.method,
            "depth": parent.depth + 1,
            "scores": verdict.scores,
        }
        rows.append(_row(text, answer, origin))
    return rows


def _row(user: str, assistant: str, origin: dict) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}],
        "origin": json.dumps(origin, ensure_ascii=False, sort_keys=True),
    }


def origin_of(row: dict) -> dict | None:
    """A row's origin (see the module docstring), or None for a row people wrote."""
    text = row.get("origin")
    return json.loads(text) if text else None
