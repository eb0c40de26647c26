"""The order the ranking app serves items in (align/label_order.py): the uncertainty measure and the order it
makes, checked by hand; the chooser in an order; the store under random and uncertainty order, with overlap,
leases and undo; scores that arrive in the background and are kept for the next start; a tiny reward model."""

import json
import math
import random
import threading
from collections import Counter

import pytest

from align.errors import AlignError
from align.label_order import (
    check_order,
    item_gap,
    open_scorer,
    random_order,
    random_start,
    uncertainty_order,
)
from align.labels import LabelStore, Tally, choose_item
from align.registry import Registry


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def candidate_rows(count: int, completions: int = 2) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "completions": [reply(f"answer {i}.{j}") for j in range(completions)],
            "sources": [f"model-{j % 2}" for j in range(completions)],
        }
        for i in range(count)
    ]


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class HandScorer:
    """Hand-made scores in place of a reward model (the duck type of label_order.OrderScorer). `release`: an Event
    the background scoring waits for, so a test can vote while the scores are still on their way."""

    ref = "rm:hand@1"

    def __init__(self, scores: list[list[float]], release: threading.Event | None = None):
        self.scores, self.release, self.started = scores, release, 0

    def saved(self, version, rows):
        return None

    def check(self, version, rows):
        pass

    def start(self, version, rows, on_scores):
        self.started += 1

        def work():
            if self.release is not None:
                assert self.release.wait(30)
            on_scores(self.scores)

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        return thread


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "ws")
    registry.register(candidate_rows(6), name="cands", kind="candidates")
    yield registry
    registry.close()


# The measure, by hand

# Reward-model scores of each row's two replies, and their gaps |r_a - r_b|:
#   row 0: 0.0 vs 3.0 -> 3.0     row 1: 1.0 vs 1.2 -> 0.2     row 2: 2.0 vs -2.0 -> 4.0
#   row 3: 0.5 vs 0.5 -> 0.0     row 4: -1.0 vs 0.0 -> 1.0    row 5: 0.7 vs 0.0 -> 0.7
HAND = [[0.0, 3.0], [1.0, 1.2], [2.0, -2.0], [0.5, 0.5], [-1.0, 0.0], [0.7, 0.0]]
LEAST_SURE_FIRST = [3, 1, 5, 4, 0, 2]


def test_uncertainty_is_the_preference_probability_nearest_one_half():
    items = [(0, 1)] * 6
    assert uncertainty_order(items, list(range(6)), HAND) == LEAST_SURE_FIRST
    # The same order as |sigmoid(r_a - r_b) - 1/2|, the reward model's preference probability against a coin.
    probability = [1 / (1 + math.exp(-(a - b))) for a, b in HAND]
    assert sorted(range(6), key=lambda i: abs(probability[i] - 0.5)) == LEAST_SURE_FIRST
    assert probability[3] == 0.5
    # A ranking's uncertainty: the smallest gap between adjacent scores (5 -> 1 -> 0.9: 0.1 between 1 and 0.9).
    assert item_gap([5.0, 1.0, 0.9], (0, 1, 2)) == pytest.approx(0.1)
    assert item_gap([5.0, 1.0, 0.9, 3.0], (0, 3)) == pytest.approx(2.0)  # only the completions the item shows
    # Equal gaps keep row order; a thumbs item (one completion) has no gap.
    assert uncertainty_order([(0, 1), (0, 1)], [0, 1], [[1.0, 2.0], [2.0, 1.0]]) == [0, 1]
    with pytest.raises(AlignError, match="two or more completions"):
        item_gap([1.0], (0,))


def test_bad_orders_are_refused_in_one_line():
    check_order("sequential", None, "pairwise")
    check_order("uncertainty", "rm:x", "rank")
    for args, message in [
        (("uncertainty", None, "pairwise"), "--order uncertainty serves first the items a reward model is least sure"),
        (("uncertainty", "", "rank"), "name it with --rm rm:NAME"),
        (("random", "rm:x", "pairwise"), "--rm orders the items by the reward model's uncertainty: add --order"),
        (("uncertainty", "rm:x", "thumbs"), "a thumbs item is one reply alone"),
        (("shuffled", None, "pairwise"), "unknown --order 'shuffled'"),
    ]:
        with pytest.raises(AlignError, match=message) as found:
            check_order(*args)
        assert "\n" not in str(found.value)


