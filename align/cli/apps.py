"""Commands that put models to work: generate, label, compare, serve, eval, chat.

A list of models is one flag with comma-separated references, `--models A,B`, on every command (and `--rm A,B`
on `align rm eval`). Repeating the flag, or `align generate`'s former `--model A --model B`, still works and
prints a deprecation note.
"""

from __future__ import annotations

from align.cli.common import add_model_list, add_sampling, open_registry, sampling_settings
from align.errors import AlignError


def add_generate(commands, common) -> None:
    p = commands.add_parser(
        "generate",
        parents=[common],
        help="sample candidates from one or more models",
        description="N completions per prompt from each model, registered as a candidates version for the ranking UI.",
    )
    add_model_list(
        p,
        alias="--model",
        metavar="REF1[,REF2,...]",
        help="model references, comma-separated (e.g. an adapter and its base, to compare them)",
    )
    p.add_argument("--prompts", metavar="DATASET[@V]", help="a prompts dataset (required unless --resume)")
    p.add_argument("--n", type=int, default=2, help="completions per prompt per model (default: 2)")
    p.add_argument("--name", help="name of the candidates dataset (required unless --resume)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    add_sampling(p, seed_help=None)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_ID",
                   help="continue the last interrupted generate run (or RUN_ID) with the settings it started with; "
                   "the replies it saved are kept")  # fmt: skip
    p.set_defaults(handler=cmd_generate)


def add_label(commands, common) -> None:
    p = commands.add_parser(
        "label",
        parents=[common],
        help="the ranking app: people compare candidates, every vote goes to the registry",
        description="A Gradio app (and a JSON API under /label-api/) on a candidates version. Login is required "
        "whenever an annotator exists (`align annotators add`); --open runs with one local user instead. It binds "
        "to 127.0.0.1; --expose makes a non-loopback --host possible and then requires login.",
    )
    p.add_argument("--candidates", required=True, metavar="CANDS[@V]", help="a candidates dataset")
    p.add_argument(
        "--mode",
        choices=("pairwise", "rank", "thumbs"),
        default="pairwise",
        help="pairwise: A vs B (one pair per row); rank: order all completions, ties allowed; thumbs: one "
        "completion at a time, up or down, for KTO (default: pairwise)",
    )
    p.add_argument(
        "--rubric",
        metavar="ATTR1,ATTR2",
        help="also score each completion shown 1-5 on these attributes, e.g. helpfulness,harmlessness,honesty",
    )
    _add_order(p)
    p.add_argument(
        "--overlap", type=int, help="distinct annotators per item (default: 2; 1 with --open, its single user)"
    )
    _add_address(p)
    p.add_argument(
        "--open", action="store_true", help="no login: a single local user ('local', an admin), loopback only"
    )
    p.add_argument(
        "--lease-minutes",
        type=float,
        default=10.0,
        help="how long an item stays reserved for the annotator it was shown to (default: 10)",
    )
    p.set_defaults(handler=cmd_label)


def add_compare(commands, common) -> None:
    p = commands.add_parser(
        "compare",
        parents=[common],
        help="side-by-side chat, blind battles whose votes go to the registry, and the arena leaderboard",
        description="A Gradio app: two models answer side by side, streaming; battle mode hides the names until "
        "the vote; the leaderboard shows Bradley-Terry ratings with bootstrap intervals, Elo and win rates. "
        "Login is required whenever an annotator exists; --open runs with one local user instead. It binds to "
        "127.0.0.1; --expose makes a non-loopback --host possible and then requires login. With --leaderboard, "
        "print the arena's leaderboard and exit. `align data from-labels arena:NAME` turns the votes into "
        "preference data.",
    )
    add_model_list(p, alias="--model", metavar="REF1,REF2[,...]", help="two or more model references, comma-separated")
    p.add_argument("--arena", default="default", metavar="NAME", help="the arena the votes go to (default: default)")
    _add_address(p)
    p.add_argument("--open", action="store_true", help="no login: a single local user ('local'), loopback only")
    p.add_argument("--system", default="", help="the default system prompt (editable in the app)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default: 256 (editable in the app)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy (default: 0.7, editable in the app)")
    p.add_argument("--top-p", type=float, default=0.9, help="default: 0.9 (editable in the app)")
    p.add_argument("--leaderboard", action="store_true", help="print the arena's leaderboard and exit")
    p.add_argument("--plot", metavar="FILE.png", help="with --leaderboard: also write the win-rate heatmap")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    p.set_defaults(handler=cmd_compare)


