"""Labels: assignment, aggregation and agreement, each checked against numbers worked out by hand; then the
SQLite store (leases, votes, undo, restart) with a fake clock."""

import json
import random
import re
import sqlite3
import threading
from collections import Counter

import pytest

from align.errors import AlignError
from align.labels import (
    LabelError,
    LabelStore,
    Vote,
    add_annotator,
    aggregate,
    agreement,
    choose_item,
    from_labels,
    hash_password,
    judgments,
    label_items,
    list_annotators,
    normalize_ranking,
    quality,
    verify_password,
)
from align.registry import Registry


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def candidate_row(index: int, count: int = 2, sources=None, gold=None) -> dict:
    row = {
        "prompt": [{"role": "user", "content": f"question {index}"}],
        "completions": [reply(f"answer {index}.{j}") for j in range(count)],
        "sources": sources or [f"model-{j % 2}" for j in range(count)],
    }
    if gold is not None:
        row["gold"] = gold
    return row


def vote(id, item, annotator, shown, choice, ranking=None, seconds=None) -> Vote:
    return Vote(
        id=id,
        item=item,
        annotator=annotator,
        mode="rank" if choice == "rank" else "pairwise",
        shown=tuple(shown),
        choice=choice,
        ranking=tuple(ranking) if ranking else None,
        seconds=seconds,
    )


# Passwords


def test_passwords_are_salted_scrypt_hashes():
    first, second = hash_password("s3cret"), hash_password("s3cret")
    assert first.startswith("scrypt$16384$8$1$") and "s3cret" not in first
    assert first != second  # a fresh salt each time
    assert verify_password("s3cret", first) and verify_password("s3cret", second)
    assert not verify_password("s3cret!", first)
    assert not verify_password("s3cret", "plain-text")
    with pytest.raises(AlignError, match="empty"):
        hash_password("")


# Items


def test_items_are_one_pair_per_row_chosen_by_a_fixed_rule():
    rows = [
        candidate_row(0),
        candidate_row(1, 4, sources=["sft", "sft", "base", "base"]),
        candidate_row(2, 4, sources=["sft", "sft", "base", "base"], gold=1),
        candidate_row(3, 3, sources=["x", "x", "x"]),
    ]
    items = label_items(rows, "pairwise", "hash-1")
    assert items[0] == (0, 1)
    i, j = items[1]
    assert i < j and rows[1]["sources"][i] != rows[1]["sources"][j]  # two different sources when there are
    assert 1 in items[2] and rows[2]["sources"][items[2][0]] != rows[2]["sources"][items[2][1]]  # gold shown
    assert items[3] in [(0, 1), (0, 2), (1, 2)]
    assert label_items(rows, "pairwise", "hash-1") == items  # deterministic
    assert label_items(rows, "rank", "hash-1") == [(0, 1), (0, 1, 2, 3), (0, 1, 2, 3), (0, 1, 2)]


# Assignment


def levels(count: int, votes: dict, overlap: int) -> list[list[int]]:
    """The items not done yet by counted votes, in row order (what the store keeps for choose_item)."""
    return [[item for item in range(count) if votes.get(item, 0) == c] for c in range(overlap)]


def test_choose_item_by_hand():
    def choose(count, *, overlap, mine, votes, held):
        return choose_item(levels(count, votes, overlap), overlap=overlap, mine=mine, votes=votes, held=held)

    # Nothing voted, nothing held: the first row.
    assert choose(3, overlap=2, mine=set(), votes={}, held={}) == (0, "item")
    # A free item closer to done goes first.
    assert choose(3, overlap=2, mine=set(), votes={2: 1}, held={}) == (2, "item")
    # Free items before items someone else holds, even one with a vote.
    assert choose(3, overlap=2, mine=set(), votes={0: 1}, held={0: 1, 1: 1}) == (2, "item")
    # No free item left: share one that still has an open slot (overlap 2).
    assert choose(2, overlap=2, mine=set(), votes={}, held={0: 1, 1: 1}) == (0, "item")
    # ... the one closest to done first.
    assert choose(3, overlap=3, mine=set(), votes={2: 1}, held={0: 1, 1: 1, 2: 1}) == (2, "item")
    # Never the same item twice; never past the overlap.
    assert choose(3, overlap=2, mine={0}, votes={1: 2}, held={}) == (2, "item")
    # Only held items left, all slots leased: wait (a lease may end in a skip or expire).
    assert choose(2, overlap=1, mine=set(), votes={0: 1}, held={1: 1}) == (None, "wait")
    # Everything voted or full: done.
    assert choose(2, overlap=1, mine={1}, votes={0: 1}, held={}) == (None, "done")


