"""Shared fixtures. Nothing here downloads: tests run with HF_HUB_OFFLINE=1 and tiny models built locally."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(autouse=True)
def _private_align_cache(request, tmp_path_factory, monkeypatch):
    """Unit tests never touch the real model cache; slow tests use it on purpose."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("ALIGN_CACHE", str(tmp_path_factory.mktemp("align-cache")))


@pytest.fixture(autouse=True)
def _fp32_unless_asked(request, monkeypatch):
    """Stages default to bf16 autocast on hardware with native bf16 (this CPU has AMX). The tiny models' numbers
    are checked in fp32 on any machine; a test that wants bf16 sets `bf16: true`. Slow tests keep the default."""
    if not any(request.node.get_closest_marker(name) for name in ("slow", "hardware_bf16")):
        import align.models

        monkeypatch.setattr(align.models, "bf16_is_fast", lambda: False)


def make_tiny_tokenizer():
    """A byte-level tokenizer (any text round-trips) with ChatML special tokens and no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(alphabet)])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture
def tiny_tokenizer():
    """A fresh tiny ChatML tokenizer (no pad token), the one saved in `tiny_model_dir`."""
    return make_tiny_tokenizer()


def save_tiny_model(folder: Path, initializer_range: float = 0.02) -> Path:
    """A tiny Llama (config, safetensors, tokenizer with a ChatML template) with random weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,  # tied random tiny models just repeat the last token ("\n")
        initializer_range=initializer_range,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (config, safetensors, tokenizer with a ChatML template), random weights."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_policy_dir(tmp_path_factory) -> Path:
    """The same tiny Llama with a wider weight initialisation. With the default (0.02) the frozen LM head and
    final norm bound every logit near 0, so a LoRA policy can barely shift its token distribution; RL
    tests need a policy that can learn in a few updates."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-policy"), initializer_range=0.2)


@pytest.fixture
def stop_after():
    """stop_after(step): a Trainer callback that kills the run once the checkpoint at `step` is on disk, as a crash
    would (tests of --resume)."""
    from transformers import TrainerCallback

    class StopAfter(TrainerCallback):
        def __init__(self, step: int):
            self.step = step

        def on_save(self, args, state, control, **kwargs):
            if state.global_step >= self.step:
                raise KeyboardInterrupt

    return StopAfter


@pytest.fixture
def assert_same_adapter():
    """assert_same_adapter(a, b): two adapter artifacts hold the same tensors, within float noise (a resumed run
    against a straight one)."""
    import torch
    from safetensors.torch import load_file

    def check(a, b) -> None:
        first = load_file(a.path / "adapter_model.safetensors")
        second = load_file(b.path / "adapter_model.safetensors")
        assert first.keys() == second.keys()
        for name in first:
            torch.testing.assert_close(first[name], second[name], atol=1e-5, rtol=1e-4, msg=name)

    return check


@pytest.fixture
def assert_base_unchanged():
    """assert_base_unchanged(model, folder): every base weight of a PEFT model is the one saved in `folder`."""
    import torch
    from safetensors.torch import load_file

    def check(model, folder: Path) -> None:
        after = {
            name.replace("base_model.model.", "").replace(".base_layer", ""): parameter
            for name, parameter in model.named_parameters()
            if "lora_" not in name
        }
        for name, weight in load_file(folder / "model.safetensors").items():
            assert torch.equal(weight, after[name]), f"base weight {name} moved"

    return check
