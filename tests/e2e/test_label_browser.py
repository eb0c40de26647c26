"""The ranking app in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium, never downloaded).

Log in, vote with the mouse and with keys, undo, reload, then check the exact rows in the database; a completion
holding <script> must show as text and never run. Rank mode: order three completions with the dropdowns.
"""

import json
import re
import sqlite3

from align.labels import add_annotator
from align.registry import Registry
from ui.label_app import LabelDesk, create_app
from ui.serving import BackgroundServer

INJECTION = '<script>window.__pwned = true</script><img src=x onerror="window.__pwned = true"> & <b>not bold</b>'


def candidates(rows: int, completions: int) -> list[dict]:
    out = []
    for r in range(rows):
        texts = [f"row {r} answer {j}" for j in range(completions)]
        if r == 0:
            texts[1] += " " + INJECTION
        out.append(
            {
                "prompt": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": f"question {r}: <i>why</i>?"},
                ],
                "completions": [[{"role": "assistant", "content": text}] for text in texts],
                "sources": [f"model-{j}" for j in range(completions)],
            }
        )
    return out


def shown_order(page, letters: str) -> list[int]:
    """The completion index in each panel, read from the text on screen ('row R answer J')."""
    order = []
    for letter in letters:
        text = page.locator(f"#completion-{letter} .text").inner_text()
        order.append(int(re.match(r"row \d+ answer (\d+)", text).group(1)))
    return order


def comparisons(root) -> list[tuple]:
    with sqlite3.connect(root / "registry.sqlite") as db:
        found = db.execute(
            "SELECT item, annotator, shown, choice, ranking, reason, undoes, lease_id IS NOT NULL, seconds >= 0 "
            "FROM comparisons ORDER BY id"
        ).fetchall()
    return [(item, who, json.loads(shown), *rest) for item, who, shown, *rest in found]


def test_pairwise_votes_in_the_browser(tmp_path, page):
    from playwright.sync_api import expect

    registry = Registry(tmp_path / "ws")
    registry.register(candidates(6, 2), name="cands", kind="candidates")
    add_annotator(registry, "alice", "alice-pw", admin=True)
    app = create_app(LabelDesk(registry, "cands", overlap=1))
    prompt, status, progress = page.locator("#prompt"), page.locator("#status"), page.locator("#progress")

    with BackgroundServer(app) as url:
        page.goto(url)
        page.locator("input[type=text]").fill("alice")
        page.locator("input[type=password]").fill("alice-pw")
        page.get_by_role("button", name="Login").click()

        # Row 0: the prompt as a conversation, escaped; the <script> completion is shown as text and inert.
        expect(prompt).to_contain_text("question 0: <i>why</i>?")
        expect(prompt).to_contain_text("Answer briefly.")
        panels = page.locator("#completion-a .text, #completion-b .text")
        expect(panels.filter(has_text="<script>window.__pwned = true</script>")).to_have_count(1)
        expect(panels.filter(has_text="& <b>not bold</b>")).to_have_count(1)
        assert (
            page.locator("#completion-a script, #completion-b script, #completion-a img, #completion-b img").count()
            == 0
        )
        assert page.evaluate("window.__pwned") is None
        expect(progress).to_contain_text("your votes: 0")

        shown = {0: shown_order(page, "ab")}
        page.locator("#vote-a").click()  # the mouse
        expect(prompt).to_contain_text("question 1")
        expect(status).to_contain_text("Saved: A better on item 0.")

        shown[1] = shown_order(page, "ab")
        page.locator("#reason textarea").fill("B is clearer")
        page.locator("#vote-b").click()
        expect(prompt).to_contain_text("question 2")
        expect(page.locator("#reason textarea")).to_have_value("")

        shown[2] = shown_order(page, "ab")
        page.locator("#vote-tie").click()
        expect(prompt).to_contain_text("question 3")

        shown[3] = shown_order(page, "ab")
        page.locator("#vote-skip").click()
        expect(prompt).to_contain_text("question 4")

        shown[4] = shown_order(page, "ab")
        page.keyboard.press("a")  # a shortcut: A better
        expect(prompt).to_contain_text("question 5")
        expect(status).to_contain_text("Saved: A better on item 4.")
        page.keyboard.press("u")  # undo: item 4 again, shown the same way
        expect(prompt).to_contain_text("question 4")
        expect(status).to_contain_text("Undid your vote (A) on item 4")
        assert shown_order(page, "ab") == shown[4]
        page.keyboard.press("x")  # both bad
        expect(prompt).to_contain_text("question 5")
        expect(progress).to_contain_text("your votes: 4")  # A, B, tie, both bad; the skip does not count

        shown[5] = shown_order(page, "ab")
        page.reload()  # the same item comes back, the same way round
        expect(prompt).to_contain_text("question 5")
        expect(progress).to_contain_text("your votes: 4")
        assert shown_order(page, "ab") == shown[5]
        page.locator("#vote-b").click()  # the last item: the notice, no panels, the vote buttons disabled
        expect(prompt).to_contain_text("All done")
        expect(page.locator("#completion-a")).to_be_hidden()
        expect(page.locator("#vote-a")).to_be_disabled()
        expect(page.locator("#undo")).to_be_enabled()

        page.get_by_role("tab", name="Quality").click()  # alice is an admin
        expect(page.locator("#quality-annotators")).to_contain_text("alice")
        expect(page.locator("#quality-summary")).to_contain_text("position bias")

    assert comparisons(registry.root) == [
        (0, "alice", shown[0], "A", None, None, None, 1, 1),
        (1, "alice", shown[1], "B", None, "B is clearer", None, 1, 1),
        (2, "alice", shown[2], "tie", None, None, None, 1, 1),
        (3, "alice", shown[3], "skip", None, None, None, 1, 1),
        (4, "alice", shown[4], "A", None, None, None, 1, 1),
        (4, "alice", shown[4], "undo", None, None, 5, 0, None),
        (4, "alice", shown[4], "both-bad", None, None, None, 1, 1),
        (5, "alice", shown[5], "B", None, None, None, 1, 1),
    ]
    assert all(sorted(order) == [0, 1] for order in shown.values())


def test_rank_mode_in_the_browser(tmp_path, page):
    from playwright.sync_api import expect

    registry = Registry(tmp_path / "ws")
    registry.register(candidates(2, 3), name="three", kind="candidates")
    app = create_app(LabelDesk(registry, "three", mode="rank", overlap=1, open_access=True))

    with BackgroundServer(app) as url:
        page.goto(url)  # --open: no login, the local user
        expect(page.locator("#prompt")).to_contain_text("question 0")
        expect(page.get_by_role("tab", name="Quality")).to_be_visible()  # the local user is an admin
        order = shown_order(page, "abc")
        page.locator("#vote-rank").click()  # no ranks yet: refused, nothing saved
        expect(page.locator("#status")).to_contain_text("Not saved: give every completion a rank.")
        for letter, rank in zip("abc", ("2", "1", "2")):  # B best, A and C tied
            page.locator(f"#rank-{letter} input").click()
            page.locator(f"#rank-{letter} [role=option][aria-label='{rank}']").click()
        page.locator("#vote-rank").click()
        expect(page.locator("#prompt")).to_contain_text("question 1")
        expect(page.locator("#status")).to_contain_text("Saved: ranking on item 0.")

    ranking = [0, 0, 0]
    for index, rank in zip(order, (2, 1, 2)):
        ranking[index] = rank
    assert comparisons(registry.root) == [(0, "local", order, "rank", json.dumps(ranking), None, None, 1, 1)]