def test_choose_item_is_the_best_item_by_its_rule():
    """On random states, the choice is the eligible item with the least (held, -counted votes, row) that the
    rule names, found by checking every item."""
    rng = random.Random(0)
    for _ in range(500):
        count, overlap = rng.randint(1, 12), rng.randint(1, 3)
        votes = {item: rng.randint(0, overlap) for item in range(count) if rng.random() < 0.6}
        mine = {item for item in range(count) if rng.random() < 0.2}
        held = {item: rng.randint(1, 2) for item in range(count) if rng.random() < 0.3}
        eligible = [
            ((held.get(i, 0) > 0, -votes.get(i, 0), i), i)
            for i in range(count)
            if i not in mine and votes.get(i, 0) + held.get(i, 0) < overlap
        ]
        full = [i for i in range(count) if i not in mine and votes.get(i, 0) < overlap]
        expected = (min(eligible)[1], "item") if eligible else (None, "wait" if full else "done")
        found = choose_item(levels(count, votes, overlap), overlap=overlap, mine=mine, votes=votes, held=held)
        assert found == expected


def test_normalize_ranking():
    assert normalize_ranking([1, 3, 3]) == [1, 2, 2]
    assert normalize_ranking([2, 2, 2]) == [1, 1, 1]
    assert normalize_ranking([3, 1, 2]) == [3, 1, 2]
    for bad in ([0, 1], [1, True], ["1", 2], []):
        with pytest.raises(LabelError):
            normalize_ranking(bad)


# Aggregation


def hand_votes() -> list[Vote]:
    return [
        # Row 0, pair (0, 1): alice and bob prefer completion 1, carol completion 0, dave skips.
        vote(1, 0, "alice", (1, 0), "A"),
        vote(2, 0, "bob", (0, 1), "B"),
        vote(3, 0, "carol", (0, 1), "A"),
        vote(4, 0, "dave", (1, 0), "skip"),
        # Row 1, three completions ranked (rank of each completion index, 1 = best).
        vote(5, 1, "alice", (2, 0, 1), "rank", ranking=(1, 2, 2)),
        vote(6, 1, "bob", (0, 1, 2), "rank", ranking=(2, 1, 3)),
        # Row 2: both bad by a strict majority.
        vote(7, 2, "alice", (0, 1), "both-bad"),
        vote(8, 2, "bob", (1, 0), "both-bad"),
        vote(9, 2, "carol", (0, 1), "A"),
    ]


def hand_candidates() -> list[dict]:
    return [candidate_row(0), candidate_row(1, 3), candidate_row(2)]


def test_rankings_expand_into_every_pair():
    found = {(j.annotator, j.item, j.first, j.second): j.outcome for j in judgments(hand_votes())}
    assert found[("alice", 1, 0, 1)] == "first"
    assert found[("alice", 1, 0, 2)] == "first"
    assert found[("alice", 1, 1, 2)] == "tie"
    assert found[("bob", 1, 0, 1)] == "second"
    assert found[("bob", 1, 0, 2)] == "first"
    assert found[("bob", 1, 1, 2)] == "first"
    assert found[("alice", 0, 0, 1)] == "second"  # A with (1, 0) shown: completion 1
    assert ("dave", 0, 0, 1) not in found  # a skip is no judgment
    assert len(found) == 3 + 6 + 3


