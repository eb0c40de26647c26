"""`align pipeline`: the whole loop in one command, each step reusing what an earlier run already made.

    align pipeline --config recipes/pipeline/smollm2-135m.yaml
    align pipeline --config recipes/pipeline/smollm2-135m.yaml --from rm       # rerun rm and what follows
    align pipeline --config recipes/pipeline/smollm2-135m.yaml --until generate

The steps, in order:

    import        the SFT data and the preference data into the registry; a seeded train/test split of the latter
    expand        (only when listed in `steps`) grow the SFT train data with a model (align expand), then, with
                  `expand.review: true` (the default), wait for people to review it (align review) and keep the
                  seeds plus the rows they accepted or edited (align data from-review --with-seeds); with
                  `review: false`, the seeds plus every row kept by the filters
    sft           a LoRA adapter on the SFT data (align sft)
    generate      candidates from the SFT adapter and its base on held-out SFT prompts (align generate)
    preferences   `labels`: the votes cast in the ranking UI on those candidates (align data from-labels);
                  `import`: the imported preference set, for unattended runs
    rm            a reward model on the train preferences (align rm)
    dpo           DPO of the SFT adapter on the train preferences (align dpo); with `dpo_pairs: rm`, on pairs of
                  its own replies instead: it answers the train prompts n times (align generate), the reward
                  model ranks each prompt's replies best against worst (align rm score), DPO trains on those
    kto           KTO of the SFT adapter (align kto) on the train preferences unpaired into feedback rows (chosen
                  desirable, rejected undesirable), held-out pairs likewise; not in the default steps: add it
    ppo           PPO of the SFT adapter against the reward model, on prompts of the train preferences (align ppo)
    eval          base, SFT, DPO, KTO and PPO on held-out prompts, judged by the reward model (align eval)

A step is identified by a fingerprint of its settings and the exact versions it reads. When a completed run
of the step with the same fingerprint exists, its outputs are reused and the step is skipped; so a rerun is
cheap and picks up after a failure. Each step's record is a run of stage `pipeline-STEP` in the catalog.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from align.config import build_config
from align.errors import AlignError
from align.models import DTYPE_NAMES
from align.registry import Registry

STEPS = ("import", "expand", "sft", "generate", "preferences", "rm", "dpo", "kto", "ppo", "eval")
# expand and kto run only when asked for (expansion waits for reviewers)
DEFAULT_STEPS = tuple(step for step in STEPS if step not in ("expand", "kto"))
# align expand's settings an `expand:` block may hold
EXPAND_KEYS = {"method", "n", "model", "operators", "review", "k", "machine_k", "round_size", "rouge_threshold"}
EXPAND_KEYS |= {"min_words", "max_words", "max_rounds", "max_new_tokens", "temperature", "top_p", "batch_size", "dtype"}


@dataclass
class PipelineConfig:
    base_model: str = field(default="smollm2-135m", metadata={"help": "the base every stage starts from"})
    sft_data: str = field(default="../shared/data/self-instruct-seed-tasks.jsonl", metadata={"help": "file"})
    preference_data: str = field(default="../shared/data/hh-rlhf-harmless-dev.jsonl.gz", metadata={"help": "file"})
    sft_test_size: float = field(
        default=24,
        metadata={"help": "held-out SFT rows (a count, or a share below 1): the prompts the candidates answer"},
    )
    preference_test_size: float = field(default=0.1, metadata={"help": "held-out preference pairs (count or share)"})
    seed: int = 0
    preferences: str = field(default="import", metadata={"help": "import | labels (votes from the ranking UI)"})
    dpo_pairs: str = field(
        default="preferences",
        metadata={
            "help": "what DPO trains on: preferences (the train pairs, written by other models) | rm (on-policy "
            "pairs: the SFT adapter's own replies to the train prompts, ranked by the reward model)"
        },
    )
    on_policy: dict = field(
        default_factory=dict,
        metadata={
            "help": "with dpo_pairs: rm, how the SFT adapter answers: n (replies per prompt, default 4), limit "
            "(train prompts, default all), max_new_tokens, temperature, top_p, batch_size, dtype"
        },
    )
    steps: list[str] = field(
        default_factory=lambda: list(DEFAULT_STEPS), metadata={"help": "the steps to run, in order"}
    )
    # Each stage block: `recipe: PATH` plus any keys of that stage's config, which override the recipe.
    expand: dict = field(
        default_factory=dict,
        metadata={
            "help": "with expand in steps: method (self-instruct | evol), n, model (default: base_model), operators "
            "(a list), review (default: true), and align expand's filter and sampling settings"
        },
    )
    sft: dict = field(default_factory=dict)
    generate: dict = field(default_factory=dict)
    rm: dict = field(default_factory=dict)
    dpo: dict = field(default_factory=dict)
    kto: dict = field(default_factory=dict)
    ppo: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.preferences not in ("import", "labels"):
            raise ValueError(f"config key 'preferences' must be import or labels (got {self.preferences!r})")
        if self.dpo_pairs not in ("preferences", "rm"):
            raise ValueError(f"config key 'dpo_pairs' must be preferences or rm (got {self.dpo_pairs!r})")
        if self.dpo_pairs == "rm" and "dpo" in self.steps and "rm" not in self.steps:
            raise ValueError("config key 'dpo_pairs' is rm: the reward model ranks DPO's pairs, so add rm to steps")
        unknown = [step for step in self.steps if step not in STEPS]
        if unknown:
            raise ValueError(f"config key 'steps': unknown step {unknown[0]!r}; the steps are {', '.join(STEPS)}")
        for key in ("expand", "sft", "generate", "rm", "dpo", "kto", "ppo", "eval", "on_policy"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"config key '{key}' must be a mapping of settings")
        allowed = {
            "generate": {"n", "limit", "max_new_tokens", "temperature", "top_p", "batch_size", "dtype"},
            "eval": {"limit", "max_new_tokens", "bootstrap", "few_shot", "batch_size", "dtype"},
            "on_policy": {"n", "limit", "max_new_tokens", "temperature", "top_p", "batch_size", "dtype"},
            "expand": EXPAND_KEYS,
        }
        for key, keys in allowed.items():
            extra = set(getattr(self, key)) - keys
            if extra:
                raise ValueError(
                    f"config key '{key}.{sorted(extra)[0]}' is not a setting; use {', '.join(sorted(keys))}"
                )
        if self.on_policy.get("n", 4) < 2:
            raise ValueError(f"config key 'on_policy.n' must be at least 2 (got {self.on_policy['n']!r})")
        if not isinstance(self.expand.get("review", True), bool):
            raise ValueError(f"config key 'expand.review' must be true or false (got {self.expand['review']!r})")
        try:
            expand_settings(self.expand, seed=self.seed)
        except AlignError as exc:
            raise ValueError(f"config key 'expand': {exc}") from None
        for key in ("generate", "eval", "on_policy", "expand"):
            dtype = getattr(self, key).get("dtype")
            if dtype is not None and dtype not in DTYPE_NAMES:
                raise ValueError(f"config key '{key}.dtype' must be one of {', '.join(DTYPE_NAMES)} (got {dtype!r})")
        # The stage blocks are checked now, with placeholder inputs, so a typo fails before any step runs.
        for stage in ("sft", "rm", "dpo", "kto", "ppo"):
            stage_recipe(self, stage, {"dataset": "placeholder", "reward_model": "rm:placeholder"})


def expand_settings(block: dict, *, seed: int):
    """(ExpandSettings, SamplingSettings) of an `expand:` block."""
    from align.expansion import ExpandSettings
    from align.sampling import SamplingSettings

    sampling_keys = ("max_new_tokens", "temperature", "top_p", "batch_size", "dtype")
    sampling = SamplingSettings(seed=seed, **{key: block[key] for key in sampling_keys if key in block})
    chosen = {key: value for key, value in block.items() if key not in (*sampling_keys, "model", "review")}
    operators = chosen.get("operators")
    if isinstance(operators, str):  # operators: deepen,constrain
        chosen["operators"] = tuple(operator.strip() for operator in operators.split(",") if operator.strip())
    elif operators is not None:
        chosen["operators"] = tuple(operators)
    return ExpandSettings(seed=seed, **chosen), sampling


def stage_recipe(config: PipelineConfig, stage: str, inputs: dict) -> dict:
    """A stage's recipe values: its recipe file, then the pipeline's overrides, then the pipeline's inputs."""
    from align.config import read_yaml

    block = dict(getattr(config, stage))
    recipe_path = block.pop("recipe", None)
    values = read_yaml(recipe_path) if recipe_path else {}
    values |= block
    values |= {key: value for key, value in inputs.items() if key in _fields(stage)}
    source = f"pipeline {stage}" + (f" ({recipe_path})" if recipe_path else "")
    try:
        build_config(stage_config_class(stage), values, source=source)
    except AlignError as exc:
        raise ValueError(str(exc)) from None
    return values


