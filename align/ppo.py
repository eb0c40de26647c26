"""PPO stage: align a policy against a reward model, with LoRA adapters on ONE base model.

    align ppo --config recipes/ppo/smollm2-135m-lora.yaml
    align ppo --config recipes/ppo/smollm2-135m-lora.yaml --num_updates 40 --kl_coef 0.1
    align ppo --config recipes/ppo/smollm2-135m-lora.yaml --resume
    # the same inputs and outputs with TRL's trainers instead of our PPO loop:
    align ppo --config recipes/ppo/smollm2-135m-rloo.yaml      (algo: rloo)
    align ppo --config recipes/ppo/smollm2-135m-grpo.yaml      (algo: grpo)

TRL 1.16 has no PPOTrainer, so the PPO loop is here. One base model in memory serves three roles, each a
PEFT adapter on it:

    default    the policy: trainable LoRA, initialised from the SFT adapter (or fresh on a plain base)
    ref        the reference: the SFT adapter, frozen (on a plain base: the base with adapters disabled)
    value      the value function: its own trainable LoRA plus a scalar head

The reward comes from a registry reward model (`rm:NAME`); text is decoded and re-tokenised for it, so a
reward model with another tokenizer works. Each update: sample a batch of prompts, roll out responses
(batched, KV cache), score them, add a per-token KL penalty to the reference, compute GAE advantages, then
run several epochs of clipped-surrogate and clipped-value updates over minibatches.

Where the time goes, and what keeps it down: sampling runs with the policy's LoRA folded into the weights (an
unfolded LoRA slows every decoded token); every forward pass sees chunks of rows without the padding they all
share (HH prompts vary from 20 to 192 tokens); the policy's and the value's backward passes run one after the
other, so only one role's activations are alive at a time.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from align.config import AdapterFields, StageFields, build_config, config_to_dict
from align.errors import AlignError
from align.registry import Registry
from align.rl_utils import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    entropy_from_logits,
    gae,
    masked_mean,
    policy_loss,
    value_loss,
    whiten,
)
from align.runs import append_live, open_run, plot_series, recipe_for, write_metrics, write_report

ALGOS = ("ppo", "rloo", "grpo")
RewardFn = Callable[[list[list[dict]], list[str]], list[float]]


@dataclass
class PPOStageConfig(StageFields, AdapterFields):
    algo: str = field(default="ppo", metadata={"help": "ppo (ours) | rloo | grpo (TRL's trainers)"})
    reward_model: str | None = field(default=None, metadata={"help": "registry reward model, rm:NAME[@V]"})
    output_name: str | None = field(default="ppo", metadata={"help": "artifact name: adapter:NAME"})
    seed: int = 0
    # Rollouts
    num_updates: int = field(default=20, metadata={"help": "PPO updates (each: one batch of rollouts)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per rollout batch"})
    response_length: int = field(default=32, metadata={"help": "max new tokens per response"})
    max_prompt_length: int = field(default=256, metadata={"help": "prompts are cut from the left to this"})
    temperature: float = 0.7
    top_p: float = 1.0
    missing_eos_penalty: float | None = field(default=None, metadata={"help": "subtracted when no EOS"})
    reward_norm: bool = field(default=False, metadata={"help": "divide scores by their running std"})
    reward_clip: float | None = field(default=10.0, metadata={"help": "clip scores to [-c, c]"})
    # KL to the reference
    kl_coef: float = 0.05
    adaptive_kl: bool = False
    target_kl: float = field(default=6.0, metadata={"help": "adaptive KL: target KL per response"})
    kl_horizon: int = 10000
    # Update
    learning_rate: float = 5e-5
    ppo_epochs: int = 2
    mini_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    max_grad_norm: float = 1.0
    # Bookkeeping
    save_steps: int = field(default=10, metadata={"help": "checkpoint every N updates (what --resume continues)"})
    eval_prompts: int = field(default=16, metadata={"help": "held-out prompts scored before and after"})
    num_generations: int = field(default=4, metadata={"help": "rloo/grpo: completions per prompt"})
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bf16 autocast (weights stay in torch_dtype); null: on where bf16 is native to the hardware"},
    )

    def __post_init__(self):
        self.check_stage_fields()
        self.check_adapter_fields()
        if self.algo not in ALGOS:
            raise ValueError(f"config key 'algo' must be one of {', '.join(ALGOS)} (got {self.algo!r})")
        if not self.reward_model:
            raise ValueError("config key 'reward_model' is required: a registry reward model, rm:NAME[@V]")
        if self.peft != "lora":
            raise ValueError(f"config key 'peft' must be lora for PPO (got {self.peft!r}): the roles are LoRA adapters")
        for key in (
            "num_updates",
            "batch_size",
            "response_length",
            "ppo_epochs",
            "mini_batch_size",
            "gradient_accumulation_steps",
            "save_steps",
            "max_prompt_length",
            "num_generations",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"config key '{key}' must be at least 1 (got {getattr(self, key)!r})")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(
                f"config key 'mini_batch_size' ({self.mini_batch_size}) must divide batch_size ({self.batch_size})"
            )
        if self.algo != "ppo" and self.batch_size % self.num_generations:
            raise ValueError(
                f"config key 'num_generations' ({self.num_generations}) must divide batch_size "
                f"({self.batch_size}): rloo/grpo batches hold whole groups of completions"
            )
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError("config key 'gradient_accumulation_steps' must divide mini_batch_size")
        for key in ("learning_rate", "kl_coef", "vf_coef"):
            if getattr(self, key) < 0:
                raise ValueError(f"config key '{key}' must be 0 or more (got {getattr(self, key)!r})")
        if not 0 < self.temperature:
            raise ValueError(f"config key 'temperature' must be above 0 (got {self.temperature!r})")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise ValueError("config keys 'gamma' and 'lam' must be in [0, 1]")


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
    def load(cls, start_ref: str, registry: Registry, config: PPOStageConfig) -> tuple[SharedBaseRoles, str]:
        """Load the base once and put the roles on it. Returns (roles, base model reference)."""
        import peft

        from align.config import peft_config_for
        from align.models import load_model, resolve_model

        resolved = resolve_model(start_ref, registry)
        if resolved.artifact_kind not in (None, "adapter"):
            raise AlignError(f"PPO starts from an SFT adapter or a base model, not {start_ref}")
        base, tokenizer = load_model(resolved.base, registry, dtype=config.torch_dtype)
        base_ref = registry.resolve_artifact(start_ref).base_model if resolved.adapter_path else start_ref
        lora = peft_config_for(config)
        if resolved.adapter_path is not None:
            model = peft.PeftModel.from_pretrained(base, str(resolved.adapter_path), is_trainable=True)
            model.load_adapter(str(resolved.adapter_path), adapter_name="ref", is_trainable=False)
            set_lora_dropout(model, "default", config.lora_dropout)
        else:
            model = peft.get_peft_model(base, lora)
        model.add_adapter("value", lora)
        roles = cls(model, tokenizer, has_reference_adapter=resolved.adapter_path is not None)
        roles.use("default")
        return roles, base_ref

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


def registry_reward_fn(reward_ref: str, registry: Registry, roles: SharedBaseRoles | None = None) -> RewardFn:
    """Scores from a registry reward model, on decoded text re-tokenised with the reward model's tokenizer.

    When the reward model is a LoRA adapter on the policy's own base model, it joins the roles as the adapter
    "reward" (plus its score head) instead of loading the base a second time.
    """
    from reward.model import RewardModel

    reward_model = shared_base_reward_model(reward_ref, registry, roles) if roles is not None else None
    if reward_model is None:
        reward_model = RewardModel.load(reward_ref, registry=registry)

    def score(prompts: list[list[dict]], responses: list[str]) -> list[float]:
        completions = [[{"role": "assistant", "content": text}] for text in responses]
        return reward_model.score(prompts, completions)

    return score


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


def shared_base_reward_model(reward_ref: str, registry: Registry, roles: SharedBaseRoles):
    """The reward model as an adapter on the policy's base, or None when it has another base or adapter type."""
    from safetensors.torch import load_file

    from align.models import load_tokenizer, resolve_model
    from reward.model import DEFAULT_MAX_LENGTH, RewardModel

    artifact = registry.resolve_artifact(reward_ref)
    resolved = resolve_model(reward_ref, registry)
    policy_base = roles.model.get_base_model().config._name_or_path
    adapter_config = json.loads((artifact.path / "adapter_config.json").read_text(encoding="utf-8"))
    if str(resolved.base) != str(policy_base) or adapter_config.get("peft_type") != "LORA":
        return None
    weights = load_file(str(artifact.path / "adapter_model.safetensors"))
    score = [tensor for name, tensor in weights.items() if name.endswith("score.weight")]
    if len(score) != 1:
        return None
    roles.model.load_adapter(str(artifact.path), adapter_name="reward", is_trainable=False)
    roles.frozen_adapters.append("reward")
    roles.use("default")
    tokenizer = load_tokenizer(reward_ref, registry)
    scorer = SharedBaseScorer(roles, score[0], tokenizer.pad_token_id)
    max_length = artifact.meta.get("max_length") or DEFAULT_MAX_LENGTH
    print(f"reward model {artifact.ref} shares the policy's base: loaded as an adapter, not a second model")
    return RewardModel(scorer, tokenizer, max_length=max_length, ref=artifact.ref)


