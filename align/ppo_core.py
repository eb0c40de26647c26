"""PPO machinery: one base model carrying the policy, reference and value as LoRA adapters, the rollout, and
the update. Kept free of the registry, so that tests and benchmarks use it directly.

    SharedBaseRoles   policy ("default", trainable), reference ("ref", frozen; or the bare base) and value
                      ("value", trainable, plus a scalar head) on one loaded base model
    SharedBaseScorer  a reward model that is a LoRA adapter on the same base, scored without a second copy of it
    rollout           sample responses with the policy's LoRA folded into the weights, and score them
    chunks            rows of a rollout without the padding they all share
    ppo_update        one PPO update: rollouts, KL-penalised rewards, GAE, clipped policy and value losses; under a
                      launcher, data-parallel (align/distributed.py): each process rolls out its share of the
                      prompts, gradients are averaged, whitening and the KL controller see every process's batch

`config` below is the PPO stage's config: any object with its fields (batch_size, temperature, kl_coef, ...).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from align.distributed import all_sum, average_gradients, gather_numbers, world_size
from align.distributed import rank as process_rank
from align.rl_utils import RunningMoments, entropy_from_logits, gae, masked_mean, policy_loss, value_loss, whiten

RewardFn = Callable[[list[list[dict]], list[str]], list[float]]


# The roles: one base model, three adapters.


def backbone(model, sequences, attention_mask):
    """The last hidden states of a PEFT-wrapped causal LM, without its LM head."""
    # Left padding: positions count real tokens only, as they did during generation.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    inner = model.get_base_model().base_model  # the transformer without the LM head
    return inner(input_ids=sequences, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state


def response_logprobs(model, sequences, attention_mask, prompt_length: int, temperature: float, with_entropy=False):
    """Per-token log-probs of the response tokens under `model` as it is (and their entropy, a statistic without
    gradient). The LM head only sees the positions that predict response tokens."""
    hidden = backbone(model, sequences, attention_mask)[:, prompt_length - 1 : -1]
    logits = model.get_base_model().get_output_embeddings()(hidden).float() / temperature
    targets = sequences[:, prompt_length:]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not with_entropy:
        return logprobs
    with torch.no_grad():
        return logprobs, entropy_from_logits(logits.detach())


def set_lora_dropout(model, adapter: str, p: float) -> None:
    """Give a loaded adapter the config's LoRA dropout. The SFT adapter brings its own (0.05 in our SFT recipe);
    PPO wants none by default, as dropout in the policy's training passes makes its new log-probs disagree with
    the old ones at the same weights, which the clipped ratio then reads as a policy change."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_dropout:
            module.lora_dropout[adapter] = torch.nn.Dropout(p) if p > 0 else torch.nn.Identity()
    model.peft_config[adapter].lora_dropout = p