def add_serve(commands, common) -> None:
    p = commands.add_parser(
        "serve",
        parents=[common],
        help="one app for the loop: Label, Compare / Arena, Leaderboard, Datasets (with lineage), Runs",
        description="A Gradio app with every tab on one workspace. It binds to 127.0.0.1; --expose makes a "
        "non-loopback --host possible and then requires login (annotators from `align annotators add`). On "
        "loopback, login is required whenever an annotator exists, and otherwise one local user is served.",
    )
    _add_address(p)
    add_model_list(
        p,
        alias="--model",
        metavar="REF1,REF2[,...]",
        help="the Compare / Arena models (default: the base models and the newest adapters, at most 6)",
    )
    p.add_argument(
        "--candidates", metavar="CANDS[@V]", help="the candidates the Label tab opens on (default: the newest)"
    )
    p.add_argument(
        "--mode", choices=("pairwise", "rank", "thumbs"), default="pairwise", help="labeling mode (default: pairwise)"
    )
    p.add_argument(
        "--rubric", metavar="ATTR1,ATTR2", help="the Label tab also scores each completion 1-5 on these attributes"
    )
    _add_order(p)
    p.add_argument("--overlap", type=int, help="distinct annotators per item (default: 2 with login, else 1)")
    p.add_argument("--arena", default="default", metavar="NAME", help="the arena battle votes go to (default: default)")
    p.add_argument("--lease-minutes", type=float, default=10.0, help="how long an item is held for its annotator")
    p.add_argument("--max-new-tokens", type=int, default=256, help="default: 256 (editable in the app)")
    p.add_argument("--temperature", type=float, default=0.7, help="default: 0.7 (editable in the app)")
    p.set_defaults(handler=cmd_serve)


def add_eval(commands, common) -> None:
    p = commands.add_parser(
        "eval",
        parents=[common],
        help="every model answers held-out prompts; rewards, win rates, KL and reference metrics with intervals",
        description="Generates on the prompts with every model (plus an optional few-shot base-model baseline), "
        "then reports with 95% bootstrap intervals: mean reward and win rate against the baseline by the reward "
        "model, a length-controlled win rate, reply length, KL to a reference model, and ROUGE/BLEU/METEOR "
        "against reference answers. Writes runs/ID/report.md with plots and registers the generations.",
    )
    add_model_list(p, alias="--model", metavar="REF_A,REF_B[,...]", help="model references, comma-separated (the "
                   "first is the baseline unless --baseline)")  # fmt: skip
    p.add_argument("--prompts", metavar="DATASET[@V]", help="a prompts dataset (held out from training)")
    p.add_argument("--rm", metavar="REF", help="reward model: rm:NAME[@V] (a base model: an untrained head)")
    p.add_argument("--references", action="store_true", help="ROUGE, BLEU and METEOR against the prompts' references")
    p.add_argument("--baseline", metavar="REF", help="the row win rates are measured against (default: the first)")
    p.add_argument("--kl-reference", metavar="REF", help="report KL(model || REF) on each model's own replies")
    p.add_argument("--few-shot", type=int, default=0, metavar="K", help="add the base model prompted with K examples")
    p.add_argument("--few-shot-from", metavar="DATASET[@V]", help="sft (or prompts with references) to take the "
                   "examples from (default: the other prompts' reference answers)")  # fmt: skip
    p.add_argument("--few-shot-model", metavar="REF", help="the few-shot model (default: the first adapter's base)")
    p.add_argument("--name", help="name of the generations (candidates) dataset (default: eval-PROMPTS)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    add_sampling(p, seed_help="sampling and bootstrap seed (default: 0)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals (default: 1000)")
    p.add_argument("--rm-max-length", type=int, help="tokens per scored reply (default: the reward model's own)")
    p.add_argument("--best-of", type=int, default=0, metavar="N", help="add a row: the baseline's model samples N "
                   "replies per prompt and --rm keeps its best (reranking without training)")  # fmt: skip
    p.add_argument("--best-of-temperature", type=float, default=0.8, help="sampling temperature of the best-of-N "
                   "row (default: 0.8)")  # fmt: skip
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_ID",
                   help="continue the last interrupted eval run (or RUN_ID); finished models are kept")  # fmt: skip
    p.set_defaults(handler=cmd_eval)


def add_chat(commands, common) -> None:
    p = commands.add_parser(
        "chat",
        parents=[common],
        help="terminal chat with any model reference",
        description="Streams replies token by token. Without --prompt it is an interactive, "
        "multi-turn chat: /reset clears the history, /exit (or Ctrl-D) quits.",
    )
    p.add_argument(
        "--model",
        default="smollm2-135m",
        metavar="REF",
        help="smollm2-135m, a HF id or folder, adapter:NAME[@V] (default: smollm2-135m)",
    )
    p.add_argument("--prompt", help="answer this one prompt and exit")
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int)
    p.set_defaults(handler=cmd_chat)


