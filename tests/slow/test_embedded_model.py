"""The real embedded SmolLM2-135M-Instruct: convert it from the GGUF (once, in the real cache) and chat."""

import io
import json

import pytest

from align.chat import run_chat
from align.models import EMBEDDED_ALIAS, MARKER, embedded_checkpoint, load_tokenizer

pytestmark = pytest.mark.slow


def test_embedded_checkpoint_is_a_plain_safetensors_checkpoint():
    folder = embedded_checkpoint()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["tie_word_embeddings"] is True
    assert (folder / "model.safetensors").is_file()
    assert (folder / MARKER).is_file()
    tokenizer = load_tokenizer(EMBEDDED_ALIAS)
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"


def test_embedded_model_answers_and_is_converted_only_once():
    marker = embedded_checkpoint() / MARKER
    converted_at = marker.stat().st_mtime_ns

    out = io.StringIO()
    reply = run_chat(
        EMBEDDED_ALIAS, prompt="What is the capital of France?", temperature=0, max_new_tokens=40, output=out
    )
    assert "Paris" in reply
    assert reply in out.getvalue()

    assert embedded_checkpoint() / MARKER == marker
    assert marker.stat().st_mtime_ns == converted_at  # the second use read the cache, no re-conversion
