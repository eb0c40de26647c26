"""benchmarks/active_learning.py: its verdict worked out by hand, and its --quick smoke test end to end (a tiny
model built from a config on 80 HH pairs, about 10 s once the libraries are imported)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("active_learning", ROOT / "benchmarks" / "active_learning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def curve(points: dict[int, float], n: int = 20) -> list:
    """(labels, per-pair correctness, seconds) with `accuracy * n` of n held-out pairs right."""
    return [
        (labels, [1.0] * round(accuracy * n) + [0.0] * (n - round(accuracy * n)), 0.0)
        for labels, accuracy in points.items()
    ]


def test_the_verdict_by_hand(benchmark):
    plain = curve({100: 0.5, 600: 0.6, 800: 0.7})
    # Uncertainty reaches random's 800-label 0.7 at 600 labels: met.
    text, goal, reached = benchmark.verdict(
        {"random": plain, "uncertainty": curve({100: 0.5, 600: 0.7, 800: 0.75})}, 800, 600
    )
    assert (goal, reached) == (0.7, 600) and text.startswith("met: ") and "with 600 labels" in text
    # ... only at 800: not met, and said so.
    text, _, reached = benchmark.verdict(
        {"random": plain, "uncertainty": curve({100: 0.5, 600: 0.65, 800: 0.7})}, 800, 600
    )
    assert reached == 800 and text.startswith("not met: ") and "with 800 labels" in text
    # ... never.
    text, _, reached = benchmark.verdict(
        {"random": plain, "uncertainty": curve({100: 0.5, 600: 0.6, 800: 0.65})}, 800, 600
    )
    assert reached is None and text == "not met: the uncertainty order never reached 0.700 (random at 800 labels)"
    text, goal, _ = benchmark.verdict({"random": plain, "uncertainty": plain}, 900, 600)
    assert goal is None and "no point at 900 labels" in text
    lines = benchmark.table({"random": plain, "uncertainty": curve({100: 0.5, 600: 0.7, 800: 0.75})})
    assert lines[2].split()[:2] == ["600", "0.600"] and "+0.100" in lines[2]


@pytest.fixture(scope="module")
def quick_run(benchmark, tmp_path_factory):
    data = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-dev.jsonl.gz"
    if not data.is_file():
        pytest.skip(f"the shared HH data is not at {data}")
    out = tmp_path_factory.mktemp("quick")
    return benchmark.main(["--quick", "--out", str(out)]), out


def test_quick_runs_both_orders_from_one_start_and_writes_the_plot_and_the_table(quick_run):
    result, tmp_path = quick_run
    curves = result["curves"]
    assert [point[0] for point in curves["random"]] == [10, 20, 30, 40]
    assert [point[0] for point in curves["uncertainty"]] == [10, 20, 30, 40]
    assert curves["random"][0][1] == curves["uncertainty"][0][1]  # the same starting reward model
    assert all(len(point[1]) == 40 for order in curves.values() for point in order)
    text = (tmp_path / "active-learning-quick.txt").read_text()
    assert "target (uncertainty reaches random's 30-label accuracy with <= 20 labels): " in text
    assert result["verdict"] in text
    assert (tmp_path / "active-learning-quick.png").stat().st_size > 10_000


def test_a_stopped_run_goes_on_from_its_last_round_to_the_same_curves(benchmark, quick_run, tmp_path, monkeypatch):
    whole, _ = quick_run
    retrain, calls = benchmark.retrain, []

    def stops_at_the_fourth(setup, labelled):  # the start, then both orders at 20 labels, then a kill at 30
        calls.append(len(labelled))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return retrain(setup, labelled)

    monkeypatch.setattr(benchmark, "retrain", stops_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        benchmark.main(["--quick", "--out", str(tmp_path)])
    assert calls == [10, 20, 20, 30]
    monkeypatch.setattr(benchmark, "retrain", retrain)
    resumed = benchmark.main(["--quick", "--out", str(tmp_path)])

    def accuracies(curves):
        return {order: [(labels, hits) for labels, hits, _ in points] for order, points in curves.items()}

    assert accuracies(resumed["curves"]) == accuracies(whole["curves"])
