"""The compare app in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium, never downloaded).

A battle between two tiny models (a base and a LoRA adapter on it): both replies stream into their panels, the
names stay hidden, a vote is cast, the names are revealed, and the vote is a row in the registry with the whole
conversation. Then the leaderboard shows it, and the side-by-side tab chats with named models.
"""

import json
import re
import sqlite3

import pytest

from align.registry import Registry
from ui.compare_app import ChatSettings, CompareDesk, create_app
from ui.serving import BackgroundServer

WAIT = 60_000  # ms for each expectation: generous, since the CPU may be shared (Playwright's default is 5 s)
QUESTION = "Which is bigger, <b>2</b> or 3?"


# Counts every change of each battle panel's text: more than one change per panel means it streamed.
WATCH = """
() => {
  window.__changes = {a: [], b: []};
  for (const side of ["a", "b"]) {
    const panel = document.querySelector(`#battle-${side}`);
    new MutationObserver(() => {
      const live = panel.querySelector(".writing .text");
      if (live) window.__changes[side].push(live.textContent.length);
    }).observe(panel, {subtree: true, childList: true, characterData: true});
  }
}
"""


@pytest.fixture
def registry(tmp_path, tiny_model_dir):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    registry = Registry(tmp_path / "ws")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)  # the adapter's random weights, and so its greedy reply
    tuned = peft.get_peft_model(
        base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    tuned.save_pretrained(tmp_path / "adapter")
    registry.register_artifact("adapter", "tuned", tmp_path / "adapter", base_model=str(tiny_model_dir))
    yield registry
    registry.close()


def test_a_battle_streams_both_replies_then_the_vote_reveals_the_names(registry, page, tiny_model_dir):
    from playwright.sync_api import expect

    models = [str(tiny_model_dir), "adapter:tuned"]
    # Greedy decoding of 40 tokens: the tiny random model never stops early, so each reply streams a while.
    defaults = ChatSettings(max_new_tokens=40, temperature=0.0)
    desk = CompareDesk(registry, models, open_access=True, defaults=defaults, bootstrap=50)
    app = create_app(desk)
    assert desk.refs == [str(tiny_model_dir), "adapter:tuned@1"]
    status = page.locator("#battle-status")

    with BackgroundServer(app) as url:
        page.goto(url)
        page.get_by_role("tab", name="Battle").click()
        expect(page.locator("#battle-a .name")).to_have_text("Model A", timeout=WAIT)
        expect(page.locator("#battle-b .name")).to_have_text("Model B", timeout=WAIT)
        expect(page.locator("#battle-vote-a")).to_be_disabled(timeout=WAIT)  # nothing to vote on yet
        page.evaluate(WATCH)

        page.locator("#battle-input textarea").fill(QUESTION)
        page.locator("#battle-send").click()
        expect(status).to_contain_text("Vote when you are ready", timeout=WAIT)
        # The question shows as text (escaped), once per panel; each panel streamed its reply in several steps.
        expect(page.locator("#battle-a .turn-user .text")).to_have_text(QUESTION, timeout=WAIT)
        expect(page.locator("#battle-b .turn-user .text")).to_have_text(QUESTION, timeout=WAIT)
        assert page.locator("#battle-a b, #battle-b b").count() == 0
        changes = page.evaluate("window.__changes")
        for side in "ab":
            lengths = changes[side]
            assert len(set(lengths)) >= 3, f"panel {side} did not stream: {lengths}"
        replies = {side: page.locator(f"#battle-{side} .turn-assistant .text").inner_text() for side in "ab"}
        # Anonymous until the vote: no model name anywhere on the page.
        body = page.locator("body").inner_text()
        assert "adapter:tuned" not in body and str(tiny_model_dir) not in body
        assert page.locator("#battle-a .writing, #battle-b .writing").count() == 0

        page.locator("#battle-vote-a").click()
        expect(status).to_contain_text("Saved: A is better", timeout=WAIT)
        revealed = re.search(r"A was (\S+) · B was (\S+)\.", status.inner_text())
        assert revealed, status.inner_text()
        left, right = revealed.group(1), revealed.group(2)
        assert {left, right} == set(desk.refs)
        expect(page.locator("#battle-a .name")).to_have_text(f"Model A: {left}", timeout=WAIT)
        expect(page.locator("#battle-vote-a")).to_be_disabled(timeout=WAIT)  # one vote per battle
        expect(page.locator("#battle-send")).to_be_disabled(timeout=WAIT)

        page.get_by_role("tab", name="Leaderboard").click()
        expect(page.locator("#leaderboard-summary")).to_contain_text("1 vote", timeout=WAIT)
        expect(page.locator("#leaderboard-table")).to_contain_text("adapter:tuned@1", timeout=WAIT)
        expect(page.locator("#leaderboard-heatmap img")).to_be_visible(timeout=WAIT)

        # Side by side: the named models answer, streaming, in their own panels.
        page.get_by_role("tab", name="Side by side").click()
        expect(page.locator("#side-a .name")).to_have_text(f"Model A: {desk.refs[0]}", timeout=WAIT)
        page.locator("#side-input textarea").fill("hello")
        page.locator("#side-send").click()
        expect(page.locator("#side-b .turn-assistant:not(.writing)")).to_have_count(1, timeout=WAIT)
        expect(page.locator("#side-a .turn-user .text")).to_have_text("hello", timeout=WAIT)
        page.goto("about:blank")  # close the page's event stream, or the server waits for it when it stops

    with sqlite3.connect(registry.root / "registry.sqlite") as db:
        rows = db.execute(
            "SELECT arena, model_left, model_right, choice, annotator, messages_left, messages_right, settings, "
            "seconds FROM arena_battles"
        ).fetchall()
    [(arena, model_left, model_right, choice, annotator, messages_left, messages_right, settings, seconds)] = rows
    assert (arena, model_left, model_right, choice, annotator) == ("default", left, right, "left", "local")
    for messages, side in ((json.loads(messages_left), "a"), (json.loads(messages_right), "b")):
        assert messages == [
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": replies[side].strip()},
        ]
    assert json.loads(settings) == {"system": "", "max_new_tokens": 40, "temperature": 0.0, "top_p": 0.9}
    assert seconds >= 0


def test_the_desk_without_a_browser(registry, tiny_model_dir):
    """Refusals at start, login, random placement, and a conversation longer than the model's context."""
    from align.errors import AlignError
    from align.labels import add_annotator

    tiny = str(tiny_model_dir)
    for models, options, message in (
        ([tiny], {"open_access": True}, "at least two models"),
        ([tiny, tiny], {"open_access": True}, "listed twice"),
        ([tiny, "adapter:nope"], {"open_access": True}, "no artifact 'adapter:nope'"),
        ([tiny, "rm:judge"], {"open_access": True}, "is a reward model"),
        ([tiny, "adapter:tuned"], {}, "no annotators"),
        ([tiny, "adapter:tuned"], {"open_access": True, "arena": "../x"}, "invalid arena name"),
    ):
        with pytest.raises(AlignError, match=message):
            CompareDesk(registry, models, **options)
    add_annotator(registry, "alice", "alice-pw")
    with pytest.raises(AlignError, match="--open is refused"):
        CompareDesk(registry, [tiny, "adapter:tuned"], open_access=True)
    desk = CompareDesk(registry, [tiny, "adapter:tuned"], seed=1)
    assert desk.login_required
    assert desk.check_login("alice", "alice-pw") and not desk.check_login("alice", "wrong")

    draws = [desk.new_battle() for _ in range(20)]
    assert {tuple(battle["models"]) for battle in draws} == {(tiny, "adapter:tuned@1"), ("adapter:tuned@1", tiny)}
    assert len({battle["key"] for battle in draws}) == 20

    # The tiny model holds 256 positions: an old long exchange is dropped; a long last question cannot fit.
    settings = ChatSettings(max_new_tokens=8, temperature=0.0)
    long = "word " * 60
    thread = [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}]
    thread.append({"role": "user", "content": "short"})
    assert desk.messages(tiny, thread, settings) == [{"role": "user", "content": "short"}]
    pieces = list(desk.stream([tiny, "adapter:tuned@1"], [[{"role": "user", "content": long}]] * 2, settings))
    assert pieces[-1].done == [True, True]
    assert all("too long" in error for error in pieces[-1].errors)
    with pytest.raises(AlignError, match="ask the models something first"):
        desk.vote("alice", desk.new_battle(), "left")
