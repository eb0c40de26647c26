"""The training stages (`align sft|rm|dpo|ppo`), reward-model evaluation and scoring, `align merge`, `align pipeline`.

A stage runs from a recipe plus `--key value` overrides of any key of its config. The config class comes with the
stage's module, imported only when the stage runs or its --help is asked for, so `align --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import re
import socket
import subprocess
import sys
import types
import typing

from align.cli.common import add_model_list, open_registry, print_table
from align.errors import AlignError
from align.models import DTYPE_NAMES

# Each stage's config class and entry point, from its module (imported here, when needed)


def sft_stage():
    from align import sft

    return sft.SFTStageConfig, sft.main


def rm_stage():
    from reward import train

    return train.RewardStageConfig, train.main


def dpo_stage():
    from align import dpo

    return dpo.DPOStageConfig, dpo.main


def kto_stage():
    from align import kto

    return kto.KTOStageConfig, kto.main


def ppo_stage():
    from align import ppo

    return ppo.PPOStageConfig, ppo.main


def add_stage(commands, common, name: str, stage, *, help: str, description: str) -> argparse.ArgumentParser:
    """`align NAME [--config RECIPE.yaml] [--resume [RUN_ID]] [--KEY VALUE ...]`; its --help lists every key."""
    p = commands.add_parser(
        name,
        parents=[common],
        add_help=False,
        allow_abbrev=False,
        usage="%(prog)s [-h] [--workspace DIR] [--config RECIPE.yaml] [--resume [RUN_ID]] [--KEY VALUE ...]",
        help=help,
        description=description + " Every recipe key can be given on the command line as --KEY VALUE, over the "
        "recipe's value; -h lists them all.",
    )
    p.add_argument("-h", "--help", action=RecipeHelp, help="show this help, with every recipe key, and exit")
    p.add_argument("--config", metavar="RECIPE.yaml", help=f"recipe, e.g. recipes/{name}/smollm2-135m-lora.yaml")
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="RUN_ID",
        help=f"continue the last interrupted {name} run (or RUN_ID) from its last checkpoint, with the recipe it "
        "started with",
    )
    p.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help="run in N processes (data parallel): starts `accelerate launch --multi_gpu --num_processes N -m align "
        f"{name} ...` for you, one process per GPU, or N on a CPU (gloo). For other set-ups (FSDP, DeepSpeed, several "
        "machines) call accelerate launch with a config from recipes/accelerate/",
    )
    p.set_defaults(handler=run_stage, stage=stage, accepts_overrides=True, distributed=True)  # see align.distributed
    return p


def run_stage(args) -> int:
    from align.config import check_overrides, parse_overrides

    config_class, stage_main = args.stage()
    if not args.resume:  # a resumed run takes the recipe it started with, and ignores the command line's
        check_overrides(config_class, parse_overrides(args.overrides))  # a misspelt key fails here, once
    if args.num_processes is not None and args.num_processes != 1:
        return _launch(args)
    stage_main(args.config, args.overrides, workspace=args.workspace, resume=args.resume)
    return 0


def _launch(args) -> int:
    """`--num-processes N`: the same command again, N times under accelerate launch, which this process waits for."""
    from align.distributed import world_size

    if args.num_processes < 2:
        raise AlignError(f"--num-processes must be 1 or more (got {args.num_processes})")
    if world_size() > 1:
        raise AlignError("--num-processes starts a launch itself: drop it when running under accelerate launch")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1"]
    command += ["--num_processes", str(args.num_processes), "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["--main_process_port", str(free_port())]  # two launches on one machine would meet on 29500
    command += ["-m", "align", args.command]  # accelerate starts each process with this Python
    command += ["--workspace", str(args.workspace)] if hasattr(args, "workspace") else []
    command += (["--config", args.config] if args.config else []) + _resume_flag(args.resume) + args.overrides
    print("running: " + " ".join(command), flush=True)
    return subprocess.run(command).returncode


def free_port() -> int:
    """A TCP port nothing on this machine listens on now, for the launch's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _resume_flag(resume) -> list[str]:
    if not resume:
        return []
    return ["--resume"] if resume is True else ["--resume", resume]