def test_aggregate_by_hand():
    rows = hand_candidates()
    result = aggregate(rows, hand_votes(), ties="drop")
    # Row 0: 2 votes for completion 1, 1 for completion 0 (n = 3): margin (2 - 1) / 3, weight 2 / 3.
    # Row 1: (0, 1) is 1-1, a tie, dropped; (0, 2) 2-0: margin 1, weight 1; (1, 2) first 1, tie 1: margin 1/2.
    # Row 2: both bad 2 of 3, dropped.
    expected = [
        (rows[0]["completions"][1], rows[0]["completions"][0], 1 / 3, 2 / 3),
        (rows[1]["completions"][0], rows[1]["completions"][2], 1.0, 1.0),
        (rows[1]["completions"][1], rows[1]["completions"][2], 0.5, 0.5),
    ]
    got = [(r["chosen"], r["rejected"], r["margin"], r["weight"]) for r in result.rows]
    assert got == expected
    assert all("tie" not in r for r in result.rows)
    assert (result.pairs, result.kept, result.ties_dropped, result.both_bad, result.too_few) == (5, 3, 1, 1, 0)

    kept = aggregate(rows, hand_votes(), ties="keep")
    tie_rows = [r for r in kept.rows if r["tie"]]
    assert len(kept.rows) == 4 and len(tie_rows) == 1
    assert tie_rows[0]["chosen"] == rows[1]["completions"][0] and tie_rows[0]["rejected"] == rows[1]["completions"][1]
    assert (tie_rows[0]["margin"], tie_rows[0]["weight"]) == (0.0, 1.0)  # 1-1, no both-bad: all votes cancel out

    strict = aggregate(rows, hand_votes(), min_votes=3)
    assert [r["prompt"] for r in strict.rows] == [rows[0]["prompt"]]  # row 1's pairs have 2 votes each
    assert (strict.too_few, strict.both_bad) == (3, 1)


def test_aggregate_rejects_bad_options():
    with pytest.raises(AlignError, match="--ties"):
        aggregate(hand_candidates(), hand_votes(), ties="maybe")
    with pytest.raises(AlignError, match="--min-votes"):
        aggregate(hand_candidates(), hand_votes(), min_votes=0)


# Agreement


def test_agreement_on_votes_by_hand():
    numbers = agreement(hand_votes())
    # Units (item, i, j) with labels: (0,0,1) alice second, bob second, carol first; (1,0,1) alice first, bob
    # second; (1,0,2) first, first; (1,1,2) alice tie, bob first; (2,0,1) both-bad, both-bad, carol first.
    # Agreeing label pairs: unit (0,0,1) 1 of 3, (1,0,1) 0 of 1, (1,0,2) 1 of 1, (1,1,2) 0 of 1, (2,0,1) 1 of 3.
    assert numbers["pairwise_agreement"] == pytest.approx(3 / 9)
    assert (numbers["annotators"], numbers["votes"]) == (3, 8)  # dave's skip is not a vote
    kappas = {tuple(entry["annotators"]): entry for entry in numbers["cohen_kappa"]}
    # alice vs bob share 5 units: (second, second), (first, second), (first, first), (tie, first), (bb, bb).
    # p_o = 3/5; alice: second 1, first 2, tie 1, bb 1; bob: second 2, first 2, bb 1.
    # p_e = (1*2 + 2*2 + 1*1) / 25 = 7/25; kappa = (15/25 - 7/25) / (18/25) = 8/18.
    assert kappas[("alice", "bob")]["shared"] == 5
    assert kappas[("alice", "bob")]["kappa"] == pytest.approx(8 / 18)
    # alice vs carol share 2 units: (second, first), (bb, first): p_o = 0, p_e = 0 -> kappa 0.
    assert kappas[("alice", "carol")]["kappa"] == pytest.approx(0.0)
    alpha = numbers["krippendorff_alpha"]
    assert alpha is not None and -1 <= alpha <= 1


