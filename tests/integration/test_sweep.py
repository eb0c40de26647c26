"""`align sweep` on the reward-model stage with a tiny model: trials are real rm runs on the fit split, chosen on
the validation split; the test split is read once, after the search; the study resumes from its SQLite file."""

import pytest
import yaml
from test_rm import marker_rows
from test_rm import recipe as rm_recipe

from align import sweep
from align.config import build_config
from align.errors import AlignError
from align.registry import Registry


def sweep_config(tmp_path, tiny_model_dir, **values):
    recipe_path = tmp_path / "rm.yaml"
    stage = rm_recipe(tiny_model_dir) | {"dataset": "placeholder", "eval_dataset": None}
    recipe_path.write_text(yaml.safe_dump({k: v for k, v in stage.items() if v is not None}))
    return build_config(
        sweep.SweepConfig,
        {
            "stage": "rm",
            "recipe": str(recipe_path),
            "dataset": "marker-train",
            "test_dataset": "marker-test",
            "study": "tiny",
            "n_trials": 2,
            "validation_split": 0.2,
            "overrides": {"max_steps": 4},
            "search": {"learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}},
        }
        | values,
    )


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "ws")
    registry.register(marker_rows(60, seed=1), name="marker-train", kind="preference")
    registry.register(marker_rows(20, seed=2), name="marker-test", kind="preference")
    return registry


def test_a_two_trial_study_completes_and_never_reads_the_test_split_to_choose(
    tmp_path, tiny_model_dir, registry, monkeypatch
):
    reads, phase = [], {"final": False}
    for method in ("rows", "load"):
        original = getattr(Registry, method)

        def spy(self, ref, *args, _original=original, **kwargs):
            reads.append((self.resolve(ref).ref, phase["final"]))
            return _original(self, ref, *args, **kwargs)

        monkeypatch.setattr(Registry, method, spy)
    import reward.score

    real_evaluate = reward.score.evaluate_rm

    def final_evaluate(*args, **kwargs):
        phase["final"] = True
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(reward.score, "evaluate_rm", final_evaluate)

    result = sweep.run_sweep(sweep_config(tmp_path, tiny_model_dir), registry)

    test_reads = [final for ref, final in reads if ref == "marker-test@1"]
    assert test_reads and all(test_reads), "the test split was read before the search ended"
    assert any(ref == "marker-train-val@1" for ref, final in reads if not final)
    trial_runs = [run for run in registry.list_runs() if run.stage == "rm"]
    assert len(trial_runs) == 2 and all(run.status == "completed" for run in trial_runs)
    assert all(run.inputs[1:3] == ["marker-train-fit@1", "marker-train-val@1"] for run in trial_runs)
    assert registry.resolve("marker-train-val").num_rows == 12 and registry.resolve("marker-train-fit").num_rows == 48

    metrics = result["metrics"]
    assert metrics["trials_complete"] == 2 and metrics["test_pairs"] == 20
    best = yaml.safe_load(result["best_recipe"].read_text())
    assert best["dataset"] == "marker-train" and best["learning_rate"] == metrics["best_params"]["learning_rate"]
    winner_run = registry.get_run(registry.resolve_artifact(result["outputs"][0]).run_id)
    assert winner_run.metrics["eval_accuracy"] == metrics["best_val_eval_accuracy"]
    sweep_run = [run for run in registry.list_runs() if run.stage == "sweep"][-1]
    assert sweep_run.status == "completed" and (sweep_run.dir / "report.md").is_file()
    assert (sweep_run.dir / "final.png").is_file()


def test_an_interrupted_study_resumes_from_its_storage(tmp_path, tiny_model_dir, registry, monkeypatch):
    config = sweep_config(tmp_path, tiny_model_dir, n_trials=3, test_dataset=None)
    calls = {"n": 0}
    real_entry = sweep.stage_entry

    def entry_that_dies_on_the_second_trial(stage):
        cls, run = real_entry(stage)

        def dying(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # what Ctrl-C does in the middle of a trial
            return run(*args, **kwargs)

        return cls, dying

    monkeypatch.setattr(sweep, "stage_entry", entry_that_dies_on_the_second_trial)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep(config, registry)
    assert len([r for r in registry.list_runs() if r.stage == "rm"]) == 1

    monkeypatch.setattr(sweep, "stage_entry", real_entry)
    result = sweep.run_sweep(config, registry)
    # the finished trial is kept; two more make three; no trial is run twice
    assert result["metrics"]["trials_complete"] == 3
    assert len([r for r in registry.list_runs() if r.stage == "rm" and r.status == "completed"]) == 3


def test_bad_sweep_recipes_fail_before_any_trial(tmp_path, tiny_model_dir, registry):
    with pytest.raises(AlignError, match="search.learning_rat"):
        build_config(sweep.SweepConfig, {"dataset": "d", "search": {"learning_rat": {"low": 2, "high": 1}}})
    with pytest.raises(AlignError, match="not a key of the rm recipe"):
        sweep.run_sweep(sweep_config(tmp_path, tiny_model_dir, search={"learning_rat": {"choices": [1]}}), registry)
    with pytest.raises(AlignError, match="is the training data itself"):
        sweep.run_sweep(sweep_config(tmp_path, tiny_model_dir, test_dataset="marker-train"), registry)
    assert not [r for r in registry.list_runs() if r.stage == "rm"]
