"""The reward-model stage end to end on a tiny model built in the test: real TRL RewardTrainer, real registry."""

import json
import random

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from align import cli
from align.config import build_config
from align.errors import AlignError
from align.registry import Registry
from reward.loss import preference_loss
from reward.model import RewardModel
from reward.score import evaluate_rm, score_dataset
from reward.train import RewardStageConfig, main, run_rm
from reward.trainer import PreferenceRewardTrainer

WORDS = "apple pear plum fig kiwi lime date lemon grape melon berry cherry olive peach mango".split()
MARKER = "banana"


def marker_rows(count: int, seed: int) -> list[dict]:
    """Chosen replies contain the marker word somewhere; rejected ones do not. Same lengths on both sides."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        length = rng.randint(3, 6)
        chosen = [rng.choice(WORDS) for _ in range(length)]
        chosen[rng.randrange(length)] = MARKER
        rejected = [rng.choice(WORDS) for _ in range(length)]
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"name some fruit like {question}"}],
                "chosen": [{"role": "assistant", "content": " ".join(chosen)}],
                "rejected": [{"role": "assistant", "content": " ".join(rejected)}],
            }
        )
    return rows


def recipe(tiny_model_dir, **values) -> dict:
    return {
        "model": str(tiny_model_dir),
        "dataset": "marker-train",
        "eval_dataset": "marker-test",
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 5e-3,
        "lora_r": 8,
        "lora_alpha": 16,
        "max_length": 64,
        "num_train_epochs": 1,
        "logging_steps": 2,
        "save_steps": 1000,
        "report_to": "none",
        "lr_scheduler_type": "linear",  # decays to 0: a constant 5e-3 diverged in its last steps on some CPUs
        "warmup_steps": 0,
        "gradient_checkpointing": False,
        "center_rewards_coefficient": 0.01,
        "train_sampling_strategy": "group_by_length",
        "seed": 0,
        "bf16": False,  # fp32 spelled out: the module-scoped fixture below is set up before conftest's fp32 default
    } | values


def config(tiny_model_dir, **values):
    return build_config(RewardStageConfig, recipe(tiny_model_dir, **values))


def new_registry(path) -> Registry:
    registry = Registry(path)
    registry.register(marker_rows(240, seed=1), name="marker-train", kind="preference")
    registry.register(marker_rows(60, seed=2), name="marker-test", kind="preference")
    return registry


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One reward model trained on the marker task, shared by the tests that only read it."""
    registry = new_registry(tmp_path_factory.mktemp("rm") / "ws")
    artifact = run_rm(config(tiny_model_dir), registry)
    return registry, artifact


def test_learns_the_marker_preference_and_reports_it(trained, tiny_model_dir):
    registry, artifact = trained
    assert artifact.ref == "rm:rm@1" and artifact.meta["max_length"] == 64
    run = registry.get_run(artifact.run_id)
    assert run.status == "completed"
    assert run.metrics["eval_accuracy"] >= 0.9, run.metrics
    assert run.metrics["eval_pairs"] == 60 and run.metrics["train_pairs"] == 240
    for name in ("report.md", "metrics.json", "reliability.png", "length_bias.png", "loss.png"):
        assert (run.dir / name).is_file(), name
    report = (run.dir / "report.md").read_text()
    assert "eval_ece" in report and "length difference" in report and "reliability" in report
    roles = {role: parent for role, parent in registry.parents(artifact)}
    assert roles["train"].ref == "marker-train@1" and roles["eval"].ref == "marker-test@1"
    assert roles["base-model"] == str(tiny_model_dir)


def test_the_saved_artifact_reloads_to_identical_scores(trained, tiny_model_dir):
    registry, artifact = trained
    saved = load_file(artifact.path / "adapter_model.safetensors")
    assert any("score" in name for name in saved), "the score head must be saved with the adapter"
    rows = registry.rows("marker-test")
    prompts, replies = [r["prompt"] for r in rows], [r["chosen"] for r in rows]
    first = RewardModel.load(artifact.ref, registry).score(prompts, replies)
    second = RewardModel.load("rm:rm@1", registry, batch_size=3).score(prompts, replies)
    assert first == second
    # and they are the scores the run's own evaluation measured
    metrics, _ = RewardModel.load(artifact.ref, registry).evaluate(rows)
    assert metrics["accuracy"] == registry.get_run(artifact.run_id).metrics["eval_accuracy"]
    # the untrained head (same base, same seed) does not know the marker
    untrained, _ = RewardModel.load(str(tiny_model_dir), registry, seed=0).evaluate(rows)
    assert untrained["accuracy"] < 0.8


