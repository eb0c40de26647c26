"""FLOP counts and the machine's matmul peak: what the benchmark's MFU column is made of.

    peak = gemm_peak(torch.float32, threads=2)           # GFLOP/s of the best large square matmul
    counter = FlopCounter(model)                          # hooks on the decoder and the output head
    counter.active = True; trainer.training_step(...); counter.take()   # FLOPs of that step
    MFU = counted FLOPs / step seconds / (peak * 1e9)

What is counted (model FLOPs, as in the PaLM paper's MFU: the work the training needs, not what a trainer happens to
run): one multiply-add is 2 FLOPs, and only matmuls count (norms, softmax, activations and the optimizer are left
out, a few percent here). For a forward pass over T real tokens (padding is not counted) whose queries attend to P
(query, key) pairs in each layer:

    forward  = sum over layers of 2 T (F + W + A)  +  4 D P per layer  +  2 R H
    backward = for every layer from the lowest one holding a trained weight up:
                   2 T (F + W + A)      the gradient with respect to the layer's inputs
                 + 2 T (W + A)          the gradient with respect to its trained weights
                 + 8 D P                the attention matmuls' two operands each
               + 2 R H                  the head's input gradient (when a layer below it is trained)
               + 2 R H                  the head's weight gradient (when the head itself is trained)

F: the layer's frozen linear weights (all of a LoRA layer's base weights), W: its fully trained linear weights,
A: its trained adapter weights (LoRA A and B of the adapter being trained: r x (in + out) per adapted matmul), D: the
query width (heads x head dim; grouped K/V projections are smaller and counted in F or W as they are), P: for
causal attention over n real tokens n (n + 1) / 2 per sequence, for an explicit 4-D mask the pairs it allows, H: the
output head's weights (vocab x hidden for an LM head, hidden for a reward score head), R: the rows the head is
applied to, at most the real tokens of that pass (TRL's trainers project every position, padding included; ours
only the reply tokens).

So a frozen layer below the lowest trained one costs its forward only (autograd never reaches it), a frozen layer
above it forward plus its input gradient (2x + 2x), and a fully trained layer the usual 2x + 4x (6 N per token).
For LoRA on every layer this gives about 4 N per token for the base weights. Two approximations, both small: the
lowest trained layer's input gradient is counted in full (autograd skips the part of it that only the layer below
would need: at most its Q/K/V projections' input gradients), and a pass with the adapters switched off (DPO's
reference from a base model) is charged for the adapter's forward too (A is ~2% of F with r 16). Recomputation
under gradient checkpointing is not counted: it is work a trainer chooses to redo, not work the model needs.
Reference, value and reward passes without gradients count their forward only.
"""

from __future__ import annotations

import os
import platform
import re
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class LayerCost:
    frozen: int  # F: weights of frozen linear layers
    trained: int  # W: weights of fully trained linear layers
    adapter: int  # A: trained adapter weights (LoRA A and B)


@dataclass(frozen=True)
class ModelCost:
    """The numbers the FLOP formula needs, read off a model (model_cost) or written by hand (the unit tests)."""

    layers: tuple[LayerCost, ...]
    attention_width: int  # D
    head: int  # H
    head_trained: bool = False

    @property
    def lowest_trained(self) -> int | None:
        return next((i for i, layer in enumerate(self.layers) if layer.trained or layer.adapter), None)

    def forward(self, tokens: int, attended: int, head_rows: int = 0) -> int:
        """FLOPs of one forward pass: `tokens` real tokens, `attended` (query, key) pairs per layer."""
        matmuls = sum(2 * tokens * (layer.frozen + layer.trained + layer.adapter) for layer in self.layers)
        attention = 4 * self.attention_width * attended * len(self.layers)
        return matmuls + attention + 2 * head_rows * self.head

    def backward(self, tokens: int, attended: int, head_rows: int = 0) -> int:
        """FLOPs of the backward pass of that forward pass, for what is trained."""
        lowest = self.lowest_trained
        total = 2 * head_rows * self.head if self.head_trained else 0
        if lowest is None:
            return total
        for layer in self.layers[lowest:]:
            total += 2 * tokens * (layer.frozen + layer.trained + layer.adapter)  # input gradients
            total += 2 * tokens * (layer.trained + layer.adapter)  # weight gradients
            total += 8 * self.attention_width * attended
        return total + 2 * head_rows * self.head  # the head's input gradient, into the trained layers