def test_quality_by_hand():
    rows = [candidate_row(0, gold=0), candidate_row(1), candidate_row(2, 3, gold=2)]
    votes = [
        vote(1, 0, "alice", (0, 1), "A", seconds=4.0),  # left pick, gold right
        vote(2, 1, "alice", (1, 0), "A", seconds=2.0),  # left pick, no gold
        vote(3, 0, "bob", (1, 0), "A", seconds=3.0),  # left pick, gold wrong
        vote(4, 1, "bob", (0, 1), "tie", seconds=9.0),
        vote(5, 2, "bob", (2, 0, 1), "rank", ranking=(2, 2, 1), seconds=5.0),  # gold strictly first: right
        vote(6, 2, "alice", (0, 1, 2), "skip", seconds=1.0),
        vote(7, 1, "carol", (0, 1), "B", seconds=6.0),
        vote(8, 0, "carol", (0, 1), "both-bad", seconds=8.0),
    ]
    report = quality(rows, votes)
    people = {row["annotator"]: row for row in report["annotators"]}
    assert (people["alice"]["votes"], people["alice"]["skips"]) == (2, 1)
    assert people["alice"]["median_seconds"] == pytest.approx(3.0)  # median of 4 and 2; the skip is left out
    assert people["alice"]["left_share"] == pytest.approx(1.0)
    assert people["alice"]["gold_votes"] == 1 and people["alice"]["gold_accuracy"] == pytest.approx(1.0)
    assert people["bob"]["tie_rate"] == pytest.approx(1 / 3)
    assert people["bob"]["gold_votes"] == 2 and people["bob"]["gold_accuracy"] == pytest.approx(0.5)
    assert people["bob"]["median_seconds"] == pytest.approx(5.0)
    assert people["carol"]["left_share"] == pytest.approx(0.0) and people["carol"]["both_bad_rate"] == 0.5
    overall = report["overall"]
    assert overall["votes"] == 7 and overall["skips"] == 1
    assert overall["left_share"] == pytest.approx(3 / 4)  # A, A, A, B
    assert overall["tie_rate"] == pytest.approx(1 / 7) and overall["both_bad_rate"] == pytest.approx(1 / 7)
    assert overall["gold_votes"] == 4 and overall["gold_accuracy"] == pytest.approx(2 / 4)


# The store: SQLite, one transaction per vote


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "ws")
    registry.register([candidate_row(i) for i in range(4)], name="cands", kind="candidates")
    yield registry
    registry.close()


def make_store(registry, **options) -> LabelStore:
    options.setdefault("clock", Clock())
    return LabelStore(registry, "cands", seed=0, **options)


def test_store_leases_distinct_items_and_respects_the_overlap(registry):
    store = make_store(registry, overlap=2)
    a, b, c = store.current("alice"), store.current("bob"), store.current("carol")
    assert (a.item, b.item, c.item) == (0, 1, 2)  # while items are free, nobody shares one
    assert store.current("alice") == a.__class__("item", a.lease, a.item, a.shown, renewed=True)  # a reload
    store.vote("alice", a.lease, "A")
    assert store.current("alice").item == 3  # alice voted on 0; 1 and 2 are held; 3 is free
    d = store.current("dave")
    assert d.item == 0  # nobody holds it now, and it is one vote from done
    store.vote("dave", d.lease, "B")
    # Item 0 has its two votes. Items 1-3 are held, each by one annotator: no free item is left, so erin
    # shares the first with a slot open.
    e = store.current("erin")
    assert e.item == 1
    votes = store.votes()
    assert [(v.item, v.annotator, v.choice) for v in votes] == [(0, "alice", "A"), (0, "dave", "B")]
    assert set(a.shown) == {0, 1} and set(d.shown) == {0, 1}


def test_store_refuses_votes_without_a_lease(registry):
    store = make_store(registry)
    lease = store.current("alice").lease
    with pytest.raises(LabelError, match="not leased to 'bob'"):
        store.vote("bob", lease, "A")
    with pytest.raises(LabelError, match="not leased"):
        store.vote("alice", 999, "A")
    with pytest.raises(LabelError, match="choice 'C'"):
        store.vote("alice", lease, "C")
    with pytest.raises(LabelError, match="ranking"):
        store.vote("alice", lease, "A", ranking=[1, 2])
    first = store.vote("alice", lease, "tie", reason="  same  ")
    again = store.vote("alice", lease, "tie")  # a double click: recorded once
    assert again.duplicate and again.vote == first.vote
    rows = registry.db.execute("SELECT annotator, choice, reason, lease_id FROM comparisons").fetchall()
    assert [tuple(r) for r in rows] == [("alice", "tie", "same", lease)]