class RecipeHelp(argparse.Action):
    """-h/--help of a stage: its options, then every key of its config with type, default and help, grouped by the
    class that declares it (the stage's own, then TRL's and transformers' it inherits), as TRL's TrlParser shows."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        config_class, _ = parser.get_default("stage")()
        add_recipe_keys(parser, config_class)
        parser.print_help()
        parser.exit()


def add_recipe_keys(parser: argparse.ArgumentParser, config_class) -> None:
    """An argument group per declaring class, listing (not parsing: overrides stay with align.config) its keys."""
    hints = typing.get_type_hints(config_class)
    groups: dict[type, list] = {}
    for field in dataclasses.fields(config_class):
        if field.init:
            owner = next(c for c in config_class.__mro__ if field.name in c.__dict__.get("__annotations__", {}))
            groups.setdefault(owner, []).append(field)
    for owner in sorted(groups, key=config_class.__mro__.index):
        group = parser.add_argument_group(f"recipe keys from {owner.__name__} ({owner.__module__})")
        for field in groups[owner]:
            text = field.metadata.get("help", "").replace("%", "%%")
            group.add_argument(
                f"--{field.name}",
                dest=f"recipe_key_{field.name}",  # never parsed: the group exists only while the help prints
                metavar=_type_name(hints.get(field.name)),
                default=argparse.SUPPRESS,
                help=f"{text} (default: {_default_text(field)})".lstrip(),
            )


def _type_name(annotation) -> str:
    """int, str | None, list[str] | str, SchedulerType | str: module paths dropped, as in the source."""
    if annotation is None:
        return "VALUE"
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(member) for member in typing.get_args(annotation))
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return re.sub(r"\b[a-z_][\w.]*\.(?=[A-Za-z_])", "", str(annotation))


def _default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    return str(value.value if isinstance(value, enum.Enum) else value)  # an enum: its value, as a recipe has it


def add_sft(commands, common) -> None:
    add_stage(
        commands,
        common,
        "sft",
        sft_stage,
        help="supervised fine-tuning (LoRA by default) on an sft dataset",
        description="Train TRL's SFTTrainer from a recipe (e.g. --max_steps 20 --dataset seed-tasks@1).",
    )


def add_rm(commands, common) -> None:
    """`align rm --config X` trains; `align rm eval ...` and `align rm score ...` use a reward model."""
    p = add_stage(
        commands,
        common,
        "rm",
        rm_stage,
        help="reward models: train one, evaluate it on preference data, score rows with it",
        description="Without an action: train a reward model (TRL's RewardTrainer, LoRA) from a recipe (e.g. "
        "--dataset hh-harmless-train --max_steps 30). `align rm eval` and `align rm score` apply a reward model "
        "to a registry version.",
    )
    p.usage += "\n       %(prog)s {eval,score} ..."
    rm_actions = p.add_subparsers(dest="rm_action", metavar="[ACTION]", action=_TrainOrActions, prog=p.prog)
    q = rm_actions.add_parser(
        "eval",
        parents=[common],
        help="pairwise accuracy, margin, calibration and length bias on a preference version",
        description="Pairwise accuracy, margin, calibration and length bias on a preference version; with a reward "
        "model trained with --objectives, each attribute head's accuracy on the pairs whose rubric scores differ.",
    )
    add_model_list(
        q,
        "--rm",
        required=True,
        metavar="REF1[,REF2,...]",
        help="rm:NAME[@V], comma-separated to compare side by side; a base model means an untrained head",
    )
    _add_rm_options(q)
    q.set_defaults(handler=cmd_rm_eval, accepts_overrides=False, distributed=False)
    q = rm_actions.add_parser(
        "score",
        parents=[common],
        help="score a candidates or preference version; registers the pairs it labels",
        description="Score a candidates or preference version; registers the pairs it labels.",
    )
    q.add_argument("--rm", required=True, metavar="REF", help="rm:NAME[@V]; a base model: an untrained head")
    _add_rm_options(q, name="name of the scored (preference) dataset")
    q.set_defaults(handler=cmd_rm_score, accepts_overrides=False, distributed=False)


def _add_rm_options(q, *, name: str | None = None) -> None:
    q.add_argument("--data", required=True, metavar="DATASET[@V]")
    if name:
        q.add_argument("--name", required=True, help=name)
    q.add_argument("--max-length", type=int, help="tokens per pair (default: the model's training max_length)")
    q.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    q.add_argument("--seed", type=int, default=0, help="seed of an untrained head (default: 0)")


def add_ppo(commands, common) -> None:
    add_stage(
        commands,
        common,
        "ppo",
        ppo_stage,
        help="PPO (or RLOO / GRPO) of an SFT adapter against a reward model",
        description="Our PPO loop with policy, reference and value as LoRA adapters on one base model, or TRL's "
        "RLOO / GRPO with `algo: rloo|grpo`.",
    )


def add_dpo(commands, common) -> None:
    add_stage(
        commands,
        common,
        "dpo",
        dpo_stage,
        help="DPO of an SFT adapter (or a base model) on a preference dataset",
        description="Train TRL's DPOTrainer from a recipe: the SFT adapter is the frozen reference, the policy a "
        "LoRA copy of it on the same base (e.g. --max_steps 20 --loss_type robust --label_smoothing auto).",
    )


def add_kto(commands, common) -> None:
    add_stage(
        commands,
        common,
        "kto",
        kto_stage,
        help="KTO of an SFT adapter (or a base model) on a feedback dataset (replies labelled good or bad)",
        description="Train TRL's KTOTrainer from a recipe on unpaired feedback (thumbs votes, both-bad votes, a TRL "
        "KTO file): the SFT adapter is the frozen reference, the policy a LoRA copy of it on the same base.",
    )


def add_merge(commands, common) -> None:
    p = commands.add_parser(
        "merge",
        parents=[common],
        help="merge a LoRA adapter into full safetensors weights",
        description="Write the base model with the adapter merged in (loads with plain transformers) and register "
        "it as model:NAME-merged. The adapter itself is left as it is.",
    )
    p.add_argument("ref", metavar="adapter:NAME[@V]")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder for the merged model")
    p.add_argument("--name", help="artifact name (default: NAME-merged)")
    p.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        default="auto",
        help="weights' dtype (default: the base checkpoint's)",
    )
    p.set_defaults(handler=cmd_merge)


def add_pipeline(commands, common) -> None:
    p = commands.add_parser(
        "pipeline",
        parents=[common],
        help="the whole loop: import, SFT, candidates, preferences, RM, DPO, PPO, eval",
        description="Runs the steps in order; a step whose output already exists for the same inputs and "
        "settings is reused, so a rerun is cheap and continues after a failure.",
    )
    p.add_argument("--config", required=True, metavar="RECIPE.yaml", help="e.g. recipes/pipeline/smollm2-135m.yaml")
    p.add_argument("--from", dest="start", metavar="STEP", help="rerun from this step (and everything after it)")
    p.add_argument("--until", metavar="STEP", help="stop after this step")
    p.set_defaults(handler=cmd_pipeline)


def add_sweep(commands, common) -> None:
    p = commands.add_parser(
        "sweep",
        parents=[common],
        help="search a stage's recipe keys with Optuna, choosing on a validation split",
        description="Each trial is a registered run of the stage on a split carved from the training data and is "
        "scored on the rest of it; the test data is read once, by the winner. The study is kept in "
        "WORKSPACE/sweeps/STUDY.sqlite: rerun the same command to resume it, or start a second process to join it.",
    )
    p.add_argument("--config", required=True, metavar="SWEEP.yaml", help="e.g. recipes/sweep/rm-smollm2.yaml")
    p.add_argument("--n-trials", type=int, metavar="N", help="finished trials to reach (default: the recipe's)")
    p.add_argument("--study", metavar="NAME", help="study name (default: the recipe's, else STAGE-sweep)")
    p.add_argument("--write-recipe", metavar="PATH", help="also write the winning recipe here")
    p.set_defaults(handler=cmd_sweep)


def cmd_sweep(args) -> int:
    from align.sweep import main as sweep_main

    overrides = {"study": args.study} if args.study else {}
    sweep_main(args.config, overrides, workspace=args.workspace, n_trials=args.n_trials, write_recipe=args.write_recipe)
    return 0


class _TrainOrActions(argparse._SubParsersAction):
    """Optional actions after `align rm`. A word that names no action is the value of a `--key value` override
    (`align rm --dataset hh --max_steps 5`): it goes back to the overrides, and the rest parses as usual."""

    class _OpenChoices:
        """The actions (for help and the --help walk); `in` is true for any word, because argparse checks a word
        against the choices before it calls the action, which decides."""

        def __init__(self, parsers: dict):
            self.parsers = parsers

        def __contains__(self, name) -> bool:
            return True

        def __iter__(self):
            return iter(self.parsers)

        def __getitem__(self, name):
            return self.parsers[name]

        def items(self):
            return self.parsers.items()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.choices = self._OpenChoices(self._name_parser_map)

    def __call__(self, parser, namespace, values, option_string=None):
        if values[0] in self._name_parser_map:
            return super().__call__(parser, namespace, values, option_string)
        _, rest = parser.parse_known_args(values[1:], namespace)
        setattr(namespace, argparse._UNRECOGNIZED_ARGS_ATTR, [values[0], *rest])


def cmd_rm_eval(args) -> int:
    from align.stats import against_chance
    from reward.metrics import head_lines, headline
    from reward.score import evaluate_rm

    registry = open_registry(args)
    results = [
        evaluate_rm(registry, ref, args.data, max_length=args.max_length, batch_size=args.batch_size, seed=args.seed)
        for ref in args.rm
    ]
    rows = [("METRIC", *(ref if ref.startswith("rm:") else f"{ref} (untrained)" for ref in args.rm))]
    for key in headline(results[0][1]):
        values = [metrics.get(key) for _, metrics in results]
        rows.append((key, *(f"{v:.4f}" if isinstance(v, float) else str(v) for v in values)))
    print_table(rows)
    for ref, (run, metrics) in zip(args.rm, results):
        accuracy = against_chance(metrics["accuracy"], metrics["pairs"])
        heads = head_lines(metrics)
        print(f"{ref}: {'preference head: ' if heads else ''}accuracy {accuracy}; report {run.dir / 'report.md'}")
        for line in heads:
            print(f"  {line}")
    return 0


def cmd_rm_score(args) -> int:
    from reward.score import score_dataset

    version, agreement = score_dataset(
        open_registry(args),
        args.rm,
        args.data,
        args.name,
        max_length=args.max_length,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    agrees = "" if agreement is None else f"  (agrees with the source's labels on {100 * agreement:.1f}%)"
    print(f"{version.ref}  {version.num_rows} rows  kind=preference{agrees}")
    return 0


def cmd_merge(args) -> int:
    from align.merge import merge_adapter

    out, artifact, difference = merge_adapter(open_registry(args), args.ref, args.out, name=args.name, dtype=args.dtype)
    print(f"{artifact.ref}  {out}  (merged {args.ref}; max |logit difference| {difference:.1e})")
    return 0


def cmd_pipeline(args) -> int:
    from align.pipeline import main as pipeline_main

    pipeline_main(args.config, workspace=args.workspace, start=args.start, until=args.until)
    return 0