def stage_config_class(stage: str):
    """The config class of a stage: what its recipes (recipes/STAGE/*.yaml) and its pipeline block map onto."""
    if stage == "sft":
        from align.sft import SFTStageConfig as config_class
    elif stage == "rm":
        from reward.train import RewardStageConfig as config_class
    elif stage == "dpo":
        from align.dpo import DPOStageConfig as config_class
    elif stage == "kto":
        from align.kto import KTOStageConfig as config_class
    elif stage == "ppo":
        from align.ppo import PPOStageConfig as config_class
    elif stage == "pipeline":
        config_class = PipelineConfig
    else:
        raise AlignError(f"no stage '{stage}': known stages are sft, rm, dpo, kto, ppo and pipeline")
    return config_class


def _fields(stage: str) -> set[str]:
    return {f.name for f in dataclasses.fields(stage_config_class(stage))}


class Pipeline:
    def __init__(self, config: PipelineConfig, registry: Registry):
        self.config, self.registry = config, registry
        self.outputs: dict[str, str] = {}  # name -> pinned reference, filled step by step

    def run(self, *, start: str | None = None, until: str | None = None) -> dict:
        steps = [step for step in STEPS if step in self.config.steps]
        for name, value in (("--from", start), ("--until", until)):
            if value is not None and value not in steps:
                raise AlignError(f"{name} {value}: not a step of this pipeline ({', '.join(steps)})")
        forced = steps[steps.index(start) :] if start else []
        last = steps.index(until) if until else len(steps) - 1
        for step in steps[: last + 1]:
            self._step(step, force=step in forced)
        return self.outputs

    def _step(self, step: str, *, force: bool) -> None:
        settings = self._settings(step)
        fingerprint = sha256(json.dumps({"step": step, **settings}, sort_keys=True, default=str).encode()).hexdigest()
        previous = None if force else self._completed(step, fingerprint)
        if previous is not None:
            self.outputs |= previous.metrics["outputs"]
            print(f"[{step}] reused {', '.join(previous.metrics['outputs'].values())} (run {previous.id})")
            return
        print(f"[{step}] running ...")
        record = self.registry.start_run(
            f"pipeline-{step}",
            config={"fingerprint": fingerprint, **settings},
            inputs=sorted(set(_refs(settings))),
            seed=self.config.seed,
        )
        try:
            made = getattr(self, f"step_{step}")()
        except BaseException as exc:
            self.registry.finish_run(record, status="failed", error=f"{type(exc).__name__}: {exc}")
            raise AlignError(
                f"pipeline step '{step}' failed: {exc}. Outputs of the earlier steps stay registered; "
                f"rerun the same command to continue from this step."
            ) from exc
        self.outputs |= made
        self.registry.finish_run(record, metrics={"outputs": made}, outputs=list(made.values()))
        print(f"[{step}] made {', '.join(made.values())}")

    def _completed(self, step: str, fingerprint: str):
        for run in reversed(self.registry.list_runs()):
            if (
                run.stage == f"pipeline-{step}"
                and run.status == "completed"
                and run.config.get("fingerprint") == fingerprint
                and self._still_there(run.metrics.get("outputs", {}))
            ):
                return run
        return None

    def _still_there(self, outputs: dict) -> bool:
        try:
            for ref in outputs.values():
                if ref.split(":", 1)[0] in ("adapter", "rm", "model"):
                    self.registry.resolve_artifact(ref)
                elif not ref.startswith("run:"):
                    self.registry.resolve(ref)
        except AlignError:
            return False
        return True

    def _settings(self, step: str) -> dict:
        """What a step's result depends on: its settings and the pinned outputs of the steps before it."""
        config = self.config
        needs = {
            "import": {},
            "expand": {"sft_data": "sft_data"},
            "sft": {"sft_data": "sft_data"},
            "generate": {"sft": "sft", "sft_test": "sft_test"},
            "preferences": {"candidates": "candidates", "prefs_train": "prefs_train"},
            "rm": {"train_prefs": "train_prefs", "test_prefs": "test_prefs"},
            "dpo": {"sft": "sft", "train_prefs": "train_prefs", "test_prefs": "test_prefs"}
            | ({"rm": "rm"} if config.dpo_pairs == "rm" else {}),
            "kto": {"sft": "sft", "train_prefs": "train_prefs", "test_prefs": "test_prefs"},
            "ppo": {"sft": "sft", "rm": "rm", "train_prefs": "train_prefs"},
            "eval": {"sft": "sft", "dpo": "dpo", "kto": "kto", "ppo": "ppo", "rm": "rm", "test_prefs": "test_prefs"},
        }[step]
        inputs = {key: self.outputs.get(source) for key, source in needs.items()}
        files = {}
        if step == "import":
            files = {path: _file_hash(Path(path)) for path in (config.sft_data, config.preference_data)}
        blocks = ("expand", "sft", "generate", "rm", "dpo", "kto", "ppo", "eval")
        block = getattr(config, step, {}) if step in blocks else {}
        recipe = block.get("recipe")
        recipe_text = Path(recipe).read_text(encoding="utf-8") if recipe else None
        votes = None
        if step == "preferences" and config.preferences == "labels" and inputs["candidates"]:
            # New votes in the ranking UI make new preferences: the vote count is part of the fingerprint.
            candidates = self.registry.resolve(inputs["candidates"])
            votes = self.registry.labels.count_rows(candidates.id)
        if step == "expand" and config.expand.get("review", True):
            # New reviews make new SFT data: the decisions on the expansion so far are part of the fingerprint.
            made = [v for v in self.registry.list_datasets() if v.name == EXPANDED]
            votes = self.registry.labels.count_rows(made[-1].id) if made else None
        return {
            "inputs": inputs,
            "files": files,
            "block": block,
            "recipe_text": recipe_text,
            "base_model": config.base_model,
            "seed": config.seed,
            "test_sizes": [config.sft_test_size, config.preference_test_size],
            "preferences": config.preferences if step == "preferences" else None,
            "votes": votes,
            "on_policy": {"dpo_pairs": config.dpo_pairs, **config.on_policy} if step == "dpo" else None,
        }

    # The steps. Each returns the references it made.

    def _train(self, stage: str, config_class, run_stage, inputs: dict) -> dict:
        """A training stage on its recipe block plus the `inputs` the earlier steps made: {stage: artifact}."""
        values = stage_recipe(self.config, stage, inputs)
        config = build_config(config_class, values, source=f"pipeline {stage}")
        return {stage: run_stage(config, self.registry, recipe=values).ref}

    def step_import(self) -> dict:
        registry, config = self.registry, self.config
        sft, _ = registry.import_file(config.sft_data, name="pipeline-sft", kind="sft")
        sft_train, sft_test = registry.split(sft, test_size=config.sft_test_size, seed=config.seed)
        prefs, _ = registry.import_file(config.preference_data, name="pipeline-prefs", kind="preference")
        prefs_train, prefs_test = registry.split(prefs, test_size=config.preference_test_size, seed=config.seed)
        return {
            "sft_data": sft_train.ref,
            "sft_test": sft_test.ref,
            "prefs_train": prefs_train.ref,
            "prefs_test": prefs_test.ref,
        }

    def step_expand(self) -> dict:
        """align expand on the SFT train data (an expansion with the same settings is reused, an interrupted one
        resumed), then the reviewed rows (or, unreviewed, all of them) after the seeds."""
        from align.expand import plan, resume_expansion
        from align.review import from_review

        registry, block = self.registry, self.config.expand
        settings, sampling = expand_settings(block, seed=self.config.seed)
        model = block.get("model", self.config.base_model)
        job = plan(registry, self.outputs["sft_data"], name=EXPANDED, model=model, settings=settings, sampling=sampling)
        expanded = None
        for run in reversed(registry.list_runs()):
            if run.stage == "expand" and run.config == job:
                if run.status == "completed":
                    expanded = registry.resolve(run.outputs[0])
                    print(f"[expand] reused {expanded.ref} (run {run.id})")
                else:
                    expanded, _ = resume_expansion(registry, run.id)
                break
        if expanded is None:
            from align.expand import expand_data

            expanded, _ = expand_data(registry, job["from"], name=EXPANDED, model=model, settings=settings,
                                      sampling=sampling)  # fmt: skip
        if block.get("review", True):
            clean, _, _ = from_review(registry, expanded.ref, name="pipeline-sft-reviewed", with_seeds=True)
        else:
            seeds = registry.resolve(job["from"])
            rows = registry.rows(seeds) + registry.rows(expanded)
            parents = [(seeds, "seeds"), (expanded, "expanded")]
            clean = registry.register(rows, name="pipeline-sft-expanded", kind="sft", parents=parents)
        return {"expanded": expanded.ref, "sft_data": clean.ref}

    def step_sft(self) -> dict:
        from align.sft import SFTStageConfig, run_sft

        inputs = {"model": self.config.base_model, "dataset": self.outputs["sft_data"], "seed": self.config.seed}
        return self._train("sft", SFTStageConfig, run_sft, inputs)

    def step_generate(self) -> dict:
        prompts = self.registry.convert(self.outputs["sft_test"], name="pipeline-prompts", kind="prompts")
        models = [self.outputs["sft"], self.config.base_model]
        version = self._candidates(models, prompts.ref, self.config.generate, n=2, name="pipeline-candidates")
        return {"candidates": version.ref}

    def _candidates(self, models: list[str], prompts_ref: str, block: dict, *, n: int, name: str):
        """align generate with a pipeline block's settings: n (replies per prompt; `n` is the default), limit, and
        the sampling settings."""
        from align.generate import SamplingSettings, generate_candidates

        sampling = {key: value for key, value in block.items() if key not in ("n", "limit")}
        settings = SamplingSettings(seed=self.config.seed, **sampling)
        return generate_candidates(
            self.registry,
            models,
            prompts_ref,
            n=block.get("n", n),
            name=name,
            limit=block.get("limit"),
            settings=settings,
        )

    def step_preferences(self) -> dict:
        if self.config.preferences == "import":
            return {"train_prefs": self.outputs["prefs_train"], "test_prefs": self.outputs["prefs_test"]}
        from align.labels import from_labels

        version, _, _ = from_labels(self.registry, self.outputs["candidates"], name="pipeline-labels")
        # Human votes train; the imported held-out pairs stay the yardstick.
        return {"train_prefs": version.ref, "test_prefs": self.outputs["prefs_test"]}

    def step_rm(self) -> dict:
        from reward.train import RewardStageConfig, run_rm

        inputs = {
            "model": self.config.base_model,
            "dataset": self.outputs["train_prefs"],
            "eval_dataset": self.outputs["test_prefs"],
            "seed": self.config.seed,
        }
        return self._train("rm", RewardStageConfig, run_rm, inputs)

    def step_dpo(self) -> dict:
        from align.dpo import DPOStageConfig, run_dpo

        made = {} if self.config.dpo_pairs == "preferences" else {"dpo_pairs": self._on_policy_pairs()}
        inputs = {
            "model": self.outputs["sft"],
            "dataset": made.get("dpo_pairs", self.outputs["train_prefs"]),
            "eval_dataset": self.outputs["test_prefs"],  # held-out human pairs, whatever DPO trains on
            "seed": self.config.seed,
        }
        return made | self._train("dpo", DPOStageConfig, run_dpo, inputs)

    def _on_policy_pairs(self) -> str:
        """The SFT adapter answers the train prompts n times; the reward model picks each prompt's best reply
        against its worst. DPO on such pairs moves what the policy writes, where off-policy pairs may only move
        its implicit reward."""
        from reward.score import score_dataset

        prompts = self.registry.convert(self.outputs["train_prefs"], name="pipeline-dpo-prompts", kind="prompts")
        candidates = self._candidates(
            [self.outputs["sft"]], prompts.ref, self.config.on_policy, n=4, name="pipeline-on-policy"
        )
        pairs, _ = score_dataset(self.registry, self.outputs["rm"], candidates.ref, "pipeline-on-policy-pairs")
        return pairs.ref

    def step_kto(self) -> dict:
        from align.kto import KTOStageConfig, run_kto
        from align.registry.schemas import unpair

        made = {}
        for key, name in (("train_prefs", "pipeline-feedback"), ("test_prefs", "pipeline-feedback-test")):
            pairs = self.registry.resolve(self.outputs[key])
            made[name] = self.registry.register(
                unpair(self.registry.rows(pairs)), name=name, kind="feedback", parents=[(pairs, "pairs")]
            ).ref
        inputs = {
            "model": self.outputs["sft"],
            "dataset": made["pipeline-feedback"],
            "eval_dataset": made["pipeline-feedback-test"],
            "seed": self.config.seed,
        }
        return {"kto_feedback": made["pipeline-feedback"]} | self._train("kto", KTOStageConfig, run_kto, inputs)

    def step_ppo(self) -> dict:
        from align.ppo import PPOStageConfig, run_ppo

        prompts = self.registry.convert(self.outputs["train_prefs"], name="pipeline-rl-prompts", kind="prompts")
        inputs = {
            "model": self.outputs["sft"],
            "reward_model": self.outputs["rm"],
            "dataset": prompts.ref,
            "seed": self.config.seed,
        }
        return self._train("ppo", PPOStageConfig, run_ppo, inputs)

    def step_eval(self) -> dict:
        from align.eval_report import print_summary
        from align.evaluate import EvalOptions, run_eval
        from align.generate import SamplingSettings

        block = dict(self.config.eval)
        prompts = self.registry.convert(self.outputs["test_prefs"], name="pipeline-eval-prompts", kind="prompts")
        models = [self.config.base_model]
        models += [self.outputs[key] for key in ("sft", "dpo", "kto", "ppo") if key in self.outputs]
        settings = SamplingSettings(
            seed=self.config.seed,
            max_new_tokens=block.get("max_new_tokens", 64),
            temperature=0.0,
            batch_size=block.get("batch_size", 8),
            dtype=block.get("dtype"),
        )
        options = EvalOptions(
            models=models,
            prompts=prompts.ref,
            rm=self.outputs.get("rm"),
            baseline=self.outputs["sft"],
            limit=block.get("limit"),
            bootstrap=block.get("bootstrap", 1000),
            few_shot=block.get("few_shot", 0),
            sampling=settings,
            name="pipeline-eval",
        )
        result = run_eval(self.registry, options)
        print(
            f"evaluation on held-out prompts, judged by {self.outputs.get('rm')}; win rates are against the "
            f"SFT adapter {self.outputs['sft']} (the base's win rate below 0.5 means SFT beat the base):"
        )
        print_summary(result)
        return {"eval": result.version.ref, "eval_run": f"run:{result.run.id}"}


EXPANDED = "pipeline-expanded"


def _refs(settings: dict) -> list[str]:
    return [value for value in settings["inputs"].values() if isinstance(value, str)]


def _file_hash(path: Path) -> str:
    if not path.is_file():
        raise AlignError(f"pipeline input {path} does not exist")
    return sha256(path.read_bytes()).hexdigest()


def main(config_path: str, *, workspace: str | None = None, start: str | None = None, until: str | None = None):
    from align.config import read_yaml

    config = build_config(PipelineConfig, read_yaml(config_path), source=config_path)
    registry = Registry(workspace)
    outputs = Pipeline(config, registry).run(start=start, until=until)
    print("\npipeline outputs:")
    for name, ref in outputs.items():
        print(f"  {name:12} {ref}")
    return outputs
