"""`align label` and `align serve` with --order and --rm: bad input refused in one line with exit status 2 before
anything is served; a tiny reward model orders the items of the running app (the JSON API serves its least sure
item first), and its scores, kept in the workspace, are read back on the next start."""

import sys
import threading
from pathlib import Path

import httpx
import pytest

from align.cli import main
from align.label_order import open_scorer
from align.labels import OPEN_USER
from align.registry import Registry
from reward.model import RewardModel
from ui.label_app import LabelDesk, create_app
from ui.serving import BackgroundServer, free_port


def candidate_rows(count: int) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "completions": [[{"role": "assistant", "content": f"answer {i}.{j}" * (j + 1)}] for j in range(2)],
            "sources": ["model-0", "model-1"],
        }
        for i in range(count)
    ]


def save_rm(folder: Path, base: Path, *, hidden_size: int | None = None, chat_template: bool = True) -> Path:
    """A reward model as `align rm` saves it: a SEQ_CLS LoRA with its score head (and here its tokenizer). With
    `hidden_size`, the adapter is made for another base than the one it is registered on."""
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(3)
    config = AutoConfig.from_pretrained(base, num_labels=1)
    if hidden_size:
        config.hidden_size, config.intermediate_size = hidden_size, hidden_size * 2
    model = AutoModelForSequenceClassification.from_config(config)
    lora = peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules="all-linear", init_lora_weights=False, modules_to_save=["score"]
    )
    peft.get_peft_model(model, lora).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def workspace(tmp_path, tiny_model_dir):
    registry = Registry(tmp_path / "ws")
    registry.register(candidate_rows(8), name="cands", kind="candidates")
    folder = save_rm(tmp_path / "rm", tiny_model_dir)
    registry.register_artifact("rm", "tiny-rm", folder, base_model=str(tiny_model_dir))
    yield registry
    registry.close()


def run_cli(workspace: Registry, *args: str, capsys) -> tuple[int, str, str]:
    code = main([*args, "--workspace", str(workspace.root)])
    out, err = capsys.readouterr()
    return code, out, err


def wait_for_scoring() -> None:
    for thread in threading.enumerate():
        if thread.name.startswith("label-order-"):
            thread.join(60)


def least_sure(workspace: Registry) -> int:
    """The item the tiny reward model is least sure of, worked out here from its scores."""
    rm = RewardModel.load("rm:tiny-rm", workspace)
    gaps = []
    for row in workspace.rows("cands"):
        a, b = rm.score([row["prompt"]] * 2, row["completions"])
        gaps.append(abs(a - b))
    return min(range(len(gaps)), key=lambda i: (gaps[i], i))


def test_bad_orders_and_reward_models_are_refused_in_one_line(workspace, tmp_path, tiny_model_dir, capsys, monkeypatch):
    import ui.serving

    monkeypatch.setattr(ui.serving, "serve", lambda app, host, port: pytest.fail("served despite bad input"))
    hollow = tmp_path / "hollow"
    hollow.mkdir()
    workspace.register_artifact("rm", "hollow", hollow, base_model=str(tiny_model_dir))
    workspace.register_artifact(
        "rm", "wider", save_rm(tmp_path / "wider", tiny_model_dir, hidden_size=48), base_model=str(tiny_model_dir)
    )
    workspace.register_artifact(
        "rm", "plain", save_rm(tmp_path / "plain", tiny_model_dir, chat_template=False), base_model=str(tiny_model_dir)
    )
    port = str(free_port())
    label = ["label", "--candidates", "cands", "--open", "--port", port]
    serve = ["serve", "--port", port]  # no adapters registered: no models to compare, none loaded
    cases = [
        (["--order", "uncertainty"], "--order uncertainty serves first the items a reward model is least sure of"),
        (["--order", "random", "--rm", "rm:tiny-rm"], "--rm orders the items by the reward model's uncertainty"),
        (["--order", "uncertainty", "--rm", "rm:nowhere"], "--rm rm:nowhere: no artifact 'rm:nowhere' in the registry"),
        (["--order", "uncertainty", "--rm", "adapter:sft"], "--rm adapter:sft is not a reward model"),
        (["--order", "uncertainty", "--rm", "rm:hollow"], "--rm rm:hollow@1 cannot be loaded: "),
        (
            ["--order", "uncertainty", "--rm", "rm:wider"],
            "--rm rm:wider@1 cannot be loaded: Error(s) in loading "
            "state_dict for PeftModelForSequenceClassification: size mismatch for ",
        ),  # made for another base
        (["--order", "uncertainty", "--rm", "rm:plain"], "--rm rm:plain@1 cannot score the replies of cands@1: "),
        (["--order", "uncertainty", "--rm", "rm:tiny-rm", "--mode", "thumbs"], "a thumbs item is one reply alone"),
    ]
    for command in (label, serve):
        for flags, message in cases:
            code, _, err = run_cli(workspace, *command, *flags, capsys=capsys)
            errors = [line for line in err.splitlines() if line.startswith("error: ")]  # (after loading bars)
            assert code == 2 and len(errors) == 1 and err.strip().endswith(errors[0]), (command[0], flags, err)
            assert message in errors[0] and "Traceback" not in err, (command[0], flags, err)
    code, _, err = run_cli(workspace, *serve, "--rubric", "honesty,honesty", capsys=capsys)
    assert code == 2 and "--rubric names an attribute twice" in err
    assert not (workspace.root / "label-scores").exists()  # nothing was scored


