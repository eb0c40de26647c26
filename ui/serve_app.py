"""`align serve`: the whole loop in one app, on one workspace.

    align serve                                        # http://127.0.0.1:7860/ (loopback only)
    align serve --models smollm2-135m,adapter:dpo      # the models of the Compare / Arena tab
    align serve --candidates pipeline-candidates       # the candidates the Label tab opens on
    align serve --order uncertainty --rm rm:rm         # the Label tab serves the reward model's least sure first
    align serve --rubric helpfulness,harmlessness      # the Label tab scores each reply 1-5 per attribute
    align serve --expose --host 0.0.0.0                # reachable from other machines: login required

Tabs:
  - Label: the ranking app (ui/label_app.py) on any candidates version, chosen from a list, with --mode,
    --rubric, --order and --rm as in `align label`.
  - Review: the review app (ui/review_app.py) on any sft version with machine-made rows (align expand).
  - Compare / Arena: side-by-side chat and blind battles (ui/compare_app.py) between the served models.
  - Leaderboard: the arena's Bradley-Terry ratings, Elo and win-rate heatmap.
  - Datasets: every dataset version and model artifact, three sample rows, and the lineage graph of the one
    chosen: from the human votes, through the preference data and the runs, to the adapters.
  - Runs: every run with its status; the chosen run's metrics plotted live while it trains (runs/ID/live.jsonl,
    refreshed every few seconds), its final metrics and its report with plots.

Access: the app binds to 127.0.0.1 unless --expose is given. Login is required whenever an annotator exists
(`align annotators add`), and always when exposed; on loopback without annotators it serves one local user.
"""

from __future__ import annotations

import html
import json
import threading
import warnings
from pathlib import Path

import gradio as gr

from align.arena import DEFAULT_ARENA, arena_leaderboard
from align.errors import AlignError
from align.label_order import check_order, open_scorer
from align.labels import OPEN_USER, check_rubric
from align.registry import Registry
from align.runs import read_live
from ui import compare_app, label_app, review_app
from ui.serving import ClientAddress, Logins, check_exposure, login_message

MAX_DEFAULT_MODELS = 6  # each served model is loaded in full: the default list stops here
RUN_COLUMNS = ["run", "stage", "status", "started", "finished", "outputs"]
DATASET_COLUMNS = ["version", "kind", "rows", "created", "made by run"]
ARTIFACT_COLUMNS = ["artifact", "base model", "made by run", "created"]
CSS = label_app.CSS + compare_app.CSS + ".report img { max-width: 100%; }"


def default_models(registry: Registry) -> list[str]:
    """The newest version of every adapter and merged model, after the base models they were trained from."""
    newest: dict[tuple[str, str], object] = {}
    for artifact in registry.list_artifacts():
        if artifact.kind in ("adapter", "model"):
            newest[(artifact.kind, artifact.name)] = artifact  # listed by version: the last one wins
    bases = sorted({artifact.base_model for artifact in newest.values() if artifact.base_model})
    models = bases + [artifact.ref for artifact in sorted(newest.values(), key=lambda a: a.id)]
    return models[:MAX_DEFAULT_MODELS]


