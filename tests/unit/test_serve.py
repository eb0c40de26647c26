"""`align serve` without a browser: who may come in, which models are served, the lineage walk, live metrics."""

import pytest

from align.errors import AlignError
from align.labels import add_annotator
from align.registry import Registry
from align.runs import append_live, read_live
from ui.serve_app import create_app, default_models, lineage, lineage_markdown
from ui.serving import check_exposure, is_loopback


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}


def test_loopback_hosts():
    for host in ("127.0.0.1", "127.0.0.7", "::1", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.4", "example.org"):
        assert not is_loopback(host), host


def test_exposure_takes_the_flag_and_login(tmp_path):
    assert check_exposure("127.0.0.1", False, 0, tmp_path) is False  # loopback, nobody registered: one local user
    assert check_exposure("127.0.0.1", False, 2, tmp_path) is True  # annotators exist: login
    assert check_exposure("0.0.0.0", True, 1, tmp_path) is True
    with pytest.raises(AlignError, match="--host 0.0.0.0 would make the app reachable.*add --expose"):
        check_exposure("0.0.0.0", False, 1, tmp_path)
    with pytest.raises(AlignError, match="--expose needs login.*align annotators add"):
        check_exposure("0.0.0.0", True, 0, tmp_path)


def test_create_app_checks_before_serving(tmp_path):
    registry = Registry(tmp_path / "ws")
    registry.register([conversation(0)], name="sft-data", kind="sft")
    with pytest.raises(AlignError, match="--expose"):
        create_app(registry, host="10.0.0.1", models=[])
    with pytest.raises(AlignError, match="sft-data@1 holds 'sft' rows, but candidates rows are needed"):
        create_app(registry, models=[], candidates="sft-data")
    _, served = create_app(registry, models=[])
    assert served == {"login": False, "models": [], "candidates": [], "first": None}
    add_annotator(registry, "alice", "pw", admin=True)
    _, served = create_app(registry, models=[])
    assert served["login"] is True


def test_default_models_are_the_bases_then_the_newest_adapters(tmp_path):
    registry = Registry(tmp_path / "ws")
    folder = tmp_path / "weights"
    folder.mkdir()
    registry.register_artifact("adapter", "sft", folder, base_model="smollm2-135m")
    registry.register_artifact("adapter", "sft", folder, base_model="smollm2-135m")
    registry.register_artifact("rm", "rm", folder, base_model="smollm2-135m")  # scores, does not chat
    registry.register_artifact("adapter", "dpo", folder, base_model="smollm2-135m")
    assert default_models(registry) == ["smollm2-135m", "adapter:sft@2", "adapter:dpo@1"]


def test_lineage_walks_up_to_the_import_and_down_to_the_adapter(tmp_path):
    registry = Registry(tmp_path / "ws")
    source = registry.register([conversation(i) for i in range(10)], name="d", kind="sft")
    train, test = registry.split(source.ref, test_size=0.2, seed=0)
    run = registry.start_run("sft", inputs=[train.ref])
    folder = tmp_path / "adapter"
    folder.mkdir()
    adapter = registry.register_artifact("adapter", "sft", folder, base_model="tiny", run=run, parents=[train])
    registry.finish_run(run, outputs=[adapter.ref])

    nodes, edges = lineage(registry, train)
    assert (source.node, train.node) in {(parent, child) for parent, child, _ in edges}
    assert (train.node, adapter.node) in {(parent, child) for parent, child, _ in edges}
    assert test.node not in nodes  # a sibling is neither an ancestor nor a descendant
    text = lineage_markdown(nodes, edges, train.node)
    assert "d@1 (sft, 10 rows)" in text and "adapter:sft@1" in text

    nodes, edges = lineage(registry, source)
    assert adapter.node in nodes  # descendants, two links down
    nodes, edges = lineage(registry, adapter)
    assert source.node in nodes and nodes["base:tiny"] == "base model tiny"
    assert nodes[run.node] == f"run {run.id} (sft)"


def test_live_metrics_lines(tmp_path):
    append_live(tmp_path, 1, {"loss": 0.5, "note": "text", "flag": True, "nan": float("nan")})
    append_live(tmp_path, 2, {"loss": 0.25, "learning_rate": 1e-4})
    append_live(tmp_path, 3, {"note": "nothing numeric"})  # nothing to write
    with open(tmp_path / "live.jsonl", "a") as out:
        out.write('{"step": 4, "loss"')  # a line being written when it is read
    assert read_live(tmp_path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25, "learning_rate": 1e-4}]
