"""`align expand` (grow sft data with a model), `align review` (people check what it made) and
`align data from-review` (what they kept, as a new sft version)."""

from __future__ import annotations

from align.cli.common import add_sampling, open_registry, sampling_settings
from align.errors import AlignError
from align.models import EMBEDDED_ALIAS


def add_expand(commands, common) -> None:
    from align.expansion import OPERATORS

    p = commands.add_parser(
        "expand",
        parents=[common],
        help="grow sft data with a model: Self-Instruct or Evol-Instruct, filtered, for people to review",
        description="Self-Instruct writes new tasks from k tasks sampled from the pool and drops near-duplicates "
        "(ROUGE-L >= 0.7), too short or long tasks, tasks a text model cannot serve and unparseable output; "
        "Evol-Instruct rewrites tasks with --operators and drops copies and refusals. Each filter is counted. The "
        "kept rows are registered as an sft version, each with its method, parent or neighbours, and scores.",
    )
    p.add_argument("--from", dest="source", metavar="DATASET[@V]", help="the sft seed tasks (required unless --resume)")
    p.add_argument("--method", choices=("self-instruct", "evol"), default="self-instruct")
    p.add_argument("--n", type=int, default=200, help="rows to make (default: 200)")
    p.add_argument("--model", default=EMBEDDED_ALIAS, metavar="REF",
                   help=f"the model that writes (default: {EMBEDDED_ALIAS}, which writes weak tasks)")  # fmt: skip
    p.add_argument("--name", help="name of the sft dataset it makes (required unless --resume)")
    p.add_argument("--operators", metavar="OP[,OP...]",
                   help=f"evol: the rewrites, in turn (default: {','.join(OPERATORS)})")  # fmt: skip
    p.add_argument("--k", type=int, default=8, help="self-instruct: tasks shown per prompt (default: 8)")
    p.add_argument("--machine-k", type=int, default=2, help="self-instruct: of which machine-made (default: 2)")
    p.add_argument("--round-size", type=int, default=8, help="prompts per round (default: 8)")
    p.add_argument("--rouge-threshold", type=float, default=0.7, help="self-instruct: drop ROUGE-L >= this (0.7)")
    p.add_argument("--min-words", type=int, default=3, help="drop shorter instructions (default: 3)")
    p.add_argument("--max-words", type=int, default=150, help="drop longer instructions (default: 150)")
    p.add_argument("--max-rounds", type=int, help="stop after this many rounds (default: 4 per round of rows, >= 10)")
    add_sampling(p, seed_help=None, temperature=0.7)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_ID",
                   help="continue the last interrupted expand run (or RUN_ID) with the settings it started with; "
                   "the replies it saved are kept")  # fmt: skip
    p.set_defaults(handler=cmd_expand)


def add_review(commands, common) -> None:
    p = commands.add_parser(
        "review",
        parents=[common],
        help="the review app: people accept, edit or reject the rows align expand made",
        description="A Gradio app on the machine-made rows of an sft version, one at a time with its parent "
        "(evol) or nearest pool tasks (self-instruct). Every decision is saved as it is made. Login is required "
        "whenever an annotator exists (`align annotators add`); --open runs with one local user instead. It binds "
        "to 127.0.0.1; --expose makes a non-loopback --host possible and then requires login. "
        "`align data from-review DATA --name NAME` turns the decisions into a new sft version.",
    )
    p.add_argument("--data", required=True, metavar="DATASET[@V]", help="an sft version made by align expand")
    p.add_argument("--overlap", type=int, help="distinct reviewers per row (default: 1)")
    p.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    p.add_argument("--port", type=int, default=7860, help="default: 7860")
    p.add_argument("--expose", action="store_true", help="allow a non-loopback --host (login required)")
    p.add_argument("--open", action="store_true", help="no login: a single local user ('local', an admin)")
    p.add_argument("--lease-minutes", type=float, default=10.0, help="how long a row is held for its reviewer")
    p.set_defaults(handler=cmd_review)


def add_from_review(data_commands, common) -> None:
    """`align data from-review`, under `align data`."""
    p = data_commands.add_parser(
        "from-review",
        parents=[common],
        help="the accepted and edited rows of a reviewed version, as a new sft version",
        description="A row is kept when more reviews accept or edit it than reject it, as its newest edit if it "
        "has one. Lineage: the reviewed version and a snapshot of the review decisions.",
    )
    p.add_argument("ref", metavar="DATA[@V]")
    p.add_argument("--name", required=True, help="name of the sft dataset")
    p.add_argument("--with-seeds", action="store_true", help="put the seed rows the expansion grew from first")
    p.set_defaults(handler=cmd_from_review)


def cmd_review(args) -> int:
    from ui.review_app import run_review

    run_review(
        args.workspace,
        args.data,
        overlap=args.overlap or 1,
        host=args.host,
        port=args.port,
        open_access=args.open,
        lease_minutes=args.lease_minutes,
        expose=args.expose,
    )
    return 0


def cmd_from_review(args) -> int:
    from align.review import from_review

    version, result, numbers = from_review(open_registry(args), args.ref, name=args.name, with_seeds=args.with_seeds)
    print(f"{version.ref}  {version.num_rows} rows  kind=sft  (from {version.meta['reviewed']})")
    seeds = f"; after the {version.meta['seeds']} rows" if version.meta["seeds"] else ""
    print(
        f"{result.accepted} accepted, {result.edited} edited, {result.rejected} rejected, {result.ties} ties, "
        f"{result.unreviewed} not reviewed{seeds}"
    )
    alpha = numbers["krippendorff_alpha"]
    if numbers["rows_reviewed_twice"]:
        print(f"agreement on {numbers['rows_reviewed_twice']} rows reviewed twice or more: Krippendorff's alpha "
              + ("-" if alpha is None else f"{alpha:.3f}") + f", raw {numbers['pairwise_agreement']:.0%}")  # fmt: skip
    return 0


def cmd_expand(args) -> int:
    from align.expand import expand_data, print_summary, resume_expansion
    from align.expansion import OPERATORS, ExpandSettings

    registry = open_registry(args)
    if args.resume:
        version, run = resume_expansion(registry, args.resume)
        print_summary(version, run)
        return 0
    if not args.source or not args.name:
        raise AlignError("give the seed tasks and the name of the result: --from DATASET --name NAME (or --resume)")
    operators = OPERATORS
    if args.operators is not None:
        if args.method != "evol":
            raise AlignError("--operators applies to --method evol only")
        operators = tuple(operator.strip() for operator in args.operators.split(",") if operator.strip())
    settings = ExpandSettings(
        method=args.method,
        n=args.n,
        operators=operators,
        k=args.k,
        machine_k=args.machine_k,
        round_size=args.round_size,
        rouge_threshold=args.rouge_threshold,
        min_words=args.min_words,
        max_words=args.max_words,
        max_rounds=args.max_rounds,
        seed=args.seed,
    )
    sampling = sampling_settings(args)
    version, run = expand_data(registry, args.source, name=args.name, model=args.model, settings=settings,
                               sampling=sampling)  # fmt: skip
    print_summary(version, run)
    return 0
