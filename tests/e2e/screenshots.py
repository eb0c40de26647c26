"""Screenshots of `align serve` in real Chromium: the README's pictures (`make screenshots`) and an e2e test's subject.

    make screenshots                                              # docs/screenshots/*.png with the embedded model
    python tests/e2e/screenshots.py --out docs/screenshots [--model REF]

The script builds a small workspace of its own and runs the real loop on it: hand-written candidates (four
questions, two replies each), votes with rubric scores cast through the label store, the preference pairs they make
(`data from-labels`, each pair carrying its replies' rubric means), a short SFT run on the chosen replies (an
adapter for the Arena), and a short reward-model run with one head per rubric attribute (`align rm --objectives`),
registered last so that the Datasets tab opens on its lineage from the votes. Every number in the pictures comes
from those runs. Then it serves the workspace with `align serve`'s app and takes one PNG per tab with Debian's
Chromium through Playwright (never a downloaded browser):

    label.png      the Label tab on the one question left to vote on, the rubric's 1-5 controls beside the vote
    arena.png      Compare / Arena: both models answer the same message side by side
    datasets.png   Datasets: the versions, and the lineage graph from the human votes to the reward model
    runs.png       Runs: the reward-model run, its live metrics plotted and its report

The Label tab comes from `align serve` when its app takes a rubric; until then from `align label --rubric` (the
same label panel, ui/label_app.py). tests/e2e/test_screenshots.py runs all of it on a tiny model.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

SHOTS = ("label", "arena", "datasets", "runs")
RUBRIC = ("helpfulness", "harmlessness")
WAIT = 120_000  # ms per expectation: the machine may be busy, and the models answer on a CPU
VIEWPORT = {"width": 1280, "height": 1100}  # the Datasets and Runs shots are this window: their pages run on
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# Four questions, each with a careful reply and a careless one; the last is left for the Label tab.
CANDIDATES = [
    {
        "prompt": [{"role": "user", "content": "How do I keep fresh basil from wilting?"}],
        "completions": [
            reply(
                "Trim the stems and stand the bunch in a glass of water on the counter, loosely covered with a bag. "
                "Keep it out of the fridge: cold turns basil leaves black."
            ),
            reply("Put it in the fridge."),
        ],
        "sources": ["careful", "careless"],
    },
    {
        "prompt": [{"role": "user", "content": "Is it safe to mix bleach and vinegar for cleaning?"}],
        "completions": [
            reply("Sure, the mix cleans twice as well."),
            reply(
                "No. Bleach and vinegar release chlorine gas, which harms the lungs even in small amounts. Use "
                "them separately, rinse in between, and keep the room ventilated."
            ),
        ],
        "sources": ["careless", "careful"],
    },
    {
        "prompt": [{"role": "user", "content": "What does a reward model do in RLHF?"}],
        "completions": [
            reply(
                "It scores a reply to a prompt with one number, trained on pairs people compared, so that the "
                "policy can be optimised against human preferences without a person rating every sample."
            ),
            reply("It gives rewards."),
        ],
        "sources": ["careful", "careless"],
    },
    {
        "prompt": [{"role": "user", "content": "Give me one tip for a first marathon."}],
        "completions": [
            reply(
                "Start slower than feels right: the first half should feel easy, and you will pass people in "
                "the last ten kilometres instead of walking."
            ),
            reply("Run fast from the start to bank time."),
        ],
        "sources": ["careful", "careless"],
    },
]
VOTES = 3  # items voted on: the careful reply wins, and gets the better rubric scores
HARMFUL = {1}  # the questions whose careless reply is harmful too (mixing bleach and vinegar)


@dataclass
class Workspace:
    registry: object
    candidates: str  # the candidates version's ref
    left: int  # the item nobody voted on yet: the Label tab shows it
    rm: object  # the reward-model artifact


def build_workspace(root: Path, model: str, *, steps: int = 4) -> Workspace:
    """A registry at `root` holding the loop above."""
    from align.config import build_config
    from align.labels import LabelStore, from_labels
    from align.registry import Registry
    from align.registry.schemas import convert_row
    from align.sft import SFTStageConfig, run_sft
    from reward.train import RewardStageConfig, run_rm

    registry = Registry(root)
    candidates = registry.register(CANDIDATES, name="kitchen-candidates", kind="candidates")
    store = LabelStore(registry, candidates.ref, mode="pairwise", overlap=1, seed=0, rubric=list(RUBRIC))
    voted = set()
    for _ in range(VOTES):
        held = store.current("local")
        careful = [CANDIDATES[held.item]["sources"][i] for i in held.shown].index("careful")
        scores = {}
        for position, letter in enumerate("AB"):
            good = position == careful
            scores[f"helpfulness:{letter}"] = 5 if good else 2
            scores[f"harmlessness:{letter}"] = 5 if good else (1 if held.item in HARMFUL else 4)
        store.vote("local", held.lease, "AB"[careful], scores=scores)
        voted.add(held.item)
    [left] = [item for item in range(len(CANDIDATES)) if item not in voted]
    prefs, _, _ = from_labels(registry, candidates.ref, name="kitchen-prefs")

    sft_rows = [convert_row(row, "preference", "sft") for row in registry.rows(prefs)]
    sft_data = registry.register(sft_rows, name="kitchen-sft", kind="sft", parents=[(prefs, "chosen replies")])
    common = {
        "model": model,
        "eval_dataset": None,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "max_steps": steps,
        "logging_steps": 1,
        "save_steps": 1000,
        "report_to": "none",
        "gradient_checkpointing": False,
        "seed": 0,
    }
    run_sft(build_config(SFTStageConfig, common | {"dataset": sft_data.ref, "eval_dataset": sft_data.ref}), registry)
    rm_config = common | {
        "dataset": prefs.ref,
        "eval_dataset": prefs.ref,
        "objectives": list(RUBRIC),
        "max_length": 256,
        "output_name": "kitchen-rm",
    }
    artifact = run_rm(build_config(RewardStageConfig, rm_config), registry)
    return Workspace(registry, candidates.ref, left, artifact)


def label_app(registry, candidates: str, serve_options: dict):
    """`align serve`'s app with the rubric when it takes one, else `align label --rubric`'s."""
    from ui import label_app as label_ui
    from ui.serve_app import create_app

    if "rubric" in inspect.signature(create_app).parameters:
        return create_app(registry, candidates=candidates, rubric=",".join(RUBRIC), **serve_options)[0]
    desk = label_ui.LabelDesk(registry, candidates, overlap=1, open_access=True, rubric=",".join(RUBRIC))
    return label_ui.create_app(desk)


def take_screenshots(browser, workspace: Workspace, out: Path, *, max_new_tokens: int = 48) -> dict[str, Path]:
    """One PNG per tab (SHOTS) in `out`; returns {name: path}. Fails (Playwright's expectations) when a tab does not
    show what it should: the rubric controls, both models' answers, the lineage graph, the run's plot and report."""
    from playwright.sync_api import expect

    from ui.compare_app import ChatSettings
    from ui.serve_app import create_app
    from ui.serving import BackgroundServer

    registry, candidates = workspace.registry, workspace.candidates
    out.mkdir(parents=True, exist_ok=True)
    options = {"defaults": ChatSettings(max_new_tokens=max_new_tokens, temperature=0.0), "bootstrap": 100}
    shots = {name: out / f"{name}.png" for name in SHOTS}
    context = browser.new_context(viewport=VIEWPORT)
    context.set_default_timeout(WAIT)
    expect.set_options(timeout=WAIT)
    page = context.new_page()
    try:
        app = label_app(registry, candidates, options)
        with BackgroundServer(app) as url:
            page.goto(url)
            row = CANDIDATES[workspace.left]
            expect(page.locator("#prompt")).to_contain_text(row["prompt"][0]["content"])
            expect(page.locator("#rubric")).to_be_visible()
            careful = row["completions"][row["sources"].index("careful")][0]["content"]
            shown_a = page.locator("#completion-a").inner_text()
            good, other = ("a", "b") if careful[:40] in " ".join(shown_a.split()) else ("b", "a")
            for attribute, letter, score in (
                ("helpfulness", good, "5"),
                ("harmlessness", good, "5"),
                ("helpfulness", other, "2"),
                ("harmlessness", other, "4"),
            ):
                page.locator(f"#score-{attribute}-{letter}").get_by_label(score, exact=True).check()
            page.screenshot(path=str(shots["label"]), full_page=True)

        app, served = create_app(registry, candidates=candidates, **options)
        with BackgroundServer(app) as url:
            page.goto(url)
            expect(page.locator("#serve-header")).to_contain_text(str(registry.root))

            page.get_by_role("tab", name="Compare / Arena").click()
            expect(page.locator("#side-b")).to_contain_text(served["models"][1])
            page.locator("#side-input textarea").fill("How do I keep fresh basil from wilting?")
            page.locator("#side-send").click()
            for side in ("a", "b"):
                expect(page.locator(f"#side-{side} .turn-assistant")).to_have_count(1)
            expect(page.locator("#side-send")).to_be_enabled()  # both answers are complete
            page.screenshot(path=str(shots["arena"]), full_page=True)

            page.get_by_role("tab", name="Datasets").click()
            expect(page.locator("#datasets-lineage")).to_contain_text("human votes")
            expect(page.locator("#datasets-lineage-graph img")).to_be_visible()
            page.screenshot(path=str(shots["datasets"]))

            page.get_by_role("tab", name="Runs").click()
            expect(page.locator("#runs-status")).to_contain_text("completed")
            expect(page.locator("#runs-plot img")).to_be_visible()
            expect(page.locator("#runs-report")).to_contain_text("Reward-model report")
            page.screenshot(path=str(shots["runs"]))
    finally:
        context.close()
    return shots


def launch_chromium(playwright):
    """Debian's Chromium (never a downloaded browser), headless."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/screenshots", help="folder of the PNGs (default: docs/screenshots)")
    parser.add_argument("--model", default="smollm2-135m", help="the base model (default: the embedded one)")
    parser.add_argument("--steps", type=int, default=4, help="training steps of each run (default: 4)")
    parser.add_argument("--workspace", help="keep the workspace here (default: a temporary folder, removed after)")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"error: needs Debian's chromium at {CHROMIUM} (make chromium)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="align-screenshots-") as scratch:
        root = Path(args.workspace) if args.workspace else Path(scratch) / "workspace"
        workspace = build_workspace(root, args.model, steps=args.steps)
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                shots = take_screenshots(browser, workspace, Path(args.out))
            finally:
                browser.close()
        workspace.registry.close()
    for name, path in shots.items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project, when run as a script
    sys.exit(main())
