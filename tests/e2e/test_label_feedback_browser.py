"""Thumbs mode and rubric scores in a real browser (Debian's Chromium through Playwright): the 1-5 controls beside the
vote, the keys, and the scores as they reach the registry and `data from-labels`."""

import json
import re
import sqlite3

from align.labels import from_labels
from align.registry import Registry
from ui.label_app import LabelDesk, create_app
from ui.serving import BackgroundServer


def candidates(rows: int, completions: int) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"question {r}"}],
            "completions": [[{"role": "assistant", "content": f"row {r} answer {j}"}] for j in range(completions)],
            "sources": [f"model-{j}" for j in range(completions)],
        }
        for r in range(rows)
    ]


def stored(root) -> list[tuple]:
    with sqlite3.connect(root / "registry.sqlite") as db:
        found = db.execute("SELECT mode, item, shown, choice, scores, reason FROM comparisons ORDER BY id").fetchall()
    return [(mode, item, json.loads(shown), choice, json.loads(scores) if scores else None, reason)
            for mode, item, shown, choice, scores, reason in found]  # fmt: skip


def pick(page, control: str, score: str) -> None:
    page.locator(f"#{control}").get_by_label(score, exact=True).check()


def test_thumbs_with_a_rubric_in_the_browser(tmp_path, page):
    from playwright.sync_api import expect

    registry = Registry(tmp_path / "ws")
    registry.register(candidates(2, 2), name="cands", kind="candidates")
    desk = LabelDesk(registry, "cands", mode="thumbs", overlap=1, open_access=True, rubric="helpfulness,honesty")
    prompt, status = page.locator("#prompt"), page.locator("#status")

    with BackgroundServer(create_app(desk)) as url:
        page.goto(url)
        expect(prompt).to_contain_text("question 0")
        expect(page.locator("#completion-a")).to_contain_text("row 0 answer 0")  # one reply at a time
        expect(page.locator("#completion-b")).to_have_count(0)
        expect(page.locator("#vote-a")).to_have_count(0)

        pick(page, "score-helpfulness", "4")
        page.locator("#reason textarea").fill("clear")
        page.locator("#vote-up").click()
        expect(status).to_contain_text("Saved: thumbs up on item 0.")
        expect(page.locator("#completion-a")).to_contain_text("row 0 answer 1")
        expect(page.locator("#score-helpfulness input:checked")).to_have_count(0)  # cleared for the next reply

        pick(page, "score-helpfulness", "2")
        pick(page, "score-honesty", "5")
        page.keyboard.press("n")  # a key: thumbs down
        expect(status).to_contain_text("Saved: thumbs down on item 1.")
        expect(page.locator("#completion-a")).to_contain_text("row 1 answer 0")

        page.keyboard.press("1")  # 1 is up in thumbs mode; no scores given: none stored
        expect(status).to_contain_text("Saved: thumbs up on item 2.")

    assert stored(registry.root) == [
        ("thumbs", 0, [0], "up", {"helpfulness": 4}, "clear"),
        ("thumbs", 1, [1], "down", {"helpfulness": 2, "honesty": 5}, None),
        ("thumbs", 2, [0], "up", None, None),
    ]
    version, _, _ = from_labels(registry, "cands", name="fb", kind="feedback")
    assert [(row["completion"][0]["content"], row["label"]) for row in registry.rows(version)] == [
        ("row 0 answer 0", True),
        ("row 0 answer 1", False),
        ("row 1 answer 0", True),
    ]
    assert version.meta["rubric"]["attributes"]["helpfulness"]["scores"] == 2


def test_pairwise_rubric_scores_each_reply_in_the_browser(tmp_path, page):
    from playwright.sync_api import expect

    registry = Registry(tmp_path / "ws")
    registry.register(candidates(2, 2), name="cands", kind="candidates")
    desk = LabelDesk(registry, "cands", overlap=1, open_access=True, rubric=["helpfulness"])

    with BackgroundServer(create_app(desk)) as url:
        page.goto(url)
        expect(page.locator("#prompt")).to_contain_text("question 0")
        shown = [
            int(re.search(r"answer (\d)", page.locator(f"#completion-{letter} .text").inner_text()).group(1))
            for letter in "ab"
        ]
        pick(page, "score-helpfulness-a", "5")
        pick(page, "score-helpfulness-b", "1")
        page.locator("#vote-a").click()
        expect(page.locator("#status")).to_contain_text("Saved: A better on item 0.")
        expect(page.locator("#prompt")).to_contain_text("question 1")

    assert stored(registry.root) == [("pairwise", 0, shown, "A", {"helpfulness:A": 5, "helpfulness:B": 1}, None)]
    version, _, _ = from_labels(registry, "cands", name="prefs")
    items = {(item["completion"], item["mean"]) for item in version.meta["rubric"]["items"]}
    assert items == {(shown[0], 5.0), (shown[1], 1.0)}