def test_only_registered_reward_models_are_taken(registry, tmp_path):
    with pytest.raises(AlignError, match=r"--rm adapter:sft is not a reward model: name a registered one"):
        open_scorer(registry, "adapter:sft")
    with pytest.raises(AlignError, match=r"--rm smollm2-135m is not a reward model"):
        open_scorer(registry, "smollm2-135m")
    with pytest.raises(AlignError, match=r"^--rm rm:missing: no artifact 'rm:missing' in the registry"):
        open_scorer(registry, "rm:missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    registry.register_artifact("rm", "hollow", empty, base_model="smollm2-135m")
    scorer = open_scorer(registry, "rm:hollow")  # found; loading it is what fails
    with pytest.raises(AlignError, match=r"^--rm rm:hollow@1 cannot be loaded: .*adapter_config.json") as found:
        scorer.load()
    assert "\n" not in str(found.value)


# The chooser in an order


def position_levels(count: int, votes: dict, overlap: int, rank: list[int]) -> list[list[int]]:
    return [sorted(rank[item] for item in range(count) if votes.get(item, 0) == c) for c in range(overlap)]


def test_choose_item_in_an_order_by_hand():
    order = [3, 1, 2, 0]  # position -> item
    rank = [3, 1, 2, 0]  # item -> position (this order is its own inverse)

    def choose(*, overlap=2, mine=(), votes=None, held=None, start=0):
        votes, held = votes or {}, held or {}
        levels = position_levels(4, votes, overlap, rank)
        return choose_item(
            levels, overlap=overlap, mine=set(mine), votes=votes, held=held, order=order, rank=rank, start=start
        )

    assert choose() == (3, "item")  # the first in the order, not row 0
    assert choose(mine={3}) == (1, "item")
    assert choose(votes={0: 1}) == (0, "item")  # closest to done still goes first
    assert choose(start=2) == (2, "item")  # a walk that begins at position 2: items 2, 0, then round to 3, 1
    assert choose(start=2, mine={2, 0}) == (3, "item")
    # Only held items left: the one closest to done, then the first from the start position on.
    assert choose(held={0: 1, 1: 1, 2: 1, 3: 1}) == (3, "item")
    assert choose(held={0: 1, 1: 1, 2: 1, 3: 1}, start=3) == (0, "item")
    assert choose(held={0: 1, 1: 1, 2: 1, 3: 1}, votes={2: 1}) == (3, "item")  # 2: one vote and one holder, full
    assert choose(overlap=3, held={0: 1, 1: 1, 2: 1, 3: 1}, votes={2: 1}) == (2, "item")


def test_choose_item_in_an_order_is_the_best_item_by_its_rule():
    """On random states and orders, the choice is the eligible item with the least (held, -counted votes, position
    counted round from the start) by checking every item."""
    rng = random.Random(0)
    for _ in range(500):
        count, overlap = rng.randint(1, 12), rng.randint(1, 3)
        order = list(range(count))
        rng.shuffle(order)
        rank = [0] * count
        for position, item in enumerate(order):
            rank[item] = position
        start = rng.randrange(count)
        votes = {item: rng.randint(0, overlap) for item in range(count) if rng.random() < 0.6}
        mine = {item for item in range(count) if rng.random() < 0.2}
        held = {item: rng.randint(1, 2) for item in range(count) if rng.random() < 0.3}
        eligible = [
            ((held.get(i, 0) > 0, -votes.get(i, 0), (rank[i] - start) % count), i)
            for i in range(count)
            if i not in mine and votes.get(i, 0) + held.get(i, 0) < overlap
        ]
        full = [i for i in range(count) if i not in mine and votes.get(i, 0) < overlap]
        expected = (min(eligible)[1], "item") if eligible else (None, "wait" if full else "done")
        levels = position_levels(count, votes, overlap, rank)
        found = choose_item(
            levels, overlap=overlap, mine=mine, votes=votes, held=held, order=order, rank=rank, start=start
        )
        assert found == expected


def test_the_tally_keeps_its_levels_in_the_order_through_votes_and_undos():
    rng = random.Random(2)
    tally = Tally(20, 2)
    order = list(range(20))
    rng.shuffle(order)
    tally.set_order(order)
    rows, standing, row_id = [], [], 0
    for _ in range(200):
        row_id += 1
        if standing and rng.random() < 0.3:
            item, annotator, choice = standing.pop(rng.randrange(len(standing)))
            rows = [(row_id, "pairwise", item, annotator, choice, True)]
        else:
            item, annotator, choice = rng.randrange(20), rng.choice("abc"), rng.choice(["A", "skip"])
            standing.append((item, annotator, choice))
            rows = [(row_id, "pairwise", item, annotator, choice, False)]
        tally.update(rows, "pairwise")
        counted = Counter(item for item, _, choice in standing if choice != "skip")
        expected = [[p for p in range(20) if counted[order[p]] == c] for c in range(2)]
        assert tally.levels == expected
    tally.set_order(None)  # back to row order
    assert tally.levels == [[i for i in range(20) if counted[i] == c] for c in range(2)]
    with pytest.raises(ValueError, match="each of the 20 items once"):
        tally.set_order([0] * 20)


# The store


def test_the_uncertainty_order_serves_the_least_sure_item_first(registry):
    store = LabelStore(registry, "cands", overlap=1, order="uncertainty", scorer=HandScorer(HAND), clock=Clock())
    store.scoring.join(30)
    served = []
    while (shown := store.current("alice")).status == "item":
        served.append(shown.item)
        store.vote("alice", shown.lease, "A")
    assert served == LEAST_SURE_FIRST
    assert store.order_text() == "uncertainty (rm:hand@1: least sure first)"


def test_overlap_leases_and_undo_keep_working_in_the_uncertainty_order(registry):
    """Least sure first: row 3, then 1, 5, 4, 0, 2. Free items first, then the closest to done, then the order."""
    clock = Clock()
    store = LabelStore(
        registry, "cands", overlap=2, lease_seconds=60, order="uncertainty", scorer=HandScorer(HAND), clock=clock
    )
    store.scoring.join(30)
    a, b = store.current("alice"), store.current("bob")
    assert (a.item, b.item) == (3, 1)  # while items are free, nobody shares one
    assert store.current("alice").renewed  # a reload keeps the lease
    store.vote("alice", a.lease, "A")
    c = store.current("carol")
    assert c.item == 3  # one vote from done: before row 5, the next least sure
    store.vote("carol", c.lease, "B")
    assert store.current("alice").item == 5  # 3 is done and 1 is bob's: the next in the order
    # Undo: alice's vote on 3 is retracted and the item leased to her again, shown the same way.
    undone, again = store.undo("alice")
    assert undone.vote.item == 3 and (again.item, again.shown) == (3, a.shown)
    store.vote("alice", again.lease, "tie")
    # An expired lease: bob's item is free again, and the first of the order left (alice's lease on 5 ended with
    # her undo, and 5 comes after 1).
    clock.now += 61
    assert store.current("dave").item == 1
    votes = store.votes()
    assert Counter(v.item for v in votes if v.counted) == {3: 2}
    assert not any(v.annotator == "alice" and v.choice == "A" for v in votes)  # the undone vote does not stand


def test_votes_go_on_in_row_order_until_the_scores_arrive(registry):
    release = threading.Event()
    store = LabelStore(
        registry, "cands", overlap=1, order="uncertainty", scorer=HandScorer(HAND, release), clock=Clock()
    )
    assert "row order until then" in store.order_text()
    first = store.current("alice")
    assert first.item == 0  # no scores yet: sequential, and the vote is not held up
    store.vote("alice", first.lease, "A")
    assert store.current("bob").item == 1
    release.set()
    store.scoring.join(30)
    assert store.current("carol").item == 3  # scored: the least sure of the free items
    assert store.order_text().endswith("least sure first)")


def test_the_random_order_is_seeded_and_stable_per_annotator(registry):
    registry.register(candidate_rows(40), name="many", kind="candidates")

    def walk(store, annotator: str) -> list[int]:
        served = []
        while (shown := store.current(annotator)).status == "item":
            served.append(shown.item)
            store.vote(annotator, shown.lease, "A")
        return served

    version = registry.resolve("many")
    shuffle = random_order(40, version.content_hash)
    alice = walk(LabelStore(registry, "many", overlap=2, order="random", clock=Clock()), "alice")
    start = random_start(40, version.content_hash, "alice")
    assert alice == shuffle[start:] + shuffle[:start]  # the shuffle, from alice's own place in it, round
    assert sorted(alice) == list(range(40)) and alice != list(range(40))
    # A restart gives bob the same order, and bob's order is not alice's (both votes of an item are then in).
    bob = walk(LabelStore(registry, "many", overlap=2, order="random", clock=Clock()), "bob")
    start_bob = random_start(40, version.content_hash, "bob")
    assert start_bob != start and bob == shuffle[start_bob:] + shuffle[:start_bob]
    assert random_order(40, version.content_hash) == shuffle  # seeded: the same shuffle every time
    assert random_order(40, "another version") != shuffle


# A tiny reward model: scored in the background, kept in the workspace, read back on the next start


@pytest.fixture
def tiny_rm(registry, tiny_model_dir, tmp_path):
    """A reward model on the tiny base: a SEQ_CLS LoRA with its score head, as `align rm` saves it."""
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    config = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules="all-linear", init_lora_weights=False, modules_to_save=["score"]
    )
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "rm")
    return registry.register_artifact("rm", "tiny-rm", tmp_path / "rm", base_model=str(tiny_model_dir))