# Rollouts


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


def rollout(model, tokenizer, prompts, config: PPOStageConfig, reward_fn: RewardFn, *, do_sample=True) -> Rollout:
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


def mean_reward(model, tokenizer, prompts, config: PPOStageConfig, reward_fn: RewardFn) -> float:
    """Mean score of greedy responses to held-out prompts: the before/after number of the report."""
    if not prompts:
        return float("nan")
    model.eval()
    scores = []
    for start in range(0, len(prompts), config.batch_size):
        chunk = prompts[start : start + config.batch_size]
        scores += rollout(model, tokenizer, chunk, config, reward_fn, do_sample=False).scores.tolist()
    return sum(scores) / len(scores)


# Training


def run_ppo(
    config: PPOStageConfig,
    registry: Registry,
    *,
    recipe: dict | None = None,
    resume: str | None = None,
    reward_fn: RewardFn | None = None,
    stop_after: int | None = None,
):
    """Train and register the policy adapter. `reward_fn` replaces the reward model (tests);
    `stop_after` ends the process after that many updates, as a kill would (tests of --resume)."""
    if config.algo != "ppo":
        from align.ppo_trl import run_trl_algo

        return run_trl_algo(config, registry, recipe=recipe, resume=resume, reward_fn=reward_fn)

    # Inputs are checked before anything heavy happens.
    prompts_version = registry.resolve(config.dataset, kind="prompts")
    if config.eval_dataset:
        train_version, eval_version = prompts_version, registry.resolve(config.eval_dataset, kind="prompts")
    else:
        train_version, eval_version = registry.split(prompts_version, test_size=config.eval_split, seed=config.seed)
    reward_artifact = None
    if reward_fn is None:
        reward_artifact = registry.resolve_artifact(config.reward_model)
        if reward_artifact.kind != "rm":
            raise AlignError(f"reward_model must be a reward model (rm:NAME), not {config.reward_model}")

    inputs = [train_version.ref, eval_version.ref, config.model, config.reward_model]
    run = open_run(
        registry,
        "ppo",
        recipe=recipe or {},
        config_dict=config_to_dict(config),
        inputs=inputs,
        seed=config.seed,
        resume=resume,
    )
    print(f"run {run.id}: PPO of {config.model} against {config.reward_model} on {train_version.ref}")
    try:
        torch.manual_seed(config.seed)
        roles, base_ref = SharedBaseRoles.load(config.model, registry, config)
        if reward_fn is None:
            reward_fn = registry_reward_fn(config.reward_model, registry, roles)
        train_prompts = [row["prompt"] for row in registry.rows(train_version)]
        eval_prompts = [row["prompt"] for row in registry.rows(eval_version)][: config.eval_prompts]
        optimizer = torch.optim.AdamW(roles.trainable_parameters(), lr=config.learning_rate)
        kl = (
            AdaptiveKLController(config.kl_coef, config.target_kl, config.kl_horizon)
            if config.adaptive_kl
            else FixedKLController(config.kl_coef)
        )
        moments = RunningMoments()
        history: list[dict] = []
        start = 0
        checkpoints = run.dir / "checkpoints"
        if resume and _latest_checkpoint(checkpoints):
            start = _load_checkpoint(_latest_checkpoint(checkpoints), roles, optimizer, kl, moments, history)
            print(f"resumed from update {start}")

        if start == 0:
            with mixed_precision(config, roles.model.device):
                before = mean_reward(roles.model, roles.tokenizer, eval_prompts, config, reward_fn)
        else:
            before = history[0]["eval_before"]
        from tqdm.auto import tqdm

        with tqdm(total=config.num_updates, initial=start, desc="ppo", unit="update") as progress:
            for update in range(start, config.num_updates):
                with mixed_precision(config, roles.model.device):
                    stats = ppo_update(roles, optimizer, kl, moments, train_prompts, config, reward_fn, update)
                if update == 0:
                    stats["eval_before"] = before
                history.append(stats)
                append_live(run.dir, update + 1, stats)
                progress.update(1)
                progress.set_postfix(score=f"{stats['objective/scores']:.3f}", kl=f"{stats['objective/kl']:.3f}")
                if (update + 1) % config.save_steps == 0 or update + 1 == config.num_updates:
                    _save_checkpoint(
                        checkpoints / f"update-{update + 1}", roles, optimizer, kl, moments, history, update + 1
                    )
                if stop_after is not None and update + 1 >= stop_after and update + 1 < config.num_updates:
                    raise KeyboardInterrupt(f"stopped after update {update + 1}")
        with mixed_precision(config, roles.model.device):
            after = mean_reward(roles.model, roles.tokenizer, eval_prompts, config, reward_fn)

        output_dir = run.dir / "adapter"
        roles.model.save_pretrained(str(output_dir), selected_adapters=["default"])
        roles.tokenizer.save_pretrained(str(output_dir))
        metrics = {
            "eval_mean_reward_before": before,
            "eval_mean_reward": after,
            "updates": config.num_updates,
            "final_kl_coef": kl.value,
            **{f"last/{k}": v for k, v in history[-1].items() if k != "eval_before"},
        }
        parents = [(train_version, "prompts"), (eval_version, "eval")]
        if ":" in config.model:
            parents.append((config.model, "init-and-reference"))
        if reward_artifact is not None:
            parents.append((reward_artifact, "reward-model"))
        artifact = registry.register_artifact(
            "adapter",
            config.output_name,
            output_dir,
            base_model=base_ref,
            run=run,
            parents=parents,
            meta={"algo": "ppo", "metrics": metrics},
        )
        _report(run, config, history, metrics, artifact)
        registry.finish_run(run, metrics=metrics, outputs=[artifact.ref])
        print(
            f"registered {artifact.ref}: mean reward on {len(eval_prompts)} held-out prompts "
            f"{before:.3f} -> {after:.3f}; report {run.dir / 'report.md'}"
        )
        return artifact
    except BaseException as exc:
        registry.finish_run(run, status="failed", error=f"{type(exc).__name__}: {exc}")
        raise