def attended_pairs(attention_mask, shape: tuple[int, int]) -> tuple[int, int]:
    """(real tokens, attended (query, key) pairs) of one forward pass's batch of `shape` (batch, length).

    A 2-D mask (1 = real token) or none means causal attention over each row's real tokens. A 4-D mask [batch, 1,
    query, key] (bool: True may attend; float: 0 may attend) is counted as it is; its padding rows, which attend only
    to themselves, are left out (a real row past the first attends at least to the first token and itself)."""
    import torch

    batch, length = shape
    if attention_mask is None:
        return batch * length, batch * length * (length + 1) // 2
    if attention_mask.dim() == 2:
        lengths = attention_mask.sum(-1).tolist()
        return int(sum(lengths)), int(sum(n * (n + 1) // 2 for n in lengths))
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    per_query = allowed.sum(-1)  # [batch, heads or 1, query]
    per_query = per_query[:, 0]
    real = per_query > 1
    real[:, 0] = True
    return int(real.sum()), int((per_query * real).sum())


def _linear_weights(module, *, adapter: bool) -> tuple[int, int]:
    """(frozen, trained) weights of the nn.Linear modules inside `module`: its adapters' (LoRA A/B) or the others'."""
    import torch

    frozen = trained = 0
    for name, sub in module.named_modules():
        if not isinstance(sub, torch.nn.Linear) or ("lora_" in name) != adapter:
            continue
        if sub.weight.requires_grad:
            trained += sub.weight.numel()
        else:
            frozen += sub.weight.numel()
    return frozen, trained


def model_parts(model):
    """(transformers model, decoder body, its layers, output head) of a model, PEFT and trainer wrappers included."""
    inner = getattr(model, "module", model)  # DDP
    hf = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    body = getattr(hf, hf.base_model_prefix)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if head is None:
        head = getattr(hf, "score", None)  # a sequence classifier (reward model)
    return hf, body, body.layers, head


def model_cost(model) -> ModelCost:
    """The FLOP formula's numbers for `model` as it is now (which weights are trained, which adapters)."""
    hf, _, layers, head = model_parts(model)
    costs = []
    for layer in layers:
        frozen, trained = _linear_weights(layer, adapter=False)
        _, adapter = _linear_weights(layer, adapter=True)  # frozen adapters (a DPO reference copy) are not run
        costs.append(LayerCost(frozen, trained, adapter))
    config = hf.config.get_text_config() if hasattr(hf.config, "get_text_config") else hf.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    head_weights, head_trained = 0, False
    if head is not None:
        for parameter in head.parameters():
            if parameter.dim() == 2 and parameter.requires_grad:
                head_trained = True
        weight = getattr(head, "weight", None)
        if weight is None:  # PEFT's ModulesToSaveWrapper around the score head
            weight = next(p for p in head.parameters() if p.dim() == 2)
        head_weights = weight.numel()
    return ModelCost(tuple(costs), config.num_attention_heads * head_dim, head_weights, head_trained)


class FlopCounter:
    """Counts the formula's FLOPs of every forward pass (and, under autograd, its backward pass) while `active`.

    A hook on the decoder body reads each pass's tokens and mask; one on the head reads its rows. The cost is read
    when the counter is made: make it once the trainer has set up its adapters (on_train_begin)."""

    def __init__(self, model):
        import torch

        self.cost = model_cost(model)
        self.active = False
        self.flops = 0
        self._tokens = 0
        self._torch = torch
        _, body, _, head = model_parts(model)
        self._handles = [body.register_forward_pre_hook(self._body, with_kwargs=True)]
        if head is not None:
            self._handles.append(head.register_forward_hook(self._head))

    def _body(self, module, args, kwargs):
        if not self.active:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        tokens, pairs = attended_pairs(kwargs.get("attention_mask"), tuple(ids.shape[:2]))
        self._tokens = tokens
        self.flops += self.cost.forward(tokens, pairs)
        if self._torch.is_grad_enabled():
            self.flops += self.cost.backward(tokens, pairs)

    def _head(self, module, args, output):
        if not self.active or not args:
            return
        rows = min(args[0].shape[:-1].numel(), self._tokens or args[0].shape[:-1].numel())
        self.flops += 2 * rows * self.cost.head
        if self._torch.is_grad_enabled():
            self.flops += self.cost.backward(0, 0, rows)

    def take(self) -> int:
        """The FLOPs counted since the last take."""
        flops, self.flops = self.flops, 0
        return flops

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


# The machine


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_slug(model: str) -> str:
    """'AMD EPYC' -> 'amd-epyc', 'Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.0GHz' -> 'intel-xeon-platinum-8480'."""
    text = re.sub(r"\((R|TM|tm|r)\)", " ", model)
    text = re.sub(r"@.*$", " ", text)
    text = re.sub(r"\b(CPU|Processor|\d+-Core)\b", " ", text, flags=re.IGNORECASE)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_native(flags: set[str]) -> bool:
    """bf16 matmuls in hardware: AMX (amx_bf16) or AVX-512 BF16. Elsewhere torch emulates them through fp32."""
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels dispatch to (AVX2, AVX512, ...)."""
    import torch

    get = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    return get() if get else "unknown"


def allowed_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def gemm_gflops(dtype, threads: int, size: int = 1024, repeats: int = 4, trials: int = 3) -> float:
    """The best of `trials` timings of `repeats` square [size x size] matmuls, in GFLOP/s, on `threads` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(size, size, generator=generator).to(dtype)
        b = torch.randn(size, size, generator=generator).to(dtype)
        out = torch.empty(size, size, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up
        best = float("inf")
        for _ in range(trials):
            began = time.perf_counter()
            for _ in range(repeats):
                torch.mm(a, b, out=out)
            best = min(best, time.perf_counter() - began)
        return repeats * 2 * size**3 / best / 1e9
    finally:
        torch.set_num_threads(before)
