"""`align serve` in a real browser (Debian's Chromium through Playwright): every tab loads and shows the
registry's real content: a vote cast in the Label tab lands in the database, the Compare tab chats with the two
served models, the Leaderboard counts a battle, the Datasets tab draws the lineage from the votes to the
adapter, and the Runs tab plots a run's live metrics and shows its report.
"""

import sqlite3

import pytest

from align.labels import LabelStore, from_labels
from align.registry import Registry
from align.reports import plot_series, write_report
from align.runs import append_live
from ui.compare_app import ChatSettings
from ui.serve_app import create_app
from ui.serving import BackgroundServer

WAIT = 60_000  # ms per expectation: the CPU may be shared


def candidates(tag: str, rows: int) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"{tag} question {r}?"}],
            "completions": [[{"role": "assistant", "content": f"{tag} answer {r}.{j}"}] for j in range(2)],
            "sources": ["base", "sft"],
        }
        for r in range(rows)
    ]


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    """A small loop on disk: votes on candidates -> preference data -> a DPO run -> an adapter."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    registry = Registry(tmp_path / "ws")
    voted = registry.register(candidates("first", 3), name="cands", kind="candidates")
    store = LabelStore(registry, voted.ref, mode="pairwise", overlap=1)
    for _ in range(3):
        item = store.current("local")
        store.vote("local", item.lease, "A")
    prefs, _, _ = from_labels(registry, voted.ref, name="prefs")
    registry.register(candidates("second", 2), name="cands-new", kind="candidates")

    run = registry.start_run("dpo", config={"beta": 0.1}, inputs=[prefs.ref])
    for step in (1, 2, 3):
        append_live(run.dir, step, {"loss": 0.7 - 0.1 * step, "learning_rate": 1e-4})
    plot = plot_series(run.dir / "loss.png", "DPO loss", {"train loss": [(1, 0.6), (2, 0.5), (3, 0.4)]})
    write_report(run, "DPO report for the browser test", summary={"held-out accuracy": 0.75}, plots=[plot])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    tuned = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tuned.save_pretrained(tmp_path / "adapter")
    adapter = registry.register_artifact(
        "adapter", "dpo", tmp_path / "adapter", base_model=str(tiny_model_dir), run=run, parents=[prefs]
    )
    registry.finish_run(run, metrics={"eval_accuracy": 0.75}, outputs=[adapter.ref])
    yield registry, run
    registry.close()


def test_every_tab_shows_the_workspace(workspace, browser):
    from playwright.sync_api import expect

    registry, run = workspace
    defaults = ChatSettings(max_new_tokens=8, temperature=0.0)
    app, served = create_app(registry, defaults=defaults, bootstrap=20)
    assert served["login"] is False and served["candidates"] == ["cands-new@1", "cands@1"]
    assert served["models"][-1] == "adapter:dpo@1" and len(served["models"]) == 2  # the base, then the adapter

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(WAIT)
    page = context.new_page()
    with BackgroundServer(app) as url:
        page.goto(url)
        expect(page.locator("#serve-header")).to_contain_text(str(registry.root), timeout=WAIT)

        # Label: the newest candidates first; another version can be picked, and a vote lands in the registry.
        expect(page.locator("#prompt")).to_contain_text("second question", timeout=WAIT)
        page.locator("#label-candidates input").click()
        page.get_by_role("option", name="cands@1").click()
        expect(page.locator("#prompt")).to_contain_text("All done", timeout=WAIT)  # its 3 items have their votes
        page.locator("#label-candidates input").click()
        page.get_by_role("option", name="cands-new@1").click()
        expect(page.locator("#prompt")).to_contain_text("second question", timeout=WAIT)
        page.locator("#vote-b").click()
        expect(page.locator("#status")).to_contain_text("Saved: B better", timeout=WAIT)
        with sqlite3.connect(registry.root / "registry.sqlite") as db:
            found = db.execute("SELECT dataset_id, annotator, choice FROM comparisons ORDER BY id DESC").fetchone()
        assert found[1:] == ("local", "B") and found[0] == registry.resolve("cands-new").id

        # Compare / Arena: both served models answer side by side.
        page.get_by_role("tab", name="Compare / Arena").click()
        expect(page.locator("#side-b")).to_contain_text("adapter:dpo@1", timeout=WAIT)
        page.locator("#side-input textarea").fill("Hello?")
        page.locator("#side-send").click()
        expect(page.locator("#side-a .turn-assistant")).to_have_count(1, timeout=WAIT)
        expect(page.locator("#side-b .turn-assistant")).to_have_count(1, timeout=WAIT)

        # Battle: a vote goes to the arena, and the Leaderboard counts it.
        page.get_by_role("tab", name="Battle").click()
        page.locator("#battle-input textarea").fill("Pick one.")
        page.locator("#battle-send").click()
        expect(page.locator("#battle-vote-a")).to_be_enabled(timeout=WAIT)
        page.locator("#battle-vote-a").click()
        expect(page.locator("#battle-status")).to_contain_text("Saved", timeout=WAIT)
        page.get_by_role("tab", name="Leaderboard").click()
        expect(page.locator("#leaderboard-summary")).to_contain_text("1 vote ·", timeout=WAIT)
        expect(page.locator("#leaderboard-table")).to_contain_text("adapter:dpo@1", timeout=WAIT)

        # Datasets: the versions, and the lineage from the human votes to the adapter.
        page.get_by_role("tab", name="Datasets").click()
        expect(page.locator("#datasets-table")).to_contain_text("cands-new@1", timeout=WAIT)
        expect(page.locator("#artifacts-table")).to_contain_text("adapter:dpo@1", timeout=WAIT)
        lineage = page.locator("#datasets-lineage")
        expect(lineage).to_contain_text("human votes", timeout=WAIT)  # the newest artifact is shown first
        expect(lineage).to_contain_text("prefs@1", timeout=WAIT)
        expect(lineage).to_contain_text("adapter:dpo@1", timeout=WAIT)
        expect(page.locator("#datasets-lineage-graph img")).to_be_visible(timeout=WAIT)
        page.locator("#datasets-chosen input").click()
        page.get_by_role("option", name="cands@1", exact=True).click()
        expect(page.locator("#datasets-samples")).to_contain_text("first question 0", timeout=WAIT)

        # Runs: the run, its live metrics plotted, its report.
        page.get_by_role("tab", name="Runs").click()
        expect(page.locator("#runs-table")).to_contain_text(run.id, timeout=WAIT)
        expect(page.locator("#runs-status")).to_contain_text("completed", timeout=WAIT)
        expect(page.locator("#runs-status")).to_contain_text("3 logged steps", timeout=WAIT)
        expect(page.locator("#runs-plot img")).to_be_visible(timeout=WAIT)
        expect(page.locator("#runs-report")).to_contain_text("DPO report for the browser test", timeout=WAIT)
        expect(page.locator("#runs-plots img")).to_have_count(1, timeout=WAIT)
    context.close()