def test_store_lease_expiry(registry):
    clock = Clock()
    store = make_store(registry, overlap=1, lease_seconds=60, clock=clock)
    for annotator in ("a", "b", "c", "d"):
        store.current(annotator)  # items 0-3, one each
    late = store.current("a")
    clock.now += 61
    taken = store.current("e")  # every lease expired: e gets item 0, a's
    assert taken.item == late.item == 0
    store.vote("e", taken.lease, "A")
    with pytest.raises(LabelError, match="expired"):
        store.vote("a", late.lease, "B")  # its slot went to e
    # An expired lease on an item nobody else took still counts (the annotator did the work).
    b_lease = registry.db.execute("SELECT id FROM label_leases WHERE annotator = 'b'").fetchone()[0]
    assert store.vote("b", b_lease, "B").item == 1
    # The seconds run from the lease to the vote.
    seconds = registry.db.execute("SELECT seconds FROM comparisons WHERE annotator = 'b'").fetchone()[0]
    assert seconds == pytest.approx(61.0)


def test_skips_do_not_count_and_undo_appends(registry):
    store = make_store(registry, overlap=1)
    first = store.current("alice")
    store.vote("alice", first.lease, "skip")
    assert store.current("bob").item == first.item  # a skip leaves the slot open for someone else
    second = store.current("alice")
    assert second.item != first.item  # ... but never comes back to alice
    store.vote("alice", second.lease, "B", reason="clearer")
    undone, again = store.undo("alice")
    assert undone.vote.choice == "B" and undone.vote.reason == "clearer"
    assert (again.item, again.shown) == (second.item, second.shown)  # the same item, shown the same way
    assert store.progress("alice").mine == 0
    store.vote("alice", again.lease, "A")
    rows = registry.db.execute("SELECT item, annotator, choice, undoes FROM comparisons ORDER BY id").fetchall()
    assert [tuple(r) for r in rows] == [
        (first.item, "alice", "skip", None),
        (second.item, "alice", "B", None),
        (second.item, "alice", "undo", 2),
        (second.item, "alice", "A", None),
    ]
    assert [(v.item, v.choice) for v in registry.labels.votes(store.version.id)] == [
        (first.item, "skip"),
        (second.item, "A"),
    ]
    with pytest.raises(LabelError, match="undone"):
        store.vote("alice", second.lease, "B")  # the lease of the undone vote


def test_each_thread_votes_in_its_own_transaction(registry):
    """The apps call one store from many worker threads. A vote from one thread waits for another thread's open
    transaction to end, and then commits, rather than landing inside it (as it would on a shared connection)."""
    store = make_store(registry)
    lease = store.current("alice").lease
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with registry.labels.transaction():
            inside.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(30)
    receipts = []
    voter = threading.Thread(target=lambda: receipts.append(store.vote("alice", lease, "A")))
    voter.start()
    voter.join(0.5)
    waited = voter.is_alive()
    release.set()
    holder.join(30)
    voter.join(30)
    assert waited and len(receipts) == 1
    assert [(v.annotator, v.choice) for v in store.votes()] == [("alice", "A")]


def test_store_continues_after_a_restart(registry):
    store = make_store(registry)
    shown = store.current("alice")
    store.vote("alice", shown.lease, "A")
    held = store.current("alice")
    restarted = LabelStore(registry, "cands", clock=store.clock)  # a new process would read the same rows
    again = restarted.current("alice")
    assert (again.lease, again.item, again.shown, again.renewed) == (held.lease, held.item, held.shown, True)
    assert restarted.progress("alice").mine == 1


def test_store_rank_mode(registry):
    registry.register([candidate_row(i, 3) for i in range(2)], name="three", kind="candidates")
    store = LabelStore(registry, "three", mode="rank", overlap=1, seed=1)
    shown = store.current("alice")
    assert sorted(shown.shown) == [0, 1, 2]
    with pytest.raises(LabelError, match="3 completions"):
        store.vote("alice", shown.lease, "rank", ranking=[1, 2])
    with pytest.raises(LabelError, match="choice 'A'"):
        store.vote("alice", shown.lease, "A")
    store.vote("alice", shown.lease, "rank", ranking=[2, 1, 1])  # in the order shown
    ranking = json.loads(registry.db.execute("SELECT ranking FROM comparisons").fetchone()[0])
    expected = [0, 0, 0]
    for position, index in enumerate(shown.shown):
        expected[index] = [2, 1, 1][position]
    assert ranking == expected