class LabelDesks:
    """One ranking desk per candidates version, opened when someone first picks it."""

    def __init__(
        self,
        registry: Registry,
        *,
        mode: str,
        overlap: int,
        open_access: bool,
        lease_seconds: float,
        rubric: tuple[str, ...] = (),
        order: str = "sequential",
        scorer=None,
    ):
        self.registry = registry
        self.options = {"mode": mode, "overlap": overlap, "open_access": open_access, "lease_seconds": lease_seconds}
        self.options |= {"rubric": rubric, "order": order, "scorer": scorer}  # scorer: the reward model of the order
        self._desks: dict[str, label_app.LabelDesk] = {}
        self._lock = threading.Lock()

    def refs(self) -> list[str]:
        """Every candidates version, newest first."""
        versions = [v for v in self.registry.list_datasets() if v.kind == "candidates"]
        return [v.ref for v in sorted(versions, key=lambda v: (v.created_at, v.id), reverse=True)]

    def width(self) -> int:
        """The most completions any candidates row has (rank mode shows that many panels)."""
        return max((len(row["completions"]) for ref in self.refs() for row in self.registry.rows(ref)), default=2)

    def get(self, ref: str | None) -> label_app.LabelDesk:
        if not ref:
            raise AlignError("No candidates to label yet: make some with `align generate` (or `align pipeline`).")
        ref = self.registry.resolve(ref, kind="candidates").ref
        with self._lock:
            if ref not in self._desks:
                self._desks[ref] = label_app.LabelDesk(self.registry, ref, **self.options)
            return self._desks[ref]


# The Datasets tab


def node_label(key: str, node) -> str:
    """How a lineage node reads: 'name@v (kind, N rows)', 'adapter:x@1', 'run ID (stage)', 'base model REF'."""
    kind, _, rest = key.partition(":")
    if kind == "comparisons":
        return f"human votes or reviews (snapshot {rest})"
    if kind == "base":
        return f"base model {rest}"
    if isinstance(node, str):
        return node
    if hasattr(node, "num_rows"):
        return f"{node.ref} ({node.kind}, {node.num_rows} rows)"
    if hasattr(node, "ref"):
        return node.ref
    return f"run {node.id} ({node.stage})"


def lineage(registry: Registry, start, limit: int = 60) -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """The labelled nodes ({key: label}) and (parent, child, role) edges around `start`: all its ancestors, then
    all its descendants (at most `limit` nodes)."""
    walked = registry.lineage(start, direction="both", limit=limit)
    labels = {key: node_label(key, node) for key, node in walked.nodes.items()}
    return labels, sorted(set(walked.edges))


def lineage_markdown(labels: dict, edges: list, start_key: str) -> str:
    if not edges:
        return f"`{labels[start_key]}` has no recorded parents or children (it was imported)."
    lines = [f"Lineage of **{html.escape(labels[start_key])}** ({len(edges)} links):", ""]
    for parent, child, role in edges:
        lines.append(f"- {html.escape(labels[parent])} → {html.escape(labels[child])} ({role})")
    return "\n".join(lines)


