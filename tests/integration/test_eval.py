"""`align eval` on tiny models: the report with its plots and numbers, the registered generations, a killed run
resumed, and the refusals that come before any model loads."""

import json

import numpy as np
import pytest

from align.cli import main
from align.errors import AlignError
from align.eval_metrics import win_outcomes
from align.evaluate import EvalOptions, run_eval
from align.registry import Registry
from align.sampling import SamplingSettings

PROMPTS = [
    {"prompt": [{"role": "user", "content": f"what is {i} plus {i}?"}], "reference": f"{i} plus {i} is {2 * i}."}
    for i in range(6)
]


@pytest.fixture
def registry(tmp_path, tiny_model_dir):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    registry = Registry(tmp_path / "ws")
    registry.register(PROMPTS, name="qs", kind="prompts")
    registry.register([{"prompt": row["prompt"]} for row in PROMPTS], name="bare", kind="prompts")
    torch.manual_seed(0)
    tuned = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    tuned.save_pretrained(tmp_path / "adapter")
    registry.register_artifact("adapter", "tuned", tmp_path / "adapter", base_model=str(tiny_model_dir))
    yield registry
    registry.close()


def test_eval_writes_the_report_with_its_plots_and_numbers(registry, tiny_model_dir, capsys):
    tiny = str(tiny_model_dir)
    code = main(
        ["--workspace", str(registry.root), "eval", "--models", f"{tiny},adapter:tuned", "--prompts", "qs",
         "--rm", tiny, "--references", "--kl-reference", tiny, "--few-shot", "2", "--bootstrap", "100",
         "--max-new-tokens", "8", "--temperature", "1.0", "--seed", "3", "--batch-size", "4"]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    [run] = registry.list_runs()
    assert (run.stage, run.status) == ("eval", "completed")
    assert run.outputs == ["eval-qs@1"]
    for plot in ("rewards.png", "win_rates.png", "lengths.png"):
        assert (run.dir / plot).read_bytes()[:4] == b"\x89PNG", plot

    few = f"{tiny} (2-shot)"
    names = [tiny, "adapter:tuned@1", few]
    version = registry.resolve("eval-qs")
    assert (version.kind, version.num_rows) == ("candidates", 6)
    rows = registry.rows(version)
    assert all(row["sources"] == names and len(row["completions"]) == 3 for row in rows)
    assert [row["prompt"] for row in rows] == [row["prompt"] for row in PROMPTS]  # the question, not the examples
    roles = {
        (role, getattr(parent, "ref", parent)) for role, parent in registry.parents(version) if role != "produced-by"
    }
    assert roles == {("prompts", "qs@1"), ("model", tiny), ("model", "adapter:tuned@1"), ("reward-model", tiny)}

    metrics = json.loads((run.dir / "metrics.json").read_text())
    assert metrics == run.metrics | {}  # the same numbers in the registry and in the run folder
    assert list(metrics["rows"]) == names and metrics["baseline"] == tiny
    rewards = np.array(version.meta["rewards"])  # [prompt][row], as scored
    for index, name in enumerate(names):
        entry = metrics["rows"][name]
        assert entry["reward"]["value"] == pytest.approx(rewards[:, index].mean())
        assert entry["reward"]["low"] <= entry["reward"]["value"] <= entry["reward"]["high"]
        replies = [row["completions"][index][0]["content"] for row in rows]
        assert entry["length_chars"]["value"] == pytest.approx(np.mean([len(r) for r in replies]))
        if name == tiny:
            assert "win_rate" not in entry  # the baseline is not compared with itself
            continue
        expected = win_outcomes(rewards[:, index], rewards[:, 0]).mean()
        assert entry["win_rate"]["value"] == pytest.approx(expected)
        assert 0 <= entry["lc_win_rate"]["value"] <= 1
    # KL to the base: exactly 0 for the base itself and its few-shot row (the same weights), not for the adapter.
    assert metrics["rows"][tiny]["kl"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert metrics["rows"][few]["kl"]["value"] == 0.0
    assert metrics["rows"]["adapter:tuned@1"]["kl"]["value"] != 0.0
    found = metrics["rows"]["adapter:tuned@1"]["references"]
    assert 0 <= found["rougeL"]["value"] <= 1 and 0 <= found["bleu"]["value"] <= 100
    assert "value" in found["meteor"] or found["meteor"]["error"].startswith("METEOR unavailable")
    assert metrics["few_shot"] == {"k": 2, "model": tiny, "from": "qs@1 (own)"}

    report = (run.dir / "report.md").read_text()
    win = metrics["rows"]["adapter:tuned@1"]["win_rate"]
    assert f"{win['value']:.3f} [{win['low']:.3f}, {win['high']:.3f}]" in report
    assert f"| `{tiny}` (baseline) |" in report and f"| `{few}` |" in report
    for plot in ("rewards.png", "win_rates.png", "lengths.png"):
        assert f"({plot})" in report
    assert "LC win rate" in report and "ROUGE-L" in report and f"KL to {tiny}" in report


def test_a_killed_eval_resumes_without_redoing_finished_rows(registry, tiny_model_dir, monkeypatch):
    import align.evaluate

    tiny = str(tiny_model_dir)
    options = EvalOptions(
        models=[tiny, "adapter:tuned"],
        prompts="bare",
        limit=4,
        bootstrap=50,
        sampling=SamplingSettings(max_new_tokens=6, temperature=1.0, seed=5, batch_size=4),
    )
    real = align.evaluate.sample
    calls = []

    def killed_on_the_second_model(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if killed mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(align.evaluate, "sample", killed_on_the_second_model)
    with pytest.raises(KeyboardInterrupt):
        run_eval(registry, options)
    [run] = registry.list_runs()
    assert run.status == "failed" and (run.dir / "generations" / "00.json").is_file()
    assert all(version.name != "eval-bare" for version in registry.list_datasets())  # nothing half-done

    calls.clear()
    monkeypatch.setattr(align.evaluate, "sample", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    result = run_eval(registry, resume=True)
    assert len(calls) == 1  # only the row the killed run had not finished
    assert result.run.id == run.id and result.run.status == "completed"
    # The same replies as an uninterrupted run: the same content, so the very same registered version.
    again = run_eval(registry, options)
    assert again.version == result.version and again.version.ref == "eval-bare@1"
    assert "reward" not in again.metrics["rows"][tiny]  # no --rm: no rewards, no win rates
    assert (again.run.dir / "lengths.png").is_file() and not (again.run.dir / "rewards.png").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"models": ["TINY"]}, "at least two rows"),
        ({"models": ["TINY", "TINY"]}, "listed twice"),
        ({"prompts": "bare", "references": True}, "carry no reference answers"),
        ({"baseline": "adapter:other"}, "no artifact 'adapter:other'"),
        ({"baseline": "TINY/"}, "is none of the rows"),
        ({"prompts": "bare", "few_shot": 2}, "lacks some: give --few-shot-from"),
        ({"few_shot_from": "qs"}, "need --few-shot K"),
        ({"rm": "adapter:tuned"}, "is a policy adapter"),
        ({"name": "bad/name"}, "invalid dataset name"),
        ({"prompts": "nope"}, "no dataset 'nope'"),
        ({"best_of": 4}, "reranks N >= 2 samples with --rm"),
        ({"best_of": 1, "rm": "TINY"}, "reranks N >= 2 samples"),
        ({"best_of": 2, "rm": "TINY", "best_of_temperature": 0.0}, "--best-of-temperature must be above 0"),
    ],
)
def test_refusals_before_any_model_loads(registry, tiny_model_dir, change, message):
    values = {"models": ["TINY", "adapter:tuned"], "prompts": "qs"} | change
    values["models"] = [str(tiny_model_dir) if m == "TINY" else m for m in values["models"]]
    if values.get("rm") == "TINY":
        values["rm"] = str(tiny_model_dir)
    if values.get("baseline", "").startswith("TINY"):
        values["baseline"] = values["baseline"].replace("TINY", str(tiny_model_dir))
    with pytest.raises(AlignError, match=message):
        run_eval(registry, EvalOptions(**values))
    assert registry.list_runs() == []