def test_cli_eval_and_score(trained, capsys):
    registry, artifact = trained
    workspace = str(registry.root)
    base = artifact.base_model
    argv = ["--workspace", workspace, "rm", "eval", "--rm", f"rm:rm,{base}", "--data", "marker-test"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    [header] = [line for line in out.splitlines() if line.startswith("METRIC")]
    assert header.split() == ["METRIC", "rm:rm", base, "(untrained)"]
    assert "ece" in out and "rm:rm: accuracy 1.000 [0.940, 1.000] on 60 pairs: above chance; report" in out
    trained_eval, untrained_eval = [run for run in registry.list_runs() if run.stage == "rm-eval"]
    assert trained_eval.metrics["accuracy"] == registry.get_run(artifact.run_id).metrics["eval_accuracy"]
    assert untrained_eval.metrics["accuracy"] < 0.8 and untrained_eval.inputs == [base, "marker-test@1"]
    assert (trained_eval.dir / "reliability.png").is_file()

    # preference rows: the reward model's own labels, its scores in the meta, lineage to data and model
    assert cli.main(["--workspace", workspace, "rm", "score", "--rm", "rm:rm", "--data", "marker-test",
                     "--name", "marker-scored"]) == 0  # fmt: skip
    assert "marker-scored@1  60 rows  kind=preference  (agrees with the source's labels on" in capsys.readouterr().out
    scored = registry.resolve("marker-scored")
    rows, source = registry.rows(scored), registry.rows("marker-test")
    assert len(scored.meta["scores"]) == 60 and scored.meta["scored_by"] == "rm:rm@1"
    for row, original, (c, r) in zip(rows, source, scored.meta["scores"]):
        assert row["margin"] == pytest.approx(abs(c - r))
        assert row["chosen"] == (original["chosen"] if c >= r else original["rejected"])
    roles = {role: parent for role, parent in registry.parents(scored)}
    assert roles["scored"].ref == "marker-test@1" and roles["reward-model"].ref == "rm:rm@1"

    # candidates rows: best against worst of all completions
    candidates = [
        {"prompt": row["prompt"], "completions": [row["rejected"], row["chosen"]], "sources": ["a", "b"], "gold": 1}
        for row in source[:10]
    ]
    registry.register(candidates, name="marker-candidates", kind="candidates")
    version, agreement = score_dataset(registry, "rm:rm", "marker-candidates", "marker-candidates-scored")
    assert version.num_rows == 10 and agreement >= 0.8
    assert [len(s) for s in version.meta["scores"]] == [2] * 10


class GrabBatches(TrainerCallback):
    def __init__(self):
        self.batch = None

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.batch = next(iter(train_dataloader))


def test_weights_margins_and_ties_reach_the_loss(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "ws")
    rows = marker_rows(8, seed=3)
    for i, row in enumerate(rows):
        row["weight"], row["margin"] = 0.5 + i, 0.25 * i
    rows[0]["tie"] = True
    registry.register(rows, name="labelled", kind="preference")
    grab = GrabBatches()
    values = {
        "dataset": "labelled",
        "eval_dataset": "labelled",
        "max_steps": 1,
        "train_sampling_strategy": "sequential",
    }
    run_rm(config(tiny_model_dir, **values), registry, callbacks=[grab])
    batch = grab.batch
    assert batch["weight"].tolist() == [0.5 + i for i in range(8)]
    assert batch["margin"].tolist() == [0.25 * i for i in range(8)]
    assert batch["tie"].tolist() == [True] + [False] * 7

    # the trainer's loss is preference_loss with those labels: recompute it from the model's own scores
    rm = RewardModel.load("rm:rm", registry)
    args = config(tiny_model_dir, **values, output_dir=str(tmp_path / "out"))
    probe = datasets.Dataset.from_list([{"chosen_ids": [1, 2], "rejected_ids": [1, 3]}])
    trainer = PreferenceRewardTrainer(model=rm.model, args=args, train_dataset=probe, processing_class=rm.tokenizer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        scores = rm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    chosen, rejected = scores.chunk(2)
    expected = preference_loss(
        chosen, rejected, margin=batch["margin"], weight=batch["weight"], tie=batch["tie"], center_coefficient=0.01
    )
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert loss.item() != pytest.approx(preference_loss(chosen, rejected, center_coefficient=0.01).item(), abs=1e-4)

    # ties: drop leaves tie rows out of training and counts them
    artifact = run_rm(config(tiny_model_dir, **values, ties="drop", output_name="no-ties"), registry)
    assert registry.get_run(artifact.run_id).metrics["train_ties_dropped"] == 1


def test_long_pairs_are_truncated_not_dropped_unless_a_reply_alone_is_too_long(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "ws")
    rows = marker_rows(8, seed=4)
    for row in rows[:4]:  # long conversations: fit only with their oldest turns cut
        row["prompt"] = [
            {"role": "user", "content": "a long opening question " * 3},
            {"role": "assistant", "content": "a long answer " * 3},
            *row["prompt"],
        ]
    rows[7]["chosen"] = [{"role": "assistant", "content": "banana " * 20}]  # 140+ tokens alone
    registry.register(rows, name="long", kind="preference")
    artifact = run_rm(config(tiny_model_dir, dataset="long", eval_dataset="long", max_steps=1), registry)
    run = registry.get_run(artifact.run_id)
    assert run.metrics["train_pairs"] == 7 and run.metrics["train_dropped"] == 1
    assert run.metrics["train_truncated"] >= 4
    assert run.metrics["eval_pairs"] == 8 and run.metrics["eval_replies_cut"] == 1  # evaluation drops nothing
    assert "1 dropped because a reply alone is longer than 64 tokens" in (run.dir / "report.md").read_text()


def test_a_killed_run_resumes_from_its_checkpoint(tmp_path, tiny_model_dir, stop_after, assert_same_adapter):
    values = recipe(tiny_model_dir, max_steps=4, save_steps=2, train_sampling_strategy="random")
    straight_registry = new_registry(tmp_path / "straight")
    straight = run_rm(build_config(RewardStageConfig, values), straight_registry)

    registry = new_registry(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        run_rm(build_config(RewardStageConfig, values), registry, recipe=values, callbacks=[stop_after(2)])
    [killed] = registry.list_runs()
    assert killed.status == "failed" and (killed.dir / "checkpoints" / "checkpoint-2").is_dir()
    assert registry.list_artifacts() == []  # nothing half-done is registered

    resumed = main(None, [], workspace=str(registry.root), resume=True)
    assert resumed.run_id == killed.id and registry.get_run(killed.id).status == "completed"
    assert_same_adapter(straight, resumed)


def test_bad_inputs_fail_before_training_and_start_no_run(tmp_path, tiny_model_dir):
    registry = new_registry(tmp_path / "ws")
    registry.register([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
                      name="chat", kind="sft")  # fmt: skip
    with pytest.raises(AlignError, match="holds 'sft' rows, but preference rows are needed"):
        run_rm(config(tiny_model_dir, dataset="chat"), registry)
    with pytest.raises(AlignError, match="starts from a base model"):
        run_rm(config(tiny_model_dir, model="adapter:sft"), registry)
    with pytest.raises(AlignError, match="'peft' must be lora or ia3"):
        config(tiny_model_dir, peft="none")
    with pytest.raises(AlignError, match="'ties' must be one of"):
        config(tiny_model_dir, ties="split")
    with pytest.raises(AlignError, match="unknown config key 'lerning_rate'"):
        main(None, ["--dataset", "marker-train", "--lerning_rate", "1"], workspace=str(registry.root))
    assert registry.list_runs() == []
    with pytest.raises(AlignError, match="no artifact 'rm:missing'"):
        RewardModel.load("rm:missing", registry)


def test_lora_on_the_top_layers_only_and_a_longer_scoring_length(tmp_path, tiny_model_dir):
    from safetensors import safe_open

    registry = new_registry(tmp_path / "ws")
    values = {"lora_top_layers": 1, "max_steps": 1, "max_length": 48, "eval_max_length": 64, "output_name": "top"}
    artifact = run_rm(config(tiny_model_dir, **values), registry)
    with safe_open(artifact.path / "adapter_model.safetensors", "pt") as saved:
        names = list(saved.keys())
    lora = [name for name in names if "lora_" in name]
    assert lora and all(".layers.1." in name for name in lora), lora  # the tiny model's top layer of two
    assert any("score" in name for name in names)  # the head is saved with the adapter
    assert artifact.meta["max_length"] == 64 and artifact.meta["train_max_length"] == 48
    assert RewardModel.load(artifact.ref, registry).max_length == 64  # scoring sees what evaluation saw

    with pytest.raises(AlignError, match="'lora_top_layers' is 3, but .* has 2 layers"):
        run_rm(config(tiny_model_dir, **(values | {"lora_top_layers": 3})), registry)
    with pytest.raises(AlignError, match="'lora_top_layers' must be at least 1"):
        config(tiny_model_dir, lora_top_layers=0)


def test_cached_frozen_layers_train_the_same_model(tmp_path, tiny_model_dir, assert_same_adapter):
    """The lower layer runs once per pair; the top one trains on its cached states: same adapter, same scores."""
    values = recipe(tiny_model_dir, max_steps=6, lora_top_layers=1, train_sampling_strategy="random")
    plain_registry = new_registry(tmp_path / "plain")
    plain = run_rm(build_config(RewardStageConfig, values), plain_registry)
    registry = new_registry(tmp_path / "cached")
    cached = run_rm(build_config(RewardStageConfig, values | {"cache_frozen_layers": True}), registry)
    assert_same_adapter(plain, cached)
    saved = load_file(cached.path / "adapter_model.safetensors")
    assert any(".layers.1." in name for name in saved)  # saved under the real layer index
    metrics = registry.get_run(cached.run_id).metrics
    assert metrics["eval_accuracy"] == plain_registry.get_run(plain.run_id).metrics["eval_accuracy"]
    with pytest.raises(AlignError, match="'cache_frozen_layers' needs lora_top_layers"):
        config(tiny_model_dir, cache_frozen_layers=True)


def test_validation_during_training_is_logged_per_epoch(tmp_path, tiny_model_dir):
    registry = new_registry(tmp_path / "ws")
    values = recipe(tiny_model_dir, num_train_epochs=2, eval_strategy="epoch", lora_top_layers=1)
    artifact = run_rm(build_config(RewardStageConfig, values | {"cache_frozen_layers": True}), registry)
    live = [json.loads(line) for line in (registry.get_run(artifact.run_id).dir / "live.jsonl").open()]
    assert [round(entry["epoch"]) for entry in live if "eval_accuracy" in entry] == [1, 2]


def test_the_stage_and_rm_eval_agree_under_bf16_autocast(tmp_path, tiny_model_dir, capsys):
    """The pipeline printed one accuracy and `align rm eval` another for the same model and pairs: the stage
    scored the trainer's model (under its bf16 autocast wrapper, batches of 16), rm eval the saved one."""
    registry = new_registry(tmp_path / "ws")
    artifact = run_rm(config(tiny_model_dir, max_steps=3, bf16=True, per_device_eval_batch_size=16), registry)
    stage = registry.get_run(artifact.run_id).metrics
    _, evaluated = evaluate_rm(registry, artifact.ref, "marker-test")
    assert evaluated["accuracy"] == stage["eval_accuracy"]
    assert evaluated["mean_margin"] == stage["eval_mean_margin"]


def test_a_middle_layer_and_reply_mean_pooling_train_and_reload_alike(tmp_path, tiny_model_dir):
    """num_layers: 1 keeps the tiny model's bottom layer; the head reads the mean of the reply's tokens. Every
    scorer of the artifact reads it the way it was trained."""
    plain_registry = new_registry(tmp_path / "ws")
    plain = run_rm(config(tiny_model_dir, num_layers=1, pooling="reply_mean"), plain_registry)
    assert plain.meta["num_layers"] == 1 and plain.meta["pooling"] == "reply_mean"
    metrics = plain_registry.get_run(plain.run_id).metrics
    assert metrics["eval_accuracy"] >= 0.9, metrics  # the marker sits anywhere in the reply: the mean finds it

    rm = RewardModel.load(plain.ref, plain_registry)
    assert rm.pooling == "reply_mean" and len(rm.model.get_base_model().model.layers) == 1
    reloaded, _ = rm.evaluate(plain_registry.rows("marker-test"))
    assert reloaded["accuracy"] == metrics["eval_accuracy"]
    assert reloaded["mean_margin"] == pytest.approx(metrics["eval_mean_margin"], abs=1e-6)
    with pytest.raises(AlignError, match="needs reply_starts"):
        rm.score_ids([[1, 2, 3]])
    with pytest.raises(AlignError, match="'pooling' must be one of last, reply_mean"):
        config(tiny_model_dir, pooling="mean")
    with pytest.raises(AlignError, match="'lora_top_layers' \\(2\\) must not exceed num_layers \\(1\\)"):
        config(tiny_model_dir, num_layers=1, lora_top_layers=2)


def test_reply_mean_with_cached_frozen_layers_trains_the_same_model(tmp_path, tiny_model_dir, assert_same_adapter):
    values = recipe(tiny_model_dir, max_steps=6, lora_top_layers=1, pooling="reply_mean")
    values["train_sampling_strategy"] = "random"
    plain = run_rm(build_config(RewardStageConfig, values), new_registry(tmp_path / "plain"))
    cached = run_rm(
        build_config(RewardStageConfig, values | {"cache_frozen_layers": True}), new_registry(tmp_path / "cached")
    )
    assert_same_adapter(plain, cached)