def mixed_precision(config: PPOStageConfig, device: torch.device):
    """bf16 autocast when the config asks for it: matmuls in bf16, weights, optimizer state, log-softmax, losses
    and advantages in fp32 (the log-probs are cast up before the softmax). Sampling opts out (see `rollout`)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(config.bf16))


def ppo_update(
    roles: SharedBaseRoles,
    optimizer,
    kl,
    moments: RunningMoments,
    train_prompts,
    config: PPOStageConfig,
    reward_fn: RewardFn,
    update: int,
) -> dict:
    """One PPO update: a batch of rollouts, then `ppo_epochs` passes of minibatch gradient steps."""
    began = time.perf_counter()
    # Seeded per update, so a resumed run draws the same prompts and samples as an uninterrupted one.
    torch.manual_seed(config.seed + update)
    picker = random.Random(config.seed * 100003 + update)
    prompts = [train_prompts[picker.randrange(len(train_prompts))] for _ in range(config.batch_size)]

    roles.model.eval()
    roles.use("default")
    batch = rollout(roles.model, roles.tokenizer, prompts, config, reward_fn)
    mask = batch.response_mask
    micro = config.mini_batch_size // config.gradient_accumulation_steps
    # The rollout's log-probs under the policy and the reference, and the value estimates, in chunks of rows of
    # similar length, so that little of each forward pass is spent on padding.
    by_length = sorted(range(config.batch_size), key=lambda i: int(batch.attention_mask[i].sum()))
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
        moments.update(scores.tolist())
        scores = scores / moments.std
    if config.reward_clip is not None:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)

    # Per-token rewards: the KL penalty on every token, the score on the last one.
    token_kl = (old_logprobs - ref_logprobs) * mask
    rewards = -kl.value * token_kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(last)), last] += scores.to(rewards.device)
    advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = whiten(advantages, mask)

    roles.model.train()
    stats: dict[str, list[float]] = {
        k: [] for k in ("pg_loss", "vf_loss", "clipfrac", "approx_kl", "entropy", "vf_clipfrac")
    }
    for _ in range(config.ppo_epochs):
        order = torch.randperm(config.batch_size).tolist()
        for start in range(0, config.batch_size, config.mini_batch_size):
            optimizer.zero_grad()
            # Rows of similar length share a forward pass (the gradient sums over the whole minibatch anyway).
            minibatch = sorted(order[start : start + config.mini_batch_size], key=by_length.index)
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
            torch.nn.utils.clip_grad_norm_(roles.trainable_parameters(), config.max_grad_norm)
            optimizer.step()
    roles.model.eval()

    mean_kl = float(token_kl.sum(1).mean())
    kl_value = kl.value
    kl.update(mean_kl, config.batch_size)
    return {
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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _save_checkpoint(folder: Path, roles, optimizer, kl, moments, history, updates: int) -> None:
    from safetensors.torch import save_file

    temporary = folder.with_name(folder.name + ".tmp")
    temporary.mkdir(parents=True, exist_ok=True)
    save_file(roles.trainable_state(), str(temporary / "trainable.safetensors"))
    torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
    state = {"updates": updates, "kl_coef": kl.value, "moments": moments.state(), "history": history}
    (temporary / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    temporary.rename(folder)  # a checkpoint is complete or absent


def _latest_checkpoint(folder: Path) -> Path | None:
    found = [p for p in folder.glob("update-*") if p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1])) if found else None


def _load_checkpoint(folder: Path, roles, optimizer, kl, moments, history) -> int:
    from safetensors.torch import load_file

    roles.load_trainable_state(load_file(str(folder / "trainable.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    kl.value = state["kl_coef"]
    moments.load(state["moments"])
    history[:] = state["history"]
    return state["updates"]


def _report(run, config, history, metrics, artifact) -> None:
    plots = []
    for key, title in (
        ("objective/scores", "raw reward-model score"),
        ("objective/rlhf_reward", "RLHF reward"),
        ("objective/kl", "KL to the reference"),
        ("loss/value", "value loss"),
        ("policy/clipfrac", "clip fraction"),
        ("policy/approx_kl", "approx KL (old -> new)"),
        ("policy/entropy", "entropy"),
        ("response_length", "response length"),
    ):
        name = key.replace("/", "_")
        plots.append(
            plot_series(
                run.dir / f"{name}.png", title, {title: [(h["update"], h[key]) for h in history]}, xlabel="update"
            )
        )
    write_metrics(run, metrics | {"history": history})
    setup = (
        f"Policy from `{config.model}`, reward `{config.reward_model}`, prompts `{config.dataset}`; "
        f"{config.num_updates} updates of {config.batch_size} rollouts ({config.response_length} tokens), "
        f"{config.ppo_epochs} epochs of minibatch {config.mini_batch_size}; KL coefficient {config.kl_coef}"
        f"{' (adaptive)' if config.adaptive_kl else ''}. Output `{artifact.ref}`."
    )
    summary = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    write_report(run, "PPO report", summary=summary, sections=[("Setup", setup)], plots=plots)


def main(
    config_path: str | None, overrides: list[str], *, workspace: str | None = None, resume: str | bool | None = None
):
    """`align ppo`: the recipe plus overrides, or on --resume the recipe the run started with."""
    registry = Registry(workspace)
    recipe, source, run_id = recipe_for(registry, "ppo", config_path, overrides, resume)
    config = build_config(PPOStageConfig, recipe, source=source)
    return run_ppo(config, registry, recipe=recipe, resume=run_id)
