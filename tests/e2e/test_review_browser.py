"""The review app in a real browser (Playwright driving Debian's Chromium): log in, accept, edit, reject (a reason
is required), skip and undo machine-made rows, then check the exact decisions in the database and the sft rows
`align data from-review` makes of them. Text from the data is shown escaped."""

import json
import sqlite3

from align.expansion import origin_of
from align.labels import add_annotator
from align.registry import Registry
from align.review import from_review
from ui.review_app import ReviewDesk, create_app
from ui.serving import BackgroundServer


def row(task: str, answer: str, origin: dict | None = None) -> dict:
    out = {"messages": [{"role": "user", "content": task}, {"role": "assistant", "content": answer}]}
    return out | ({"origin": json.dumps(origin)} if origin else {})


def self_instruct(round_number: int) -> dict:
    neighbours = [{"instruction": "Name a fruit.", "rouge_l": 0.25}, {"instruction": "Name a colour.", "rouge_l": 0.2}]
    scores = {"rouge_l_max": 0.25, "words": 4}
    return {"method": "self-instruct", "round": round_number, "scores": scores, "neighbours": neighbours}


def evol(operator: str) -> dict:
    scores = {"rouge_l_parent": 0.5, "words": 6}
    return {"method": "evol", "operator": operator, "round": 0, "parent": "Name a fruit.", "scores": scores}


ROWS = [
    row("Name a fruit.", "Apple."),  # a human seed: not reviewed
    row("Name a vegetable <b>now</b>.", "Carrot.", self_instruct(0)),
    row("Name two tropical fruits.", "Mango, papaya.", evol("constrain")),
    row("Name a planet.", "Plutoo.", self_instruct(1)),
    row("Name a rare fruit and its origin.", "I'm sorry.", evol("broaden")),
    row("Name a metal.", "Iron.", self_instruct(2)),
]


def decisions(root) -> list[tuple]:
    with sqlite3.connect(root / "registry.sqlite") as db:
        found = db.execute(
            "SELECT item, annotator, mode, choice, reason, edited, undoes, lease_id IS NOT NULL FROM comparisons "
            "ORDER BY id"
        ).fetchall()
    return [(*rest[:5], json.loads(rest[5]) if rest[5] else None, *rest[6:]) for rest in found]