class SharedBaseRoles:
    """Policy, reference and value as adapters on one loaded base model, plus the value head."""

    def __init__(self, model, tokenizer, *, has_reference_adapter: bool):
        self.model = model  # a PeftModel
        self.tokenizer = tokenizer
        self.has_reference_adapter = has_reference_adapter
        self.frozen_adapters = ["ref"] if has_reference_adapter else []
        hidden = model.get_base_model().config.hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.value_head.to(device=model.device)

    @classmethod
    def on_base(cls, base, tokenizer, lora, *, adapter_path=None) -> SharedBaseRoles:
        """Put the roles on a loaded base model. From a starting adapter, the policy is a trainable copy of it (with
        `lora`'s dropout) and the reference a frozen one; without, the policy is a fresh `lora` adapter and the
        reference the bare base. The value is a fresh `lora` adapter either way."""
        import peft

        if adapter_path is not None:
            model = peft.PeftModel.from_pretrained(base, str(adapter_path), is_trainable=True)
            model.load_adapter(str(adapter_path), adapter_name="ref", is_trainable=False)
            set_lora_dropout(model, "default", lora.lora_dropout)
        else:
            model = peft.get_peft_model(base, lora)
        model.add_adapter("value", lora)
        roles = cls(model, tokenizer, has_reference_adapter=adapter_path is not None)
        roles.use("default")
        return roles

    def use(self, adapter: str | None) -> None:
        """Activate one adapter (None: the bare base, through `disable_adapter`). PEFT makes the active adapter
        trainable and the others not, which is what a backward pass on that role needs; the frozen roles (the
        reference, the reward) are activated in inference mode so they stay frozen."""
        if adapter is not None and self.model.active_adapter != adapter:
            self.model.set_adapter(adapter, inference_mode=adapter in self.frozen_adapters)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        adapters = [p for n, p in self.model.named_parameters() if ".default." in n or ".value." in n]
        return adapters + list(self.value_head.parameters())

    def logprobs(
        self,
        adapter: str | None,
        sequences,
        attention_mask,
        prompt_length: int,
        temperature: float,
        with_entropy: bool = False,
    ):
        """Per-token log-probs of the response tokens (and their entropy) under one role."""
        self.use(adapter)
        context = self.model.disable_adapter() if adapter is None else contextlib.nullcontext()
        with context:
            result = response_logprobs(self.model, sequences, attention_mask, prompt_length, temperature, with_entropy)
        self.use("default")
        return result

    def reference_logprobs(self, sequences, attention_mask, prompt_length: int, temperature: float):
        adapter = "ref" if self.has_reference_adapter else None
        return self.logprobs(adapter, sequences, attention_mask, prompt_length, temperature)

    def values(self, sequences, attention_mask, prompt_length: int):
        self.use("value")
        hidden = backbone(self.model, sequences, attention_mask)[:, prompt_length - 1 : -1]
        self.use("default")
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    # Checkpoints hold every trainable tensor (policy, value adapter, value head) in one safetensors file.

    def trainable_state(self) -> dict[str, torch.Tensor]:
        state = {
            n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if ".default." in n or ".value." in n
        }
        state |= {f"value_head.{n}": p.detach().cpu().clone() for n, p in self.value_head.named_parameters()}
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        parameters = dict(self.model.named_parameters())
        parameters |= {f"value_head.{n}": p for n, p in self.value_head.named_parameters()}
        with torch.no_grad():
            for name, tensor in state.items():
                parameters[name].copy_(tensor)


# Rewards


class SharedBaseScorer(torch.nn.Module):
    """A sequence classifier made of the policy's base with the "reward" adapter active and the reward model's
    score head: what `AutoModelForSequenceClassification` computes, without a second copy of the base."""

    def __init__(self, roles: SharedBaseRoles, score_weight: torch.Tensor, pad_token_id: int):
        super().__init__()
        self.roles = [roles]  # a list, so the policy's parameters are not registered as the scorer's own
        self.score = torch.nn.Linear(score_weight.shape[1], score_weight.shape[0], bias=False)
        self.score.weight.data.copy_(score_weight)
        self.score.to(roles.model.device)
        self.config = SimpleNamespace(pad_token_id=pad_token_id)  # what RewardModel sets and reads

    def forward(self, input_ids, attention_mask, **kwargs):
        roles = self.roles[0]
        roles.use("reward")
        try:
            hidden = backbone(roles.model, input_ids, attention_mask)
        finally:
            roles.use("default")
        # As transformers does: the score is read at the last token that is not padding.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (positions * (input_ids != self.config.pad_token_id)).argmax(-1)
        pooled = hidden[torch.arange(len(last), device=hidden.device), last]
        return SimpleNamespace(logits=self.score(pooled.to(self.score.weight.dtype)))


@dataclass
class Rollout:
    sequences: torch.Tensor  # [B, P + R] prompt (left-padded) + response
    attention_mask: torch.Tensor
    response_mask: torch.Tensor  # [B, R]: 1 up to and including EOS
    prompt_length: int
    responses: list[str]
    scores: torch.Tensor  # [B] raw reward-model scores (after the EOS penalty)
    contains_eos: torch.Tensor


def encode_prompts(tokenizer, prompts: list[list[dict]], max_prompt_length: int):
    """Chat-template the prompts and left-pad them; long prompts keep their last tokens."""
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_length:] for text in texts]
    width = max(len(row) for row in ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(row)) + row for row in ids])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in ids])
    return input_ids, mask