def test_bad_candidates_are_refused_at_start(registry):
    registry.register(
        [{"prompt": [{"role": "user", "content": "q"}], "chosen": reply("a"), "rejected": reply("b")}],
        name="prefs",
        kind="preference",
    )
    with pytest.raises(AlignError, match="'preference' rows, but the ranking app needs 'candidates'"):
        LabelStore(registry, "prefs")
    with pytest.raises(AlignError, match="rank mode orders three or more completions, but row 0"):
        LabelStore(registry, "cands", mode="rank")
    with pytest.raises(AlignError, match="no dataset 'nothing'"):
        LabelStore(registry, "nothing")
    with pytest.raises(AlignError, match="--overlap"):
        LabelStore(registry, "cands", overlap=0)


def test_annotators(registry):
    add_annotator(registry, "alice", "pw", admin=True)
    add_annotator(registry, "bob", "pw2")
    with pytest.raises(AlignError, match="already exists"):
        add_annotator(registry, "alice", "other")
    with pytest.raises(AlignError, match="invalid annotator name"):
        add_annotator(registry, "../x", "pw")
    found = list_annotators(registry)
    assert [(a["name"], a["admin"], a["votes"]) for a in found] == [("alice", 1, 0), ("bob", 0, 0)]
    store = make_store(registry, overlap=1)
    for choice in ("A", "skip", "B"):
        store.vote("alice", store.current("alice").lease, choice)
    store.undo("alice")  # retracts B
    assert [a["votes"] for a in list_annotators(registry)] == [1, 0]
    stored = registry.db.execute("SELECT password FROM annotators WHERE name = 'alice'").fetchone()[0]
    assert verify_password("pw", stored) and "pw" not in stored


def test_from_labels(registry):
    store = make_store(registry, overlap=2)
    # alice and bob get items 0 and 1, then each other's: item 0 gets A and tie, item 1 tie and tie.
    for annotator, choice in (("alice", "A"), ("bob", "tie"), ("alice", "tie"), ("bob", "tie")):
        shown = store.current(annotator)
        store.vote(annotator, shown.lease, choice)
    version, result, numbers = from_labels(registry, "cands", name="prefs", ties="keep")
    rows = registry.rows(version)
    assert version.kind == "preference" and len(rows) == 2
    assert sum(row["tie"] for row in rows) == 1
    agreement_meta = version.meta["agreement"]
    assert set(agreement_meta) == {"krippendorff_alpha", "pairwise_agreement", "annotators", "votes"}
    assert (agreement_meta["annotators"], agreement_meta["votes"]) == (2, 4)
    parents = {role: parent for role, parent in registry.parents(version)}
    assert parents["candidates"].ref == "cands@1"
    snapshot = version.meta["comparisons_snapshot"]
    assert parents["votes"] == f"comparisons:{snapshot['id']}" and snapshot["standing_votes"] == 4
    # The same votes again: the same version and snapshot.
    again, _, _ = from_labels(registry, "cands", name="prefs", ties="keep")
    assert again.ref == version.ref
    assert registry.db.execute("SELECT COUNT(*) FROM comparison_snapshots").fetchone()[0] == 1
    with pytest.raises(AlignError, match="no preference pairs left"):
        from_labels(registry, "cands", name="prefs2", min_votes=3)


def test_from_labels_without_votes(registry):
    with pytest.raises(AlignError, match="no votes on cands@1 yet"):
        from_labels(registry, "cands", name="prefs")


def test_comparisons_are_append_only_rows(registry):
    """Every vote is its own committed row: a second connection (another process) sees it at once."""
    store = make_store(registry)
    shown = store.current("alice")
    store.vote("alice", shown.lease, "A")
    other = sqlite3.connect(registry.root / "registry.sqlite")
    assert other.execute("SELECT choice FROM comparisons").fetchall() == [("A",)]
    other.close()


