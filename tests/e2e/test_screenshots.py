"""The README's screenshots are taken by a script (tests/e2e/screenshots.py, `make screenshots`); here it runs on a
tiny model: the loop it builds (votes with rubric scores, SFT, a reward model with a head per attribute) and one
PNG per tab of `align serve`, each waiting for what the tab must show (the rubric controls, both models' answers,
the lineage graph, the run's plot and report)."""

import screenshots

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_screenshot_script_shows_every_tab(tmp_path, browser, tiny_model_dir):
    workspace = screenshots.build_workspace(tmp_path / "ws", str(tiny_model_dir), steps=2)
    assert workspace.rm.meta["objectives"] == list(screenshots.RUBRIC)
    pairs = workspace.registry.rows("kitchen-prefs")
    assert len(pairs) == screenshots.VOTES and all('"helpfulness"' in row["scores"] for row in pairs)

    shots = screenshots.take_screenshots(browser, workspace, tmp_path / "shots", max_new_tokens=4)
    assert sorted(shots) == sorted(screenshots.SHOTS)
    for name, path in shots.items():
        data = path.read_bytes()
        assert data.startswith(PNG) and len(data) > 10_000, name
    workspace.registry.close()