def rollout(model, tokenizer, prompts, config, reward_fn: RewardFn, *, do_sample=True) -> Rollout:
    """Sample (or greedily decode) one response per prompt with the active policy, and score it."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, config.max_prompt_length)
    device = model.device
    sampling = (
        {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
        if do_sample
        else {"do_sample": False}
    )
    # Decoding stays out of bf16 autocast: autocast casts every weight again for every token, which makes
    # decoding ~1.4x slower on a CPU (the log-probs used for training come from separate forward passes).
    with torch.no_grad(), torch.autocast(device.type, enabled=False), folded_lora(model):
        output = model.generate(
            input_ids=prompt_ids.to(device),
            attention_mask=prompt_mask.to(device),
            max_new_tokens=config.response_length,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
    prompt_length = prompt_ids.shape[1]
    response = output[:, prompt_length:]
    # Everything after the first EOS is padding (generate pads with the pad token, which may equal EOS).
    is_eos = response == tokenizer.eos_token_id
    contains_eos = is_eos.any(dim=1)
    no_eos = torch.full_like(contains_eos, response.shape[1], dtype=torch.long)
    first_eos = torch.where(contains_eos, is_eos.int().argmax(dim=1), no_eos)
    positions = torch.arange(response.shape[1], device=response.device).unsqueeze(0)
    response_mask = (positions <= first_eos.unsqueeze(1)).long()
    texts = [
        tokenizer.decode(row[keep.bool()], skip_special_tokens=True).strip()
        for row, keep in zip(response, response_mask)
    ]
    scores = torch.tensor(reward_fn(prompts, texts), dtype=torch.float32)
    if config.missing_eos_penalty is not None:
        scores = scores - config.missing_eos_penalty * (~contains_eos.cpu()).float()
    attention_mask = torch.cat([prompt_mask.to(device), response_mask], dim=1)
    return Rollout(output, attention_mask, response_mask.float(), prompt_length, texts, scores, contains_eos)


@contextlib.contextmanager
def folded_lora(model):
    """Generate with the active LoRA adapter folded into the base weights.

    Decoding a token is bound by per-layer overhead and memory traffic, and an unmerged LoRA adds two small
    matmuls to every linear layer for every token. The folded weights are new tensors swapped in for the
    duration and swapped out after, so the base comes back bit for bit (PEFT's merge/unmerge adds and subtracts
    in place, which drifts a little every update). Anything but plain LoRA on plain float weights (QLoRA's 4-bit
    weights, DoRA) is left unfolded.
    """
    from peft.tuners.lora import LoraLayer

    if not hasattr(model, "disable_adapter"):
        yield
        return
    adapter = model.active_adapter
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
    foldable = all(
        type(layer.get_base_layer().weight) is torch.nn.Parameter
        and layer.get_base_layer().weight.is_floating_point()
        and not layer.use_dora.get(adapter, False)
        for layer in layers
    )
    if not foldable:
        yield
        return
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                originals.append((base, base.weight))
                folded = base.weight + layer.get_delta_weight(adapter).to(base.weight.dtype)
                base.weight = torch.nn.Parameter(folded, requires_grad=False)
        with model.disable_adapter():
            yield
    finally:
        for base, weight in originals:
            base.weight = weight


@dataclass
class Chunk:
    """Some rows of a rollout without the columns that are padding in all of them: left of the prompts and right
    of the responses. Every real token keeps its context and position, and the forward pass does less work."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_length: int
    width: int  # response tokens kept: the longest response among the rows

    @property
    def inputs(self):
        return self.sequences, self.attention_mask, self.prompt_length


def chunks(batch: Rollout, rows: list[int], size: int):
    """Yield (rows, Chunk) for `rows` of the rollout, `size` rows at a time."""
    for start in range(0, len(rows), size):
        index = rows[start : start + size]
        attention = batch.attention_mask[index]
        first = min(int(attention[:, : batch.prompt_length].any(0).int().argmax()), batch.prompt_length - 1)
        width = max(int(batch.response_mask[index].sum(1).max()), 1)
        end = batch.prompt_length + width
        chunk = Chunk(batch.sequences[index, first:end], attention[:, first:end], batch.prompt_length - first, width)
        yield index, chunk