def test_two_stores_on_one_version_see_each_others_votes(registry):
    """Two processes label one version: each store's progress and choices follow the other's votes, skips and
    undos (it reads the rows appended since it last looked), and agree with the votes recounted from scratch."""
    one, two = make_store(registry, overlap=2), make_store(registry, overlap=2)
    rng = random.Random(1)
    for step in range(40):
        store, name = rng.choice([(one, "alice"), (two, "bob"), (one, "carol"), (two, "carol")])
        if rng.random() < 0.2:
            store.undo(name)
        else:
            shown = store.current(name)
            if shown.status == "item":
                store.vote(name, shown.lease, rng.choice(["A", "B", "skip"]))
        standing = registry.labels.votes(one.version.id)
        counted = Counter(vote.item for vote in standing if vote.counted)
        for reader in (one, two):
            for who in ("alice", "bob", "carol"):
                progress = reader.progress(who)
                assert progress.votes == sum(counted.values()), step
                assert progress.complete == sum(count >= 2 for count in counted.values()), step
                assert progress.mine == sum(vote.counted and vote.annotator == who for vote in standing), step
    # Neither hands out an item past its overlap, or one its annotator voted on.
    for store, name in ((one, "dave"), (two, "alice")):
        shown = store.current(name)
        voted = {vote.item for vote in registry.labels.votes(one.version.id) if vote.annotator == name}
        if shown.status == "item":
            assert shown.item not in voted and counted[shown.item] < 2


def plans_on_the_way_of_a_vote(registry, store) -> list[str]:
    """The query plan of every statement a page load, a vote, the next item, the progress line and an undo run."""
    statements: list[str] = []
    db = registry.labels.db  # this thread's connection, the one the store uses here
    db.set_trace_callback(statements.append)
    try:
        shown = store.current("alice")
        store.vote("alice", shown.lease, "A")
        store.progress("alice")
        store.current("alice")
        store.undo("alice")
    finally:
        db.set_trace_callback(None)
    plans = []
    for statement in statements:
        if statement.split()[0].upper() in ("SELECT", "UPDATE", "DELETE"):
            plans += [f"{row['detail']}   <- {statement}" for row in db.execute("EXPLAIN QUERY PLAN " + statement)]
    return plans


def test_no_query_on_the_way_of_a_vote_reads_every_row_of_the_version(registry):
    """With 100,000 votes stored, a query that walks every vote or lease of the version costs seconds per vote:
    each must narrow by item, annotator, lease, id, or through an index of the undo rows or the open leases."""
    store = make_store(registry, overlap=2)
    plans = plans_on_the_way_of_a_vote(registry, store)
    assert any("comparisons_undone" in plan for plan in plans)  # which votes stand: through the undo rows only
    assert any("label_leases_open_" in plan for plan in plans)
    assert any("comparisons_dataset (dataset_id=? AND rowid>?)" in plan for plan in plans)  # the rows since
    whole = re.compile(r"^(SCAN (comparisons|label_leases|c|u|v)\b|SEARCH .* \(dataset_id=\?( AND mode=\?)?\))")
    partial = ("comparisons_undone", "label_leases_open_")
    walks = [plan for plan in plans if whole.search(plan) and not any(name in plan for name in partial)]
    assert not walks, "\n".join(walks)


def test_an_older_workspace_gets_the_label_indexes(tmp_path):
    """A workspace made before the label indexes is upgraded when opened, its rows kept."""
    from align.registry.catalog import MIGRATIONS

    root = tmp_path / "old"
    root.mkdir()
    old = sqlite3.connect(root / "registry.sqlite")
    for script in MIGRATIONS[:3]:
        old.executescript(script)
    old.execute("PRAGMA user_version=3")
    old.execute(
        "INSERT INTO label_leases (dataset_id, mode, item, annotator, shown, leased_at, expires_at) "
        "VALUES (1, 'pairwise', 0, 'alice', '[0, 1]', 1.0, 2.0)"
    )
    old.commit()
    old.close()
    registry = Registry(root)
    indexes = {row[0] for row in registry.db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert indexes >= {
        "comparisons_dataset",
        "comparisons_undone",
        "label_leases_open_item",
        "label_leases_open_annotator",
    }
    assert not indexes & {"label_leases_item", "label_leases_annotator"}  # replaced by the open-lease ones
    assert registry.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert registry.labels.live_lease(1, "pairwise", "alice", 1.5).item == 0
    registry.close()