def lineage_image(labels: dict, edges: list, start_key: str):
    """A left-to-right drawing: each node in the column of its longest path from a root, arrows parent -> child."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parents_of: dict[str, list[str]] = {key: [] for key in labels}
    for parent, child, _ in edges:
        parents_of[child].append(parent)
    depth: dict[str, int] = {}

    def depth_of(key: str, trail: frozenset = frozenset()) -> int:
        if key not in depth:
            above = [p for p in parents_of[key] if p not in trail]
            depth[key] = 1 + max((depth_of(p, trail | {key}) for p in above), default=-1)
        return depth[key]

    columns: dict[int, list[str]] = {}
    for key in labels:
        columns.setdefault(depth_of(key), []).append(key)
    position = {}
    for column, keys in columns.items():
        for row, key in enumerate(sorted(keys)):
            position[key] = (column, -row + (len(keys) - 1) / 2)
    width = max(columns) + 1
    height = max(len(keys) for keys in columns.values())
    figure, axis = plt.subplots(figsize=(max(6, 3.2 * width), max(2.5, 0.9 * height + 1)))
    for parent, child, _ in edges:
        (x0, y0), (x1, y1) = position[parent], position[child]
        axis.annotate("", xy=(x1 - 0.32, y1), xytext=(x0 + 0.32, y0), arrowprops={"arrowstyle": "->", "alpha": 0.6})
    colours = {"dataset": "#dbeafe", "artifact": "#dcfce7", "run": "#f3f4f6", "comparisons": "#fde68a"}
    colours["base"] = "#ede9fe"
    for key, (x, y) in position.items():
        label = labels[key]
        label = label if len(label) <= 34 else label[:33] + "…"
        face = colours.get(key.split(":", 1)[0], "#fee2e2")
        edge = "#111827" if key == start_key else "#9ca3af"
        thick = 2 if key == start_key else 1
        box = {"boxstyle": "round,pad=0.3", "facecolor": face, "edgecolor": edge, "linewidth": thick}
        axis.text(x, y, label, ha="center", va="center", fontsize=7, bbox=box)
    axis.set_xlim(-0.6, width - 0.4)
    axis.set_ylim(-height / 2 - 0.2, height / 2 + 0.2)
    axis.axis("off")
    figure.tight_layout()
    return compare_app.figure_image(figure, dpi=100)


def datasets_panel(registry: Registry, tab) -> None:
    summary = gr.Markdown(elem_id="datasets-summary")
    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", elem_id="datasets-refresh", scale=0)
        chosen = gr.Dropdown([], label="Dataset version or artifact", elem_id="datasets-chosen", scale=3)
    versions = gr.Dataframe(headers=DATASET_COLUMNS, interactive=False, elem_id="datasets-table", label="Datasets")
    artifacts = gr.Dataframe(headers=ARTIFACT_COLUMNS, interactive=False, elem_id="artifacts-table", label="Models")
    graph = gr.Image(label="Lineage", elem_id="datasets-lineage-graph", interactive=False, type="pil")
    links = gr.Markdown(elem_id="datasets-lineage")
    samples = gr.Code(label="Sample rows", language="json", elem_id="datasets-samples", interactive=False)

    def on_tables(current: str | None):
        found = registry.list_datasets()
        made = registry.list_artifacts()
        rows = [[v.ref, v.kind, v.num_rows, v.created_at, v.run_id or ""] for v in found]
        artifact_rows = [[a.ref, a.base_model, a.run_id or "", a.created_at] for a in made]
        choices = [a.ref for a in reversed(made)] + [v.ref for v in sorted(found, key=lambda v: v.id, reverse=True)]
        value = current if current in choices else (choices[0] if choices else None)
        text = f"**{len(found)}** dataset versions and **{len(made)}** artifacts in `{registry.root}`"
        return text, gr.Dropdown(choices=choices, value=value), rows or None, artifact_rows or None

    def on_choose(ref: str | None):
        if not ref:
            return None, "Nothing registered yet: `align data import` starts the loop.", ""
        if ref.split(":", 1)[0] in ("adapter", "model", "rm"):
            node = registry.resolve_artifact(ref)
            sample = json.dumps(node.meta, indent=2, ensure_ascii=False, default=str)
        else:
            node = registry.resolve(ref)
            sample = json.dumps(registry.rows(node)[:3], indent=2, ensure_ascii=False, default=str)
        nodes, edges = lineage(registry, node)
        image = lineage_image(nodes, edges, node.node) if edges else None
        return image, lineage_markdown(nodes, edges, node.node), sample

    outputs = [summary, chosen, versions, artifacts]
    refresh.click(on_tables, [chosen], outputs).then(on_choose, [chosen], [graph, links, samples])
    tab.select(on_tables, [chosen], outputs).then(on_choose, [chosen], [graph, links, samples])
    chosen.input(on_choose, [chosen], [graph, links, samples])


# The Runs tab


def live_plot(entries: list[dict], keys: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [key for key in keys if any(key in entry for entry in entries)]
    if not keys:
        return None
    figure, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), squeeze=False)
    for axis, key in zip(axes[:, 0], keys):
        points = [(entry["step"], entry[key]) for entry in entries if key in entry]
        xs, ys = zip(*points)
        axis.plot(xs, ys, marker="o" if len(points) < 30 else None)
        axis.set_title(key, fontsize=9)
        axis.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    figure.tight_layout()
    return compare_app.figure_image(figure, dpi=90)


def default_keys(available: list[str]) -> list[str]:
    preferred = [k for k in available if "loss" in k or k in ("objective/scores", "reward", "rewards/accuracies")]
    return (preferred or available)[:3]


def runs_panel(registry: Registry, tab) -> None:
    with gr.Row():
        refresh = gr.Button("Refresh", size="sm", elem_id="runs-refresh", scale=0)
        chosen = gr.Dropdown([], label="Run", elem_id="runs-chosen", scale=3)
    table = gr.Dataframe(headers=RUN_COLUMNS, interactive=False, elem_id="runs-table", label="Runs, newest first")
    status = gr.Markdown(elem_id="runs-status")
    keys = gr.Dropdown([], multiselect=True, label="Live metrics (runs/ID/live.jsonl)", elem_id="runs-keys")
    plot = gr.Image(label="Metrics as logged", elem_id="runs-plot", interactive=False, type="pil")
    with gr.Accordion("Report", open=True):
        report = gr.Markdown(elem_id="runs-report", elem_classes=["report"])
        plots = gr.Gallery(label="Report plots", elem_id="runs-plots", columns=3, height="auto")
    timer = gr.Timer(5.0)  # live: the chosen run's status and metrics refresh while the tab is open

    def on_table(current: str | None):
        found = list(reversed(registry.list_runs()))
        rows = [
            [r.id, r.stage, r.shown_status, r.created_at, r.finished_at or "", ", ".join(map(str, r.outputs))]
            for r in found
        ]
        choices = [r.id for r in found]
        value = current if current in choices else (choices[0] if choices else None)
        return rows or None, gr.Dropdown(choices=choices, value=value)

    def on_status(run_id: str | None, shown_keys: list[str] | None):
        if not run_id:
            nothing = "No runs yet: `align sft`, `align rm`, `align dpo` or `align pipeline` start one."
            return nothing, gr.Dropdown(), None
        run = registry.get_run(run_id)
        lines = [f"**{run.id}** · stage `{run.stage}` · **{run.shown_status}** · started {run.created_at}"]
        if run.finished_at:
            lines[0] += f" · finished {run.finished_at}"
        if run.inputs:
            lines.append("inputs: " + ", ".join(f"`{item}`" for item in run.inputs))
        if run.outputs:
            lines.append("outputs: " + ", ".join(f"`{item}`" for item in run.outputs))
        if run.error:
            lines.append(f"error: `{html.escape(str(run.error))[:500]}`")
        metrics = run.metrics or {}
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if numbers:
            lines.append("final: " + " · ".join(f"{k} {v:.4g}" for k, v in list(numbers.items())[:12]))
        entries = read_live(run.dir)
        available = sorted({key for entry in entries for key in entry if key != "step"})
        chosen_keys = [k for k in (shown_keys or []) if k in available] or default_keys(available)
        if entries:
            lines.append(f"{len(entries)} logged steps, the last at step {entries[-1]['step']:g}")
        return "  \n".join(lines), gr.Dropdown(choices=available, value=chosen_keys), live_plot(entries, chosen_keys)

    def on_report(run_id: str | None):
        if not run_id:
            return "", []
        run = registry.get_run(run_id)
        path = run.dir / "report.md"
        if not path.is_file():
            return "No report yet: it is written when the run finishes.", []
        text = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines() if not line.startswith("!["))
        return text, [str(p) for p in sorted(Path(run.dir).glob("*.png"))]

    def on_tick(run_id: str | None, shown_keys: list[str] | None):
        if not run_id or registry.get_run(run_id).shown_status != "running":
            return gr.Markdown(), gr.Dropdown(), gr.Image()  # nothing moves: leave the screen as it is
        return on_status(run_id, shown_keys)

    for trigger in (refresh.click, tab.select):
        trigger(on_table, [chosen], [table, chosen]).then(on_status, [chosen, keys], [status, keys, plot]).then(
            on_report, [chosen], [report, plots]
        )
    chosen.input(on_status, [chosen, keys], [status, keys, plot]).then(on_report, [chosen], [report, plots])
    keys.input(on_status, [chosen, keys], [status, keys, plot])
    timer.tick(on_tick, [chosen, keys], [status, keys, plot])


# The app


def build_blocks(
    registry: Registry,
    desks: LabelDesks,
    compare: compare_app.CompareDesk | None,
    arena: str,
    first: str | None,
    reviews: review_app.ReviewDesks | None = None,
):
    refs = desks.refs()
    reviews = reviews or review_app.ReviewDesks(registry, overlap=1, open_access=True, lease_seconds=600.0)
    review_refs = reviews.refs()
    with gr.Blocks(title=f"align serve · {registry.root.name}") as blocks:
        header = gr.Markdown(elem_id="serve-header")
        with gr.Tabs():
            with gr.Tab("Label", id="label"):
                chosen = gr.Dropdown(
                    refs,
                    value=first or (refs[0] if refs else None),
                    label="Candidates version",
                    elem_id="label-candidates",
                )
                with gr.Tabs():
                    label_load, label_outputs = label_app.label_panel(
                        desks.get,
                        chosen,
                        mode=desks.options["mode"],
                        width=desks.width(),
                        rubric=desks.options["rubric"],
                    )
            with gr.Tab("Review", id="review-data"):
                review_chosen = gr.Dropdown(
                    review_refs,
                    value=review_refs[0] if review_refs else None,
                    label="Machine-made sft version",
                    elem_id="review-data",
                )
                with gr.Tabs():
                    review_load, review_outputs = review_app.review_panel(reviews.get, review_chosen)
            with gr.Tab("Compare / Arena", id="compare"):
                if compare is not None:
                    compare_load, compare_outputs = compare_app.compare_panel(compare, leaderboard=False)
                else:
                    compare_load, compare_outputs = None, []
                    gr.Markdown(
                        "Side-by-side chat and battles need two models: start with "
                        "`align serve --models BASE,adapter:NAME` (the newest adapters are used when there are any).",
                        elem_id="compare-missing",
                    )
            with gr.Tab("Leaderboard", id="leaderboard") as board_tab:
                board = compare.leaderboard if compare else (lambda: arena_leaderboard(registry, arena, seed=0))
                compare_app.leaderboard_panel(board, board_tab)
            with gr.Tab("Datasets", id="datasets") as datasets_tab:
                datasets_panel(registry, datasets_tab)
            with gr.Tab("Runs", id="runs") as runs_tab:
                runs_panel(registry, runs_tab)

        def on_load(ref: str | None, review_ref: str | None, request: gr.Request):
            user = OPEN_USER if desks.options["open_access"] else (request.username if request else "")
            text = f"**align** · workspace `{registry.root}` · signed in as **{user}** · arena `{arena}`"
            versions = desks.refs()  # made since the app started too
            loaded = [text, gr.Dropdown(choices=versions, value=ref), *label_load(ref, request)]
            review_versions = reviews.refs()
            review_ref = review_ref if review_ref in review_versions else (review_versions or [None])[0]
            loaded += [gr.Dropdown(choices=review_versions, value=review_ref), *review_load(review_ref, request)]
            if compare_load is not None:
                loaded += compare_load()
            return loaded

        outputs = [header, chosen, *label_outputs, review_chosen, *review_outputs, *compare_outputs]
        blocks.load(on_load, [chosen, review_chosen], outputs)
        chosen.input(label_load, [chosen], label_outputs)
        review_chosen.input(review_load, [review_chosen], review_outputs)
    return blocks


def create_app(
    registry: Registry,
    *,
    host: str = "127.0.0.1",
    expose: bool = False,
    models: list[str] | None = None,
    candidates: str | None = None,
    mode: str = "pairwise",
    overlap: int | None = None,
    arena: str = DEFAULT_ARENA,
    lease_seconds: float = 600.0,
    defaults: compare_app.ChatSettings | None = None,
    bootstrap: int = 1000,
    rubric: str | None = None,
    order: str = "sequential",
    rm: str | None = None,
):
    """(the FastAPI app serving every tab at /, a dict of what it serves). `rubric`, `order` and `rm`: the Label
    tab's, as in `align label`."""
    from fastapi import FastAPI

    login = check_exposure(host, expose, registry.labels.count_annotators(), registry.root)
    overlap = overlap or (2 if login else 1)  # one local user gives each item one vote
    check_order(order, rm, mode)
    scorer = open_scorer(registry, rm) if rm else None
    if scorer is not None:
        print(f"loading {scorer.ref} to order the Label tab's items by its uncertainty", flush=True)
        scorer.load()  # a reward model that cannot be loaded stops the app here
    desks = LabelDesks(
        registry,
        mode=mode,
        overlap=overlap,
        open_access=not login,
        lease_seconds=lease_seconds,
        rubric=check_rubric(rubric),
        order=order,
        scorer=scorer,
    )
    models = default_models(registry) if models is None else models
    compare = None
    if len(models) >= 2:
        compare = compare_app.CompareDesk(
            registry, models, arena=arena, open_access=not login, defaults=defaults, bootstrap=bootstrap
        )
    warnings.filterwarnings("ignore", message=r".*(no_silent_downcasting|The copy keyword is deprecated)")
    first = registry.resolve(candidates, kind="candidates").ref if candidates else None  # checked before serving
    if scorer is not None and (first or desks.refs()):
        desks.get(first or desks.refs()[0])  # the version shown first: checked against the reward model, scored now
    reviews = review_app.ReviewDesks(registry, overlap=1, open_access=not login, lease_seconds=lease_seconds)
    blocks = build_blocks(registry, desks, compare, arena, first, reviews)
    label_app.spare_event_analytics()
    blocks.queue(default_concurrency_limit=8)
    logins = Logins(registry.labels)
    app = gr.mount_gradio_app(
        FastAPI(title="align serve", docs_url=None, redoc_url=None, openapi_url=None),
        blocks,
        path="/",
        auth=logins.check if login else None,
        auth_message=login_message(f"Log in to {registry.root.name}: an annotator's name and password."),
        css=CSS,
        head=label_app.SHORTCUTS,
        footer_links=["gradio"],
        allowed_paths=[str(registry.root / "runs")],  # the report plots shown in the Runs tab
    )
    app.add_middleware(ClientAddress)  # the login check's view of the client address
    served = {"login": login, "models": compare.refs if compare else [], "candidates": desks.refs(), "first": first}
    if order != "sequential":
        served["order"] = order
    return app, served


def run_serve(workspace: str | None, *, host: str, port: int, expose: bool, models: list[str] | None, **options):
    """`align serve`: serve until Ctrl-C."""
    from ui.serving import check_port, serve, url_for

    registry = Registry(workspace)
    check_port(host, port)
    app, served = create_app(registry, host=host, expose=expose, models=models, **options)
    candidates = served["candidates"]
    print(f"workspace {registry.root}")
    shown = served["first"] or (candidates[0] if candidates else "none yet")
    print(f"label: {len(candidates)} candidates version(s), {shown} first (the Label tab lists them all)")
    if served.get("order"):
        print(f"label order: {served['order']}" + (f" by {options['rm']}" if options.get("rm") else ""))
    if served["models"]:
        print(f"compare / arena: {', '.join(served['models'])}")
    else:
        print("compare / arena: needs two models (--models REF1,REF2)")
    if served["login"]:
        print("log in with an annotator's name and password (`align annotators list` shows who)")
    else:
        print(f"single local user '{OPEN_USER}', no login (loopback only; --expose needs annotators and login)")
    print(f"open {url_for(host, port)} in a browser; every vote is saved as it is cast; Ctrl-C stops", flush=True)
    serve(app, host, port)