def mean_reward(model, tokenizer, prompts, config, reward_fn: RewardFn) -> float:
    """Mean score of greedy responses to held-out prompts: the before/after number of the report. Under a launcher
    each process answers its share of the prompts, and every process returns the mean over all of them."""
    if not prompts:
        return float("nan")
    model.eval()
    mine, scores = prompts[process_rank() :: world_size()], []
    for start in range(0, len(mine), config.batch_size):
        chunk = mine[start : start + config.batch_size]
        scores += rollout(model, tokenizer, chunk, config, reward_fn, do_sample=False).scores.tolist()
    scores = gather_numbers(scores)
    return sum(scores) / len(scores)


# The update


def mixed_precision(config, device: torch.device):
    """bf16 autocast when the config asks for it: matmuls in bf16, weights, optimizer state, log-softmax, losses
    and advantages in fp32 (the log-probs are cast up before the softmax). Sampling opts out (see `rollout`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(config.bf16))


def trainer_arguments(config) -> dict:
    """The PPO settings that transformers' TrainingArguments (and TRL's configs built on it) have too, by its
    names: what a Trainer-style logger records of our loop, and what TRL's RLOO and GRPO train with."""
    return {
        "learning_rate": config.learning_rate,
        "per_device_train_batch_size": config.batch_size // world_size(),  # a launch's processes share the batch
        "max_steps": config.num_updates,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "max_grad_norm": config.max_grad_norm,
        "logging_steps": 1,
        "save_steps": config.save_steps,
        "seed": config.seed,
        "report_to": config.report_to,
    }


def ppo_update(
    roles: SharedBaseRoles,
    optimizer,
    kl,
    moments: RunningMoments,
    train_prompts,
    config,
    reward_fn: RewardFn,
    update: int,
) -> dict:
    """One PPO update: a batch of rollouts, then `ppo_epochs` passes of minibatch gradient steps."""
    began = time.perf_counter()
    # Under a launcher each process takes its share of the update's prompts (every process draws the same ones),
    # and its minibatches are that share of the config's: gradients are averaged over processes before each step.
    processes, rank = world_size(), process_rank()
    # Seeded per update (and process), so a resumed run draws the same prompts and samples as an uninterrupted one.
    torch.manual_seed((config.seed + update) * processes + rank)
    picker = random.Random(config.seed * 100003 + update)
    prompts = [train_prompts[picker.randrange(len(train_prompts))] for _ in range(config.batch_size)]
    prompts = prompts[rank::processes]
    size, mini_batch_size = len(prompts), config.mini_batch_size // processes

    roles.model.eval()
    roles.use("default")
    batch = rollout(roles.model, roles.tokenizer, prompts, config, reward_fn)
    mask = batch.response_mask
    micro = mini_batch_size // config.gradient_accumulation_steps
    # The rollout's log-probs under the policy and the reference, and the value estimates, in chunks of rows of
    # similar length, so that little of each forward pass is spent on padding.
    by_length = sorted(range(size), key=lambda i: int(batch.attention_mask[i].sum()))
    old_logprobs, ref_logprobs, old_values = (torch.zeros_like(mask) for _ in range(3))
    with torch.no_grad():
        for rows, chunk in chunks(batch, by_length, micro):
            width = chunk.width
            old_logprobs[rows, :width] = roles.logprobs("default", *chunk.inputs, config.temperature)
            ref_logprobs[rows, :width] = roles.reference_logprobs(*chunk.inputs, config.temperature)
            old_values[rows, :width] = roles.values(*chunk.inputs)
    raw_scores = batch.scores.clone()
    scores = batch.scores
    if config.reward_norm:
        moments.update(gather_numbers(scores.tolist()))  # every process's scores: the moments stay the same on all
        scores = scores / moments.std
    if config.reward_clip is not None:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)

    # Per-token rewards: the KL penalty on every token, the score on the last one.
    token_kl = (old_logprobs - ref_logprobs) * mask
    rewards = -kl.value * token_kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(last)), last] += scores.to(rewards.device)
    advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
    if config.whiten_advantages:  # by the mean and variance over every process's batch
        advantages = whiten(advantages, mask, all_sum=all_sum if processes > 1 else None)

    roles.model.train()
    stats: dict[str, list[float]] = {
        k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy", "vf_clipfrac")
    }
    for _ in range(config.ppo_epochs):
        order = torch.randperm(size).tolist()
        for start in range(0, size, mini_batch_size):
            optimizer.zero_grad()
            # Rows of similar length share a forward pass (the gradient sums over the whole minibatch anyway).
            minibatch = sorted(order[start : start + mini_batch_size], key=by_length.index)
            for rows, chunk in chunks(batch, minibatch, micro):
                width, m = chunk.width, mask[rows, : chunk.width]
                new_logprobs, entropy = roles.logprobs("default", *chunk.inputs, config.temperature, with_entropy=True)
                pg, clipfrac, approx_kl = policy_loss(
                    new_logprobs, old_logprobs[rows, :width], advantages[rows, :width], m, config.cliprange
                )
                # Policy and value have separate parameters, so each role's backward runs on its own: the
                # policy's activations are freed before the value's are made, halving the peak memory.
                (pg / config.gradient_accumulation_steps).backward()
                new_values = roles.values(*chunk.inputs)
                vf, vf_clipfrac = value_loss(
                    new_values, old_values[rows, :width], returns[rows, :width], m, config.cliprange_value
                )
                (config.vf_coef * vf / config.gradient_accumulation_steps).backward()
                for key, value in (
                    ("pg_loss", pg),
                    ("vf_loss", vf),
                    ("clipfrac", clipfrac),
                    ("approx_kl", approx_kl),
                    ("entropy", masked_mean(entropy, m)),
                    ("vf_clipfrac", vf_clipfrac),
                ):
                    stats[key].append(float(value.detach()))
            average_gradients(roles.trainable_parameters())  # the minibatch over every process
            torch.nn.utils.clip_grad_norm_(roles.trainable_parameters(), config.max_grad_norm)
            optimizer.step()
    roles.model.eval()

    mean_kl = float(token_kl.sum(1).mean())
    kl_value = kl.value
    stats = {
        "update": update + 1,
        "objective/kl": mean_kl,
        "objective/kl_coef": kl_value,
        "objective/scores": float(raw_scores.mean()),
        "objective/rlhf_reward": float(raw_scores.mean()) - kl_value * mean_kl,
        "loss/policy": _mean(stats["pg_loss"]),
        "loss/value": _mean(stats["vf_loss"]),
        "policy/clipfrac": _mean(stats["clipfrac"]),
        "policy/approx_kl": _mean(stats["approx_kl"]),
        "policy/entropy": _mean(stats["entropy"]),
        "value/clipfrac": _mean(stats["vf_clipfrac"]),
        "response_length": float(mask.sum(1).mean()),
        "eos_fraction": float(batch.contains_eos.float().mean()),
        "seconds": time.perf_counter() - began,
    }
    # Means over every process (each holds the same number of rows), so the KL controller moves alike on all.
    stats = mean_over_processes(stats)
    kl.update(stats["objective/kl"], config.batch_size)
    return stats