def test_best_of_n_keeps_the_reward_models_best_sample_per_prompt(registry, tiny_model_dir):
    """The best-of-4 row: the baseline's model samples 4 replies per prompt; the reward model's best is kept, so
    its mean reward is at least that of a plain sample, prompt by prompt, under the same judge."""
    tiny = str(tiny_model_dir)
    settings = SamplingSettings(max_new_tokens=6, temperature=1.0, seed=1, batch_size=6)
    options = EvalOptions(
        models=[tiny, "adapter:tuned"], prompts="bare", rm=tiny, best_of=4, bootstrap=50, sampling=settings
    )
    result = run_eval(registry, options)
    name = f"{tiny} best-of-4"
    assert list(result.metrics["rows"]) == [tiny, "adapter:tuned@1", name]
    saved = json.loads((result.run.dir / "generations" / "02.json").read_text())
    rewards = np.array(result.version.meta["rewards"])  # [prompt][row]
    for index, (samples, scores) in enumerate(zip(saved["samples"], saved["sample_scores"])):
        assert len(samples) == 4 and len(set(samples)) > 1  # sampled, not greedy
        best = int(np.argmax(scores))
        assert saved["replies"][index] == samples[best]
        assert rewards[index, 2] == pytest.approx(max(scores), abs=1e-5)  # the judge is the reranker
    assert result.metrics["rows"][name]["win_rate"]["value"] >= 0.5  # the max of 4 draws vs one draw
    assert "samples per prompt at temperature 0.8" in (result.run.dir / "report.md").read_text()