def test_a_tiny_reward_model_orders_the_items_and_its_scores_are_kept(registry, tiny_rm, monkeypatch):
    from align.label_order import OrderScorer
    from reward.model import RewardModel

    def walk(store, annotator: str) -> list[int]:
        served = []
        while (shown := store.current(annotator)).status == "item":
            served.append(shown.item)
            store.vote(annotator, shown.lease, "A")
        return served

    rows = registry.rows("cands")
    rm = RewardModel.load("rm:tiny-rm", registry)
    scores = [rm.score([row["prompt"]] * 2, row["completions"]) for row in rows]
    gaps = [abs(a - b) for a, b in scores]
    expected = sorted(range(len(rows)), key=lambda i: (gaps[i], i))
    assert expected != list(range(len(rows)))  # not row order: the test tells the orders apart

    store = LabelStore(registry, "cands", overlap=2, order="uncertainty", scorer=open_scorer(registry, "rm:tiny-rm"))
    store.scoring.join(60)
    assert store.ordered
    assert walk(store, "alice") == expected
    kept = json.loads(store.scorer.path(store.version).read_text())
    assert kept["rm"] == "rm:tiny-rm@1" and kept["content_hash"] == store.version.content_hash
    assert kept["scores"] == [pytest.approx(pair, abs=1e-5) for pair in scores]

    # The next start reads them: nothing is loaded or scored again, and the order is in force at once.
    def never(*args, **kwargs):
        raise AssertionError("scored again")

    monkeypatch.setattr(OrderScorer, "load", never)
    again = LabelStore(registry, "cands", overlap=2, order="uncertainty", scorer=open_scorer(registry, "rm:tiny-rm"))
    assert again.ordered and again.scoring is None
    assert walk(again, "bob") == expected


def test_a_kept_file_that_does_not_fit_is_scored_again(registry, tiny_rm):
    scorer = open_scorer(registry, "rm:tiny-rm")
    version = registry.resolve("cands")
    path = scorer.path(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    assert scorer.saved(version, registry.rows(version)) is None
    path.write_text(json.dumps({"content_hash": version.content_hash, "rm_id": tiny_rm.id, "scores": [[0.0, 1.0]]}))
    assert scorer.saved(version, registry.rows(version)) is None  # one row of six
    store = LabelStore(registry, "cands", overlap=1, order="uncertainty", scorer=scorer)
    assert store.scoring is not None
    store.scoring.join(60)
    assert len(scorer.saved(version, registry.rows(version))) == 6