def mean_over_processes(stats: dict) -> dict:
    """Each value averaged over the processes of a launch, in one all-reduce (the identity in one process)."""
    processes = world_size()
    if processes == 1:
        return stats
    keys = list(stats)
    totals = all_sum(torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64))
    return {k: (stats[k] if k == "update" else float(v) / processes) for k, v in zip(keys, totals.tolist())}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# Checkpoints hold every trainable tensor, the optimizer, the KL coefficient, the reward moments and the history.


def save_checkpoint(folder: Path, roles, optimizer, kl, moments, history, updates: int) -> None:
    from safetensors.torch import save_file

    temporary = folder.with_name(folder.name + ".tmp")
    temporary.mkdir(parents=True, exist_ok=True)
    save_file(roles.trainable_state(), str(temporary / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
    state = {"updates": updates, "kl_coef": kl.value, "moments": moments.state(), "history": history}
    (temporary / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    temporary.rename(folder)  # a checkpoint is complete or absent


def latest_checkpoint(folder: Path) -> Path | None:
    found = [p for p in folder.glob("update-*") if p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def load_checkpoint(folder: Path, roles, optimizer, kl, moments, history) -> int:
    from safetensors.torch import load_file

    roles.load_trainable_state(load_file(str(folder / "trainable.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    kl.value = state["kl_coef"]
    moments.load(state["moments"])
    history[:] = state["history"]
    return state["updates"]
