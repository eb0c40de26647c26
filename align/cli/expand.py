"""`align expand` (grow sft data with a model) and `align review` (people check what it made)."""

from __future__ import annotations

from align.cli.common import DTYPE_HELP, open_registry
from align.errors import AlignError
from align.models import DTYPE_NAMES, EMBEDDED_ALIAS


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
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--dtype", choices=DTYPE_NAMES, help=DTYPE_HELP)
    p.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_ID",
                   help="continue the last interrupted expand run (or RUN_ID) with the settings it started with; "
                   "the replies it saved are kept")  # fmt: skip
    p.set_defaults(handler=cmd_expand)


def cmd_expand(args) -> int:
    from align.expand import expand_data, print_summary, resume_expansion
    from align.expansion import OPERATORS, ExpandSettings
    from align.sampling import SamplingSettings

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
    sampling = SamplingSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        batch_size=args.batch_size,
        dtype=args.dtype,
    )
    version, run = expand_data(registry, args.source, name=args.name, model=args.model, settings=settings,
                               sampling=sampling)  # fmt: skip
    print_summary(version, run)
    return 0
