"""benchmarks/bench.py's pieces: the FLOP formula (checked by hand), the results files, the README table, and a
failing row that does not stop the others."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402
import bench_report  # noqa: E402
from bench_report import figure  # noqa: E402
from bench_rows import latest_rm_accuracy  # noqa: E402
from flops import FlopCounter, LayerCost, ModelCost, attended_pairs, bf16_native, machine_slug, model_cost  # noqa: E402

# The FLOP formula


def test_flops_of_lora_on_the_top_layer_by_hand():
    # Two layers of 100 frozen linear weights, the top one with 10 LoRA weights; query width 4; an LM head of 50.
    cost = ModelCost((LayerCost(100, 0, 0), LayerCost(100, 0, 10)), attention_width=4, head=50)
    # 3 tokens, causal: 1 + 2 + 3 = 6 attended pairs per layer; the head on 2 rows.
    # forward: 2*3*100 + 2*3*110 (matmuls) + 4*4*6 * 2 layers (attention) + 2*2*50 (head) = 600 + 660 + 192 + 200
    assert cost.forward(3, 6, 2) == 1652
    # backward, only from layer 1 up: inputs 2*3*110 + adapter weights 2*3*10 + attention 8*4*6, then the head's
    # input gradient 2*2*50 (its weights are frozen): 660 + 60 + 192 + 200. Layer 0 gets no backward at all.
    assert cost.backward(3, 6, 2) == 1112


def test_full_fine_tuning_is_six_flops_per_weight_and_token():
    cost = ModelCost((LayerCost(0, 1000, 0),), attention_width=8, head=0)
    assert cost.forward(5, 0) + cost.backward(5, 0) == 6 * 1000 * 5


def test_nothing_trained_but_the_head():
    cost = ModelCost((LayerCost(100, 0, 0),), attention_width=4, head=7, head_trained=True)
    assert cost.backward(3, 6, 2) == 2 * 2 * 7  # the head's weight gradient only: no gradient flows into the layers


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def test_model_cost_reads_lora_weights_off_the_model():
    import peft

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules="all-linear"))
    cost = model_cost(model)
    # q, k, v, o: 32x32 each; gate, up: 32x64; down: 64x32 -> 4*1024 + 3*2048 = 10,240 frozen weights per layer.
    # LoRA r4: r*(in+out) per matmul: 4 * 4*(32+32) + 3 * 4*(32+64) = 1,024 + 1,152 = 2,176.
    assert cost.layers == (LayerCost(10240, 0, 2176), LayerCost(10240, 0, 2176))
    assert cost.attention_width == 32 and cost.head == 100 * 32 and not cost.head_trained


def test_the_counter_counts_the_formula_for_a_padded_training_step():
    import peft

    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules="all-linear"))
    counter = FlopCounter(model)
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    assert counter.take() == 0  # not active: nothing counted
    counter.active = True
    model(input_ids=ids, attention_mask=mask).logits.sum().backward()
    # 8 real tokens, 6 + 15 attended pairs; the head counted on 8 rows (the real tokens), not the 10 positions.
    cost = model_cost(model)
    assert counter.take() == cost.forward(8, 21, 8) + cost.backward(8, 21, 8)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert counter.take() == cost.forward(8, 21, 8)  # no gradients: the forward pass only


def test_attended_pairs_of_the_shared_prompt_mask():
    from align.dpo_trainer import _shared_prompt_mask

    # prompt 2, chosen 2, rejected 1 tokens, padded to 7: rows attend 1, 2, 3, 4 and 3 positions (the rejected
    # reply skips the chosen one); the two padding rows (themselves only) are not counted.
    example = {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]}
    mask = _shared_prompt_mask(example, 7)[None, None]
    assert attended_pairs(mask, (1, 7)) == (5, 13)
    additive = torch.zeros(mask.shape).masked_fill(~mask, -1e9)  # eager attention's form of the same mask
    assert attended_pairs(additive, (1, 7)) == (5, 13)
    assert attended_pairs(None, (2, 4)) == (8, 20)


# The machine


@pytest.mark.parametrize(
    "model, slug",
    [
        ("AMD EPYC", "amd-epyc"),
        ("AMD EPYC 7763 64-Core Processor", "amd-epyc-7763"),
        ("Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", "intel-xeon-platinum-8480"),
    ],
)
def test_machine_slug(model, slug):
    assert machine_slug(model) == slug


def test_bf16_is_native_only_with_amx_or_avx512_bf16():
    assert not bf16_native({"avx2", "fma", "avx512f"})
    assert bf16_native({"avx2", "amx_bf16", "amx_tile"}) and bf16_native({"avx512_bf16"})


# Figures, files and the README table


def test_figure_ratio_and_targets():
    speed = figure("pairs/s", 1.5, 0.6, peer_name="TRL", target="ratio >= 2.5")
    assert speed["ratio"] == pytest.approx(2.5) and speed["met"] is True
    assert figure("s/update", 30.0, 40.0, target="ratio <= 0.5")["met"] is False
    assert figure("import", 12.0, unit="s", target="ours < 15")["met"] is True
    assert figure("load", 2.0, unit="s", target="ours < 2")["met"] is False
    no_peer = figure("s/update", 30.0, None, target="ratio <= 0.5")
    assert no_peer["ratio"] is None and no_peer["met"] is None  # unknown, not "not met"
    with pytest.raises(ValueError, match="ratio >= 2.5"):
        figure("x", 1.0, target="at least twice")


def sample_results(date="2026-12-01", quick=False) -> dict:
    return {
        "date": date,
        "machine": "amd-epyc",
        "cpu": "AMD EPYC",
        "quick": quick,
        "environment": {"commit": "abc1234", "cpus": 2, "threads": 2, "finished": f"{date}T10:00:00+00:00"},
        "rows": {
            "dpo": {
                "title": "DPO",
                "status": "ok",
                "seconds": 200.0,
                "tried": "the prompt run once",
                "figures": [
                    figure("pairs/s", 1.2, 0.6, peer_name="TRL DPOTrainer", target="ratio >= 2.5"),
                    figure("peak RSS", 1.9, 2.4, unit="GB", peer_name="TRL DPOTrainer"),
                ],
                "notes": ["48 pairs"],
            },
            "registry": {
                "title": "Registry import and load",
                "status": "ok",
                "seconds": 20.0,
                "figures": [figure("import 100,000 pairs", 11.0, unit="s", target="ours < 15")],
                "notes": [],
            },
            "ppo": {"title": "PPO", "status": "failed", "seconds": 3.0, "error": "Traceback ...\nOSError: no disk"},
        },
    }


def test_results_files(tmp_path):
    md = bench_report.write_results(sample_results(), tmp_path / "2026-12-01-amd-epyc.json")
    data = json.loads((tmp_path / "2026-12-01-amd-epyc.json").read_text())
    assert data["rows"]["dpo"]["figures"][0]["ratio"] == pytest.approx(2.0)
    assert data["rows"]["dpo"]["figures"][0]["peer"] == 0.6 and data["rows"]["dpo"]["figures"][0]["met"] is False
    text = md.read_text()
    assert md.name == "2026-12-01-amd-epyc.md"
    assert "| DPO | pairs/s | 1.20 | 0.600 (TRL DPOTrainer) | 2.00x | ≥ 2.5x peer | **not met** |" in text
    assert "| Registry import and load | import 100,000 pairs, s | 11.0 | - | - | < 15 s | met |" in text
    assert "OSError: no disk" in text  # the failed row, with its error
    assert "what was tried: the prompt run once" in text  # a missed target says what was tried
    assert "QUICK" not in text
    quick = bench_report.write_results(sample_results(quick=True), tmp_path / "quick.json")
    assert "QUICK" in quick.read_text().splitlines()[0]


def test_readme_block_from_the_latest_full_results(tmp_path):
    results = tmp_path / "results"
    bench_report.write_results(sample_results("2026-11-30"), results / "2026-11-30-amd-epyc.json")
    bench_report.write_results(sample_results("2026-12-01"), results / "2026-12-01-amd-epyc.json")
    bench_report.write_results(sample_results("2026-12-02", quick=True), results / "2026-12-02-amd-epyc-quick.json")
    (results / "notes.json").write_text("[1, 2]")  # not a results file
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# x\n\n## Performance\n\n{bench_report.README_START}\nold\n{bench_report.README_END}\n\n## Next\n"
    )
    assert bench.write_readme(results, readme) == results / "2026-12-01-amd-epyc.json"
    text = readme.read_text()
    assert text.startswith("# x\n\n## Performance\n\n<!-- bench:start") and text.endswith(
        "<!-- bench:end -->\n\n## Next\n"
    )
    assert "old" not in text and "Measured 2026-12-01 on AMD EPYC (2 CPUs, torch threads 2)" in text
    assert "| DPO | pairs/s | 1.20 | 0.600 (TRL DPOTrainer) | 2.00x | ≥ 2.5x peer | **not met** |" in text
    assert "| PPO | **failed**: OSError: no disk |" in text
    with pytest.raises(ValueError, match="no block"):
        bench_report.replace_block("# no markers\n", "x")


def test_the_readme_has_the_block():
    text = (ROOT / "README.md").read_text()
    assert text.count(bench_report.README_START) == 1 and text.count(bench_report.README_END) == 1


# The run: a failing row is recorded and the others still run; --resume skips what is done


def test_a_failing_row_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    calls = []

    def broken(ctx):
        calls.append("broken")
        raise RuntimeError("the peer would not start")

    def fine(ctx):
        calls.append("fine")
        return {"figures": [figure("votes/s", 55.0, target="ours >= 50")], "notes": ["n"]}

    def gives_up(ctx):
        calls.append("gives_up")
        raise SystemExit("only 3 pairs fit")

    rows = [bench.Row("broken", "Broken", broken), bench.Row("fine", "Fine", fine), bench.Row("up", "Up", gives_up)]
    monkeypatch.setattr(bench, "ROWS", rows)
    assert bench.main(["--out", str(tmp_path)]) == 1
    [path] = tmp_path.glob("*.json")
    data = json.loads(path.read_text())
    assert data["quick"] is False and path.name.startswith(data["date"])
    assert (
        data["rows"]["broken"]["status"] == "failed" and "the peer would not start" in data["rows"]["broken"]["error"]
    )
    assert data["rows"]["fine"]["status"] == "ok" and data["rows"]["fine"]["figures"][0]["met"] is True
    assert data["rows"]["up"]["status"] == "failed" and "only 3 pairs fit" in data["rows"]["up"]["error"]
    out = capsys.readouterr().out
    assert "[1/3] broken: FAILED" in out and "[2/3] fine: ok" in out and "failed: broken, up" in out
    assert calls == ["broken", "fine", "gives_up"]

    calls.clear()
    assert bench.main(["--out", str(tmp_path), "--resume"]) == 1
    assert calls == ["broken", "gives_up"]  # the ok row is kept, the failed ones run again
    assert "[2/3] fine: kept from this file" in capsys.readouterr().out
    assert json.loads(path.read_text())["rows"]["fine"]["figures"][0]["ours"] == 55.0


def test_resume_goes_on_with_an_earlier_days_file(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(bench, "ROWS", [bench.Row("a", "A", lambda ctx: calls.append("a") or {"figures": []})])
    machine = bench.machine_slug(bench.cpu_model())
    earlier = tmp_path / f"2026-01-31-{machine}.json"
    earlier.write_text(
        json.dumps(
            {
                "date": "2026-01-31",
                "machine": machine,
                "cpu": "x",
                "quick": False,
                "rows": {},
                "environment": {"command": "python benchmarks/bench.py"},
            }
        )
    )
    assert bench.main(["--out", str(tmp_path), "--resume", "--date", "2026-01-31"]) == 0
    assert calls == ["a"] and [p.name for p in tmp_path.glob("*.json")] == [earlier.name]
    data = json.loads(earlier.read_text())
    assert data["rows"]["a"]["status"] == "ok" and data["environment"]["resumed"][0]["command"].endswith("2026-01-31")
    assert "Resumed with `python benchmarks/bench.py --out" in earlier.with_suffix(".md").read_text()
    for argv, message in [
        (["--date", "2026-01-31"], "--date goes with --resume"),
        (["--resume", "--date", "2026-02-01"], "no results file of that day"),
    ]:
        with pytest.raises(SystemExit):
            bench.main(["--out", str(tmp_path), *argv])
        assert message in capsys.readouterr().err


def test_unknown_row_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--rows", "gemm,nonsense"])
    assert "unknown row nonsense" in capsys.readouterr().err


def test_rm_accuracy_from_the_newest_log_that_holds_it(tmp_path):
    (tmp_path / "2026-11-29-rm-amd-epyc.txt").write_text(
        "ours: {'acc_fit': 0.5, 'acc_all': 0.55, 'all_pairs': 160}\nTRL floor: {'acc_fit': 0.5, 'acc_all': 0.563}\n"
    )
    (tmp_path / "2026-12-01-rm-amd-epyc.txt").write_text(
        "ours: {'acc_fit': 0.68, 'acc_all': 0.644, 'all_pairs': 160} (2875 s with evaluation)\n"
    )
    (tmp_path / "2026-12-02-rm-learning-curve.txt").write_text("ours: {'acc_all': 0.9}\n")  # not the headline run
    found = latest_rm_accuracy(tmp_path)
    assert found["ours"] == 0.644 and found["source"] == "benchmarks/results/2026-12-01-rm-amd-epyc.txt"
    assert found["floor"] == 0.563 and found["floor_source"].endswith("2026-11-29-rm-amd-epyc.txt")
    assert latest_rm_accuracy(tmp_path / "none")["ours"] is None