def _add_order(p) -> None:
    """Which item the ranking app serves next (align/label_order.py)."""
    p.add_argument(
        "--order",
        choices=("sequential", "random", "uncertainty"),
        default="sequential",
        help="which free item comes next: sequential (row order), random (a seeded shuffle; each annotator starts "
        "at their own place in it) or uncertainty (the items --rm is least sure of first: its preference "
        "probability sigmoid(r_a - r_b) nearest 1/2, in rank mode the smallest gap between adjacent scores; the "
        "reward model scores the items once, in the background, and row order serves until then) "
        "(default: sequential)",
    )
    p.add_argument("--rm", metavar="rm:NAME[@V]", help="the reward model of --order uncertainty")


def _add_address(p) -> None:
    """Where an app listens, and --expose, which lets it listen beyond this machine (ui.serving.check_exposure)."""
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=7860, help="default: 7860")
    p.add_argument("--expose", action="store_true", help="allow a non-loopback --host (login required)")


# Handlers


def cmd_generate(args) -> int:
    from align.generate import generate_candidates, resume_generation

    if args.resume:
        if args.models or args.prompts or args.name:
            print("resuming with the settings the run started with (the command line's are ignored)")
        version = resume_generation(open_registry(args), args.resume)
        print(f"{version.ref}  {version.num_rows} rows  kind=candidates")
        return 0
    if not args.models:
        raise AlignError("give the models to sample from: --models REF1[,REF2,...] (or --resume)")
    if not args.prompts or not args.name:
        raise AlignError("give the prompts and the name of the candidates: --prompts DATASET --name NAME (or --resume)")
    version = generate_candidates(
        open_registry(args),
        args.models,
        args.prompts,
        n=args.n,
        name=args.name,
        limit=args.limit,
        settings=sampling_settings(args),
    )
    print(f"{version.ref}  {version.num_rows} rows  kind=candidates")
    return 0


def cmd_label(args) -> int:
    from ui.label_app import run_label

    run_label(
        args.workspace,
        args.candidates,
        mode=args.mode,
        rubric=args.rubric,
        order=args.order,
        rm=args.rm,
        overlap=args.overlap if args.overlap is not None else 1 if args.open else 2,
        host=args.host,
        port=args.port,
        open_access=args.open,
        lease_minutes=args.lease_minutes,
        expose=args.expose,
    )
    return 0


def cmd_compare(args) -> int:
    if args.leaderboard:
        from ui.compare_app import print_leaderboard

        print_leaderboard(args.workspace, args.arena, bootstrap=args.bootstrap, seed=args.seed, plot=args.plot)
        return 0
    if not args.models:
        raise AlignError("give the models to compare: --models REF1,REF2 (or --leaderboard to print the ratings)")
    from ui.compare_app import ChatSettings, run_compare

    defaults = ChatSettings(args.system, args.max_new_tokens, args.temperature, args.top_p)
    run_compare(
        args.workspace,
        args.models,
        arena=args.arena,
        host=args.host,
        port=args.port,
        open_access=args.open,
        defaults=defaults,
        bootstrap=args.bootstrap,
        expose=args.expose,
    )
    return 0


def cmd_serve(args) -> int:
    from ui.compare_app import ChatSettings
    from ui.serve_app import run_serve

    run_serve(
        args.workspace,
        host=args.host,
        port=args.port,
        expose=args.expose,
        models=args.models or None,
        candidates=args.candidates,
        mode=args.mode,
        rubric=args.rubric,
        order=args.order,
        rm=args.rm,
        overlap=args.overlap,
        arena=args.arena,
        lease_seconds=args.lease_minutes * 60,
        defaults=ChatSettings("", args.max_new_tokens, args.temperature, 0.9),
    )
    return 0


def cmd_eval(args) -> int:
    from align.eval_report import print_summary
    from align.evaluate import EvalOptions, run_eval

    if args.resume:
        result = run_eval(open_registry(args), resume=args.resume)
    else:
        if not args.models or not args.prompts:
            raise AlignError("give --models REF_A,REF_B and --prompts DATASET (or --resume)")
        options = EvalOptions(
            models=args.models,
            prompts=args.prompts,
            rm=args.rm,
            references=args.references,
            baseline=args.baseline,
            kl_reference=args.kl_reference,
            few_shot=args.few_shot,
            few_shot_from=args.few_shot_from,
            few_shot_model=args.few_shot_model,
            limit=args.limit,
            name=args.name,
            bootstrap=args.bootstrap,
            rm_max_length=args.rm_max_length,
            best_of=args.best_of,
            best_of_temperature=args.best_of_temperature,
            sampling=sampling_settings(args),
        )
        result = run_eval(open_registry(args), options)
    print_summary(result)
    return 0


def cmd_chat(args) -> int:
    from align.chat import run_chat

    registry = open_registry(args) if ":" in args.model else None
    run_chat(
        args.model,
        registry=registry,
        prompt=args.prompt,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    return 0
