"""The model cache and local model folders under bad conditions: a conversion killed midway, a folder that holds
only part of a checkpoint."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from align import models
from align.errors import ModelRefError
from align.models import MARKER, load_model, load_tokenizer


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_conversion_folders_are_removed_at_the_next_start(monkeypatch):
    dest = models.cache_dir() / "models" / "smollm2-135m-instruct"
    dest.mkdir(parents=True)
    (dest / MARKER).write_text("{}")  # converted already: the fast path cleans up too
    host, hour_ago = models._host(), time.time() - 3600
    folders = {
        "killed": f".{dest.name}.tmp-{host}-{dead_pid()}-k1ll3d_",  # its process is gone
        "running": f".{dest.name}.tmp-{host}-{os.getpid()}-w0rk1ng",  # ours, still converting
        "other host": f".{dest.name}.tmp-elsewhere-{dead_pid()}-r3m0te",  # a pid we cannot check
        "old style, old": f".{dest.name}.tmp-abc123",
        "old style, fresh": f".{dest.name}.tmp-def456",
        "old trash": f".{dest.name}.stale-xyz789",
        "old, someone else's": ".other-model.tmp-abc123",
    }
    for name in folders.values():
        (dest.parent / name).mkdir()
        (dest.parent / name / "model.safetensors").write_bytes(b"half")
    for label in ("old style, old", "old trash", "old, someone else's"):
        os.utime(dest.parent / folders[label], (hour_ago, hour_ago))

    assert models.embedded_checkpoint() == dest
    left = {label for label, name in folders.items() if (dest.parent / name).exists()}
    assert left == {"running", "other host", "old style, fresh", "old, someone else's"}
    assert dest.is_dir() and (dest / MARKER).is_file()


def test_a_conversion_names_its_process_and_leaves_no_folder(tmp_path, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "embedded_gguf", lambda: gguf)
    seen = []

    def convert(source: Path, out: Path) -> None:
        seen.append(out.name)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert)
    dest = models.embedded_checkpoint()
    assert seen[0].startswith(f".smollm2-135m-instruct.tmp-{models._host()}-{os.getpid()}-")
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


@pytest.fixture
def config_only(tmp_path, tiny_model_dir) -> Path:
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    return folder


def test_a_folder_with_only_config_json_names_what_is_missing(config_only):
    with pytest.raises(ModelRefError) as info:
        load_model(str(config_only))
    assert str(info.value) == (
        f"model folder {config_only} is not a complete checkpoint: it has no weights: model.safetensors or "
        "model.safetensors.index.json; no tokenizer: tokenizer.json or tokenizer_config.json. Save a model with "
        "save_pretrained (weights, config and tokenizer)"
    )
    with pytest.raises(ModelRefError, match="it has no tokenizer: tokenizer.json or tokenizer_config.json"):
        load_tokenizer(str(config_only))


def test_a_folder_with_pickled_weights_only_says_so(config_only, tiny_model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, config_only)
    (config_only / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelRefError) as info:
        load_model(str(config_only))
    assert "it has no weights: model.safetensors or model.safetensors.index.json (it holds pytorch_model.bin, a " in (
        str(info.value)
    )
    assert "tokenizer" not in str(info.value).split("Save a model")[0]


def test_damaged_weights_are_a_clear_error(config_only, tiny_model_dir):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, config_only)
    (config_only / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelRefError, match=f"^cannot load {config_only}"):
        load_model(str(config_only))


def test_chat_with_a_config_only_folder_exits_2(config_only, capsys):
    from align.cli import main

    assert main(["chat", "--model", str(config_only)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: model folder {config_only} is not a complete checkpoint")
    assert "Traceback" not in err