def test_the_cli_orders_by_the_reward_model_and_keeps_its_scores(workspace, capsys, monkeypatch):
    import ui.serving

    served = []
    monkeypatch.setattr(ui.serving, "serve", lambda app, host, port: served.append(port))
    flags = ["--order", "uncertainty", "--rm", "rm:tiny-rm", "--port", str(free_port())]
    code, out, _ = run_cli(workspace, "label", "--candidates", "cands", "--open", *flags, capsys=capsys)
    assert code == 0 and served
    assert "order: uncertainty (rm:tiny-rm@1" in out
    wait_for_scoring()
    kept = list((workspace.root / "label-scores").glob("cands@1-*--rm-tiny-rm@1-*.json"))
    assert len(kept) == 1
    # The next start reads the kept scores: the order is in force from the first item.
    code, out, _ = run_cli(workspace, "label", "--candidates", "cands", "--open", *flags, capsys=capsys)
    assert code == 0 and "order: uncertainty (rm:tiny-rm@1: least sure first)" in out
    # align serve takes the same flags, and --rubric, for its Label tab.
    code, out, _ = run_cli(workspace, "serve", "--rubric", "honesty", *flags, capsys=capsys)
    assert code == 0 and "label order: uncertainty by rm:tiny-rm" in out
    code, out, _ = run_cli(workspace, "label", "--candidates", "cands", "--open", "--order", "random", capsys=capsys)
    assert code == 0 and "order: random" in out


def test_the_running_app_serves_the_least_sure_item_first(workspace):
    expected = least_sure(workspace)
    scorer = open_scorer(workspace, "rm:tiny-rm")
    desk = LabelDesk(workspace, "cands", overlap=1, open_access=True, order="uncertainty", scorer=scorer)
    desk.store.scoring.join(60)
    with BackgroundServer(create_app(desk)) as url, httpx.Client(base_url=url) as client:
        first = client.get("/label-api/item").json()
        assert first["item"] == expected
        voted = client.post("/label-api/vote", json={"lease": first["lease"], "choice": "A"}).json()
        assert voted["next"]["item"] != expected
        undone = client.post("/label-api/undo").json()  # undo gives the same item back
        assert undone["undone"]["item"] == expected and undone["next"]["item"] == expected
        health = client.get("/label-api/health").json()
        assert health["order"] == "uncertainty (rm:tiny-rm@1: least sure first)"
    assert desk.current(OPEN_USER)["item"] == expected


def test_serve_gives_its_label_tab_the_rubric_and_the_order(workspace):
    from ui.serve_app import create_app as create_serve_app

    app, served = create_serve_app(
        workspace, models=[], rubric="honesty", order="uncertainty", rm="rm:tiny-rm", candidates="cands"
    )
    assert served["order"] == "uncertainty"
    with BackgroundServer(app) as url:
        config = httpx.get(url + "config").json()
        ids = {component.get("props", {}).get("elem_id") for component in config["components"]}
        assert {"score-honesty-a", "score-honesty-b"} <= ids
    wait_for_scoring()  # the version shown first was scored from the start
    assert len(list((workspace.root / "label-scores").glob("cands@1-*--rm-tiny-rm@1-*.json"))) == 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
