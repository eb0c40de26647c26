"""Reviews of machine-made sft rows (align/review.py): leases and overlap, the rules that turn decisions into rows,
agreement and acceptance, a kill -9 after a decision is acknowledged, and the errors a user can act on."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from align import cli
from align.errors import AlignError
from align.expansion import origin_of
from align.labels import LabelError
from align.registry import Registry
from align.review import ReviewStore, from_review, quality

REPO = Path(__file__).resolve().parents[2]


def row(task, origin=None):
    out = {"messages": [{"role": "user", "content": task}, {"role": "assistant", "content": task.upper()}]}
    return out | ({"origin": json.dumps(origin)} if origin else {})


SI = {"method": "self-instruct", "round": 0, "scores": {}}
EV = {"method": "evol", "operator": "deepen", "round": 0, "parent": "seed", "scores": {}}
ROWS = [row("seed"), row("one", SI), row("two", EV), row("three", SI), row("four", EV)]


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "ws")
    registry.register([ROWS[0]], name="seeds", kind="sft")
    registry.register(ROWS, name="grown", kind="sft", meta={"from": "seeds@1"})
    return registry


def decide_all(store, who, decisions) -> list[int]:
    """Decide on the rows handed out, in turn; returns their items."""
    items = []
    for decision in decisions:
        item = store.current(who)
        kwargs = {"reason": "bad"} if decision == "reject" else {}
        if decision == "edit":
            kwargs = {"user": f"{who} edited task", "answer": f"{who} edited answer"}
        store.decide(who, item.lease, decision, **kwargs)
        items.append(item.item)
    return items


def test_two_reviewers_per_row_majority_edits_and_agreement(registry):
    store = ReviewStore(registry, "grown", overlap=2)
    assert store.items == [1, 2, 3, 4]  # the machine-made rows only
    first = store.current("ann")
    assert store.current("ann") == replace(first, renewed=True)  # a reload shows the same row
    assert store.current("bob").item == 1 != first.item == 0  # a leased row goes to someone else first
    store.decide("ann", first.lease, "accept")
    assert decide_all(store, "ann", ["edit", "reject", "accept"]) == [2, 3, 1]
    assert decide_all(store, "bob", ["edit", "accept", "reject", "reject"]) == [1, 0, 2, 3]
    assert store.current("ann").status == store.current("bob").status == "done"
    assert store.progress("ann").complete == 4

    version, result, numbers = from_review(registry, "grown", name="clean", with_seeds=True)
    rows = registry.rows(version)
    # item 0: accept + accept; item 1: accept + edit (kept as the edit); item 2: edit + reject, a tie: dropped;
    # item 3: reject + reject.
    assert (result.accepted, result.edited, result.rejected, result.ties, result.unreviewed) == (1, 1, 1, 1, 0)
    assert [r["messages"][0]["content"] for r in rows] == ["seed", "one", "bob edited task"]
    assert rows[2]["messages"][1]["content"] == "bob edited answer" and "origin" not in rows[0]
    assert origin_of(rows[2])["review"] == {"decision": "edit", "accept": 1, "edit": 1, "reject": 0}
    roles = {(role, getattr(parent, "ref", parent)) for role, parent in registry.parents(version)}
    assert roles == {("reviewed", "grown@1"), ("reviews", "comparisons:1"), ("seeds", "seeds@1")}
    # Agreement on keep / reject: items 0, 1 and 3 agree, 2 does not. Kappa: p_o = 3/4; ann keeps 3 of 4, bob 2 of 4:
    # p_e = 3/4 * 2/4 + 1/4 * 2/4 = 1/2; kappa = (3/4 - 1/2) / (1 - 1/2) = 0.5.
    assert numbers["rows_reviewed_twice"] == 4 and numbers["pairwise_agreement"] == pytest.approx(0.75)
    assert numbers["cohen_kappa"] == [{"annotators": ["ann", "bob"], "shared": 4, "kappa": pytest.approx(0.5)}]
    report = quality(store.rows, store.items, store.reviews())
    by = {(r["method"], r["operator"]): r for r in report["by_method"]}
    assert by[("self-instruct", "-")]["acceptance"] == pytest.approx(3 / 4)  # items 0, 2: accept x2, edit, reject
    assert by[("evol", "deepen")]["acceptance"] == pytest.approx(2 / 4)  # items 1, 3: accept, edit, reject x2
    assert report["by_method"][-1]["method"] == "(all)" and report["reasons"] == [("bad", 3)]


def test_refused_decisions(registry):
    store = ReviewStore(registry, "grown")
    item = store.current("ann")
    with pytest.raises(LabelError, match="a rejection needs a reason"):
        store.decide("ann", item.lease, "reject", reason="  ")
    with pytest.raises(LabelError, match="an edit gives both the task and the answer"):
        store.decide("ann", item.lease, "edit", user="task", answer="")
    with pytest.raises(LabelError, match="not leased to 'bob'"):
        store.decide("bob", item.lease, "accept")
    with pytest.raises(LabelError, match="decision 'maybe' is not one of accept, edit, reject, skip"):
        store.decide("ann", item.lease, "maybe")
    first = store.decide("ann", item.lease, "accept")
    assert store.decide("ann", item.lease, "accept").duplicate and first.vote  # a double click is recorded once

    registry.register(ROWS[1:], name="other", kind="sft")
    other = ReviewStore(registry, "other")
    decide_all(other, "ann", ["reject"])
    with pytest.raises(AlignError, match="no row of other@1 was accepted or edited: 1 rejected, 0 ties, 3 not rev"):
        from_review(registry, "other", name="x")


def test_no_machine_made_rows_and_no_reviews_get_clear_errors(registry, capsys):
    root = str(registry.root)
    assert cli.main(["--workspace", root, "data", "from-review", "seeds", "--name", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset seeds@1 has no machine-made rows (no row has an origin)")
    assert cli.main(["--workspace", root, "review", "--data", "seeds", "--open", "--port", "1"]) == 2
    assert capsys.readouterr().err.startswith("error: dataset seeds@1 has no machine-made rows")
    assert cli.main(["--workspace", root, "data", "from-review", "grown", "--name", "x"]) == 2
    assert "error: no reviews of grown@1 yet: review its rows with `align review --data grown@1`" in (
        capsys.readouterr().err
    )


KILLED = """
import sys, time
from align.registry import Registry
from align.review import ReviewStore
store = ReviewStore(Registry(sys.argv[1]), "grown")
item = store.current("ann")
store.decide("ann", item.lease, "edit", user="edited task", answer="edited answer")
print("acknowledged", flush=True)
time.sleep(3600)
"""


def test_a_decision_acknowledged_survives_kill_9(registry):
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED), str(registry.root)],
                               stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "acknowledged"
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    reopened = ReviewStore(Registry(registry.root), "grown")
    [review] = reopened.reviews()
    assert (review.item, review.choice, review.edited[0]["content"]) == (0, "edit", "edited task")
    assert reopened.current("ann").item == 1  # the next row