def test_accept_edit_reject_in_the_browser_become_the_right_sft_rows(tmp_path, page):
    from playwright.sync_api import expect

    registry = Registry(tmp_path / "ws")
    registry.register(ROWS, name="grown", kind="sft", meta={"from": "seeds@1"})
    add_annotator(registry, "alice", "alice-pw", admin=True)
    app = create_app(ReviewDesk(registry, "grown", overlap=1))
    shown, status = page.locator("#review-row"), page.locator("#review-status")

    with BackgroundServer(app) as url:
        page.goto(url)
        page.locator("input[type=text]").fill("alice")
        page.locator("input[type=password]").fill("alice-pw")
        page.get_by_role("button", name="Login").click()

        # Item 0 (row 1): the task escaped, how it was made, its nearest pool tasks. Accept it.
        expect(shown).to_contain_text("Name a vegetable <b>now</b>.")
        assert page.locator("#review-row b").count() == 0
        expect(page.locator("#review-origin")).to_contain_text("self-instruct · round 0")
        expect(page.locator("#review-context")).to_contain_text("Name a colour.")
        expect(page.locator("#review-progress")).to_contain_text("Reviewed 0 of 5 rows")
        page.locator("#review-accept").click()
        expect(status).to_contain_text("Saved: item 0 accepted.")

        # Item 1 (row 2, evol): its parent is shown; edit both boxes and save the edit.
        expect(shown).to_contain_text("Name two tropical fruits.")
        expect(page.locator("#review-context")).to_contain_text("evolved (constrain) from")
        expect(page.locator("#review-context")).to_contain_text("Name a fruit.")
        expect(page.locator("#review-task textarea")).to_have_value("Name two tropical fruits.")
        page.locator("#review-task textarea").fill("Name two tropical fruits and where they grow.")
        page.locator("#review-answer textarea").fill("Mango (India) and papaya (Mexico).")
        page.locator("#review-edit").click()
        expect(status).to_contain_text("Saved: item 1 edit saved.")

        # Item 2 (row 3): a rejection without a reason is refused; with one it is saved.
        expect(shown).to_contain_text("Name a planet.")
        page.locator("#review-reject").click()
        expect(status).to_contain_text("Not saved: a rejection needs a reason")
        expect(shown).to_contain_text("Name a planet.")
        page.locator("#review-reason textarea").fill("wrong answer")
        page.locator("#review-reject").click()
        expect(status).to_contain_text("Saved: item 2 rejected.")

        # Item 3 (row 4): accepted by mistake, undone, then rejected.
        expect(shown).to_contain_text("Name a rare fruit")
        page.locator("#review-accept").click()
        expect(shown).to_contain_text("Name a metal.")
        page.locator("#review-undo").click()
        expect(status).to_contain_text("Undid your decision (accept) on item 3")
        expect(shown).to_contain_text("Name a rare fruit")
        page.locator("#review-reason textarea").fill("refused")
        page.locator("#review-reject").click()

        # Item 4 (row 5): skipped; then nothing is left for alice.
        expect(shown).to_contain_text("Name a metal.")
        page.reload()  # the same row comes back
        expect(shown).to_contain_text("Name a metal.")
        page.locator("#review-skip").click()
        expect(shown).to_contain_text("All done")
        expect(page.locator("#review-accept")).to_be_disabled()
        expect(page.locator("#review-progress")).to_contain_text("yours: 4")

        page.get_by_role("tab", name="Review quality").click()  # alice is an admin
        methods = page.locator("#review-quality-methods")
        expect(methods).to_contain_text("constrain")
        expect(methods).to_contain_text("50%")  # self-instruct: 1 accepted of 2 reviews
        expect(page.locator("#review-quality-summary")).to_contain_text("wrong answer (1)")

    edited = [
        {"role": "user", "content": "Name two tropical fruits and where they grow."},
        {"role": "assistant", "content": "Mango (India) and papaya (Mexico)."},
    ]
    assert decisions(registry.root) == [
        (0, "alice", "review", "accept", None, None, None, 1),
        (1, "alice", "review", "edit", None, edited, None, 1),
        (2, "alice", "review", "reject", "wrong answer", None, None, 1),
        (3, "alice", "review", "accept", None, None, None, 1),
        (3, "alice", "review", "undo", None, None, 4, 0),
        (3, "alice", "review", "reject", "refused", None, None, 1),
        (4, "alice", "review", "skip", None, None, None, 1),
    ]
    version, result, _ = from_review(registry, "grown", name="grown-clean")
    rows = registry.rows(version)
    assert [r["messages"] for r in rows] == [ROWS[1]["messages"], edited]
    assert [origin_of(r)["review"]["decision"] for r in rows] == ["accept", "edit"]
    assert origin_of(rows[1])["parent"] == "Name a fruit."  # the origin is kept
    assert (result.accepted, result.edited, result.rejected, result.unreviewed) == (1, 1, 2, 1)
    roles = {(role, getattr(parent, "ref", parent)) for role, parent in registry.parents(version)}
    assert roles == {("reviewed", "grown@1"), ("reviews", "comparisons:1")}


def test_the_review_tab_of_align_serve(tmp_path, page):
    from playwright.sync_api import expect

    from ui.serve_app import create_app as create_serve_app

    registry = Registry(tmp_path / "ws")
    registry.register(ROWS[:1], name="seeds", kind="sft")  # no machine-made rows: not offered for review
    grown = registry.register(ROWS, name="grown", kind="sft")
    app, _ = create_serve_app(registry, models=[])
    with BackgroundServer(app) as url:
        page.goto(url)
        page.get_by_role("tab", name="Review").first.click()
        expect(page.locator("#review-row")).to_contain_text("Name a vegetable")
        page.locator("#review-data input").click()
        expect(page.get_by_role("option", name="seeds@1")).to_have_count(0)
        page.keyboard.press("Escape")
        page.locator("#review-accept").click()
        expect(page.locator("#review-status")).to_contain_text("Saved: item 0 accepted.")
    assert decisions(registry.root) == [(0, "local", "review", "accept", None, None, None, 1)]
    with sqlite3.connect(registry.root / "registry.sqlite") as db:
        assert db.execute("SELECT dataset_id FROM comparisons").fetchone()[0] == grown.id
