"""The review app: people check the rows `align expand` made, one at a time, and every decision lands in the
registry (align/review.py).

    align review --data expanded                 # http://127.0.0.1:7860/, log in as an annotator
    align review --data expanded --open          # one local user ('local', an admin), no login
    align review --data expanded --overlap 2     # each row to two reviewers: their agreement is measured

Each row shows the task and the answer, how it was made (method, operator, filter scores), and its context: the
instruction it was evolved from (evol), or the pool tasks closest to it by ROUGE-L (self-instruct). The reviewer
accepts it as it is, edits the task or the answer in the boxes and saves the edit, rejects it with a reason, or
skips it; undo takes back their last decision. Login, leases and --expose work as in `align label`, and admins
see the Review quality tab: acceptance by method and operator, the commonest reasons for rejecting, and agreement
where rows were reviewed twice. `align serve` has the same two tabs, on any machine-made version.

Everything shown from the data is escaped and shown as text.
"""

from __future__ import annotations

import html
import threading
from dataclasses import asdict

import gradio as gr

from align.errors import AlignError
from align.expansion import origin_of
from align.labels import LabelError
from align.registry import Registry
from align.review import ReviewStore, machine_rows, quality
from ui.label_app import CSS, conversation_html, lease_number, plural
from ui.serving import Logins, check_access, login_message, request_user

BUTTONS = (
    ("accept", "Accept", "review-accept"),
    ("edit", "Save edit", "review-edit"),
    ("reject", "Reject", "review-reject"),
    ("skip", "Skip", "review-skip"),
)
SAID = {"accept": "accepted", "edit": "edit saved", "reject": "rejected", "skip": "skipped"}
NOTICES = {
    "done": "All done: every row you can review has its reviews. Thank you!",
    "wait": "Every row left is being reviewed by someone else right now. Check again in a minute.",
}


class ReviewDesk:
    """What the buttons call: the row to show, a decision, an undo, the quality numbers."""

    def __init__(
        self,
        registry: Registry,
        data: str,
        *,
        overlap: int = 1,
        open_access: bool = False,
        lease_seconds: float = 600.0,
    ):
        self.store = ReviewStore(registry, data, overlap=overlap, lease_seconds=lease_seconds)
        self.open_access = open_access
        check_access(registry, open_access)
        self.logins = Logins(registry.labels)

    def is_admin(self, user: str) -> bool:
        if self.open_access:
            return True
        found = self.store.tables.annotator(user)
        return bool(found and found["admin"])

    def current(self, user: str) -> dict:
        return self._view(user, self.store.current(user))

    def decide(self, user: str, lease: int, decision: str, *, task=None, answer=None, reason=None) -> dict:
        receipt = self.store.decide(user, lease, decision, user=task, answer=answer, reason=reason)
        return {
            "review": receipt.vote,
            "item": receipt.item,
            "duplicate": receipt.duplicate,
            "next": self.current(user),
        }

    def undo(self, user: str) -> dict:
        undone, assignment = self.store.undo(user)
        said = None if undone is None else {"item": undone.vote.item, "decision": undone.vote.choice}
        return {"undone": said, "next": self._view(user, assignment)}

    def quality(self, user: str) -> dict:
        if not self.is_admin(user):
            raise LabelError(f"{user!r} is not an admin: the Review quality tab is for admins")
        return quality(self.store.rows, self.store.items, self.store.reviews())

    def _view(self, user: str, assignment) -> dict:
        view = {"status": assignment.status, "user": user, "progress": asdict(self.store.progress(user))}
        if assignment.status == "item":
            row = self.store.row(assignment.item)
            view |= {"lease": assignment.lease, "item": assignment.item, "messages": row["messages"]}
            view["origin"] = origin_of(row)
        return view


class ReviewDesks:
    """`align serve`: one review desk per machine-made sft version, opened when someone first picks it."""

    def __init__(self, registry: Registry, *, overlap: int, open_access: bool, lease_seconds: float):
        self.registry = registry
        self.options = {"overlap": overlap, "open_access": open_access, "lease_seconds": lease_seconds}
        self._desks: dict[str, ReviewDesk] = {}
        self._lock = threading.Lock()

    def refs(self) -> list[str]:
        """Every sft version with machine-made rows (an origin column), newest first."""
        import pyarrow.parquet as pq

        versions = [
            v for v in self.registry.list_datasets() if v.kind == "sft" and "origin" in pq.read_schema(v.path).names
        ]
        return [v.ref for v in sorted(versions, key=lambda v: (v.created_at, v.id), reverse=True)]

    def get(self, ref: str | None) -> ReviewDesk:
        if not ref:
            raise AlignError("No machine-made rows to review yet: make some with `align expand`.")
        version = self.registry.resolve(ref)
        machine_rows(version, self.registry.rows(version) if version.kind == "sft" else [])
        with self._lock:
            if version.ref not in self._desks:
                self._desks[version.ref] = ReviewDesk(self.registry, version.ref, **self.options)
            return self._desks[version.ref]


# Rendering: every piece of text from the data goes through html.escape.


def origin_html(origin: dict) -> str:
    made = origin.get("method", "?") + (f" · {origin['operator']}" if origin.get("operator") else "")
    scores = " · ".join(f"{key} {value}" for key, value in sorted(origin.get("scores", {}).items()))
    return (
        f'<div class="who">made by</div><div class="text">{html.escape(made)} · round {origin.get("round", "-")}'
        f"{' · ' + html.escape(scores) if scores else ''}</div>"
    )


def context_html(origin: dict) -> str:
    """The parent of an evolution, or the nearest pool tasks of a self-instruct task."""
    if origin.get("parent"):
        return (
            f'<div class="turn turn-system"><div class="who">evolved ({html.escape(origin.get("operator", ""))}) '
            f'from</div><div class="text">{html.escape(origin["parent"])}</div></div>'
        )
    items = "".join(
        f'<li><span class="text">{html.escape(n["instruction"])}</span> (ROUGE-L {n["rouge_l"]:.2f})</li>'
        for n in origin.get("neighbours", [])
    )
    return f'<div class="who">closest tasks in the pool</div><ol>{items}</ol>' if items else ""


def progress_text(view: dict) -> str:
    p = view["progress"]
    return (
        f"Reviewed **{p['complete']}** of **{p['items']}** rows ({p['votes']} of {p['needed']} reviews) · "
        f"yours: **{p['mine']}**"
    )


def review_panel(desk_for, chosen) -> tuple:
    """The Review and Review quality tabs, built in the current Blocks context, for the desk `desk_for(ref)` of the
    version named by the `chosen` component. Returns (load function, its outputs)."""
    with gr.Tab("Review", id="review"):
        lease = gr.Textbox(visible=False, elem_id="review-lease")
        heading = gr.Markdown(elem_id="review-heading")
        progress = gr.Markdown(elem_id="review-progress")
        row = gr.HTML(elem_id="review-row")
        made = gr.HTML(elem_id="review-origin")
        context = gr.HTML(elem_id="review-context")
        task = gr.Textbox(label="Task (edit it, then Save edit)", elem_id="review-task", lines=3)
        answer = gr.Textbox(label="Answer (edit it, then Save edit)", elem_id="review-answer", lines=4)
        reason = gr.Textbox(label="Reason (required to reject)", elem_id="review-reason", max_lines=3)
        with gr.Row():
            buttons = [gr.Button(label, elem_id=elem, variant="primary") for _, label, elem in BUTTONS]
        with gr.Row():
            undo = gr.Button("Undo last decision", elem_id="review-undo", size="sm")
            again = gr.Button("Check for a new row", elem_id="review-next", size="sm")
        status = gr.Markdown(elem_id="review-status")
    with gr.Tab("Review quality", id="review-quality", visible=False, elem_id="review-quality-tab") as quality_tab:
        refresh = gr.Button("Refresh", elem_id="review-quality-refresh", size="sm")
        summary = gr.Markdown(elem_id="review-quality-summary")
        by_method = gr.Dataframe(label="Acceptance by method and operator (accepted = accept or edit)",
                                 elem_id="review-quality-methods", interactive=False)  # fmt: skip
        kappas = gr.Dataframe(label="Cohen's kappa (keep against reject) for each pair of reviewers",
                              elem_id="review-quality-kappa", interactive=False)  # fmt: skip

    screen = [lease, heading, progress, row, made, context, task, answer, reason, status, *buttons, undo]

    def render(desk: ReviewDesk, view: dict, message: str = "", reason_text: str = "") -> list:
        store = desk.store
        item = view["status"] == "item"
        heading_text = f"**{view['user']}** · `{store.version.ref}` · each row to {plural(store.overlap, 'reviewer')}"
        if item:
            messages, origin = view["messages"], view["origin"]
            body, made_html, context_text = conversation_html(messages), origin_html(origin), context_html(origin)
            user_text = next((m["content"] for m in messages if m["role"] == "user"), "")
            answer_text = next((m["content"] for m in reversed(messages) if m["role"] == "assistant"), "")
        else:
            body = f'<div class="notice">{html.escape(NOTICES[view["status"]])}</div>'
            made_html = context_text = user_text = answer_text = ""
        return [
            str(view.get("lease") or ""), heading_text, progress_text(view), body, made_html, context_text,
            user_text, answer_text, reason_text, message, *[gr.Button(interactive=item) for _ in buttons],
            gr.Button(interactive=view["progress"]["mine"] > 0),
        ]  # fmt: skip

    def nothing(message: str) -> list:
        return [
            "", "", "", f'<div class="notice">{html.escape(message)}</div>', "", "", "", "", "", "",
            *[gr.Button(interactive=False) for _ in buttons], gr.Button(interactive=False),
        ]  # fmt: skip

    def on_load(ref: str, request: gr.Request):
        try:
            desk = desk_for(ref)
        except AlignError as exc:
            return [*nothing(str(exc)), gr.Tab(visible=False)]
        user = request_user(request, desk.open_access)
        return [*render(desk, desk.current(user)), gr.Tab(visible=desk.is_admin(user))]

    def make_decision(decision: str):
        def on_decide(request: gr.Request, ref: str, lease_value: str, task_text: str, answer_text: str, why: str):
            desk = desk_for(ref)
            user = request_user(request, desk.open_access)
            edited = {"task": task_text, "answer": answer_text} if decision == "edit" else {}
            try:
                result = desk.decide(user, lease_number(lease_value), decision, reason=why, **edited)
            except LabelError as exc:
                screen_now = render(desk, desk.current(user), f"Not saved: {exc}", why)
                if decision == "edit":  # keep what they typed
                    screen_now[6], screen_now[7] = task_text, answer_text
                return screen_now
            verb = "Already saved" if result["duplicate"] else "Saved"
            return render(desk, result["next"], f"{verb}: item {result['item']} {SAID[decision]}.")

        return on_decide

    def on_undo(ref: str, request: gr.Request):
        desk = desk_for(ref)
        result = desk.undo(request_user(request, desk.open_access))
        if result["undone"] is None:
            return render(desk, result["next"], "Nothing to undo.")
        undone = result["undone"]
        return render(desk, result["next"], f"Undid your decision ({undone['decision']}) on item {undone['item']}.")

    def on_again(ref: str, request: gr.Request):
        desk = desk_for(ref)
        return render(desk, desk.current(request_user(request, desk.open_access)))

    def on_quality(ref: str, request: gr.Request):
        desk = desk_for(ref)
        try:
            report = desk.quality(request_user(request, desk.open_access))
        except LabelError as exc:
            return str(exc), None, None
        return quality_tables(report)

    # A decision, an undo or the next row is a few short SQLite transactions: they skip Gradio's queue, as the
    # label app's votes do (ui/label_app.py says why).
    for (decision, *_), button in zip(BUTTONS, buttons):
        button.click(make_decision(decision), [chosen, lease, task, answer, reason], screen, queue=False)
    undo.click(on_undo, [chosen], screen, queue=False)
    again.click(on_again, [chosen], screen, queue=False)
    refresh.click(on_quality, [chosen], [summary, by_method, kappas])
    quality_tab.select(on_quality, [chosen], [summary, by_method, kappas])
    return on_load, [*screen, quality_tab]


def quality_tables(report: dict):
    def share(value) -> str:
        return "-" if value is None else f"{value:.0%}"

    agreement = report["agreement"]
    alpha = agreement["krippendorff_alpha"]
    summary = (
        f"**{plural(agreement['rows_reviewed_twice'], 'row')} reviewed twice or more** · Krippendorff's alpha "
        f"{'-' if alpha is None else f'{alpha:.3f}'} · raw agreement {share(agreement['pairwise_agreement'])} · "
        f"{plural(agreement['reviewers'], 'reviewer')}"
    )
    if report["reasons"]:
        summary += "  \nCommonest reasons to reject: " + "; ".join(
            f"{html.escape(reason)} ({count})" for reason, count in report["reasons"]
        )
    headers = ["method", "operator", "reviews", "accepted", "edited", "rejected", "acceptance"]
    rows = [[r["method"], r["operator"], r["reviews"], r["accepted"], r["edited"], r["rejected"],
             share(r["acceptance"])] for r in report["by_method"]]  # fmt: skip
    kappas = [
        [k["annotators"][0], k["annotators"][1], k["shared"], "-" if k["kappa"] is None else f"{k['kappa']:.3f}"]
        for k in agreement["cohen_kappa"]
    ]
    return (
        summary,
        gr.Dataframe(value=rows or [["-", "-", 0, 0, 0, 0, "-"]], headers=headers),
        gr.Dataframe(value=kappas or [["-", "-", 0, "-"]], headers=["reviewer", "reviewer", "shared rows", "kappa"]),
    )


def build_blocks(desk: ReviewDesk) -> gr.Blocks:
    """`align review`: the Review and Review quality tabs for one version."""
    with gr.Blocks(title=f"align review · {desk.store.version.ref}") as blocks:
        chosen = gr.Textbox(desk.store.version.ref, visible=False)
        with gr.Tabs():
            on_load, outputs = review_panel(lambda ref: desk, chosen)
        blocks.load(on_load, [chosen], outputs)
    return blocks


def create_app(desk: ReviewDesk):
    """The FastAPI app serving the review UI at /."""
    from fastapi import FastAPI

    from ui.label_app import spare_event_analytics
    from ui.serving import ClientAddress

    spare_event_analytics()
    blocks = build_blocks(desk)
    blocks.queue(default_concurrency_limit=8)
    app = gr.mount_gradio_app(
        FastAPI(title="align review", docs_url=None, redoc_url=None, openapi_url=None),
        blocks,
        path="/",
        auth=desk.logins.check if not desk.open_access else None,
        auth_message=login_message(f"Log in to review {desk.store.version.ref}."),
        css=CSS,
        footer_links=["gradio"],
    )
    app.add_middleware(ClientAddress)
    return app


def run_review(
    workspace: str | None,
    data: str,
    *,
    overlap: int,
    host: str,
    port: int,
    open_access: bool,
    lease_minutes: float,
    expose: bool = False,
) -> None:
    """`align review`: serve until Ctrl-C."""
    from ui.serving import check_host_access, check_port, serve, url_for

    registry = Registry(workspace)
    check_host_access(registry, host, expose, open_access)
    desk = ReviewDesk(registry, data, overlap=overlap, open_access=open_access, lease_seconds=lease_minutes * 60)
    app = create_app(desk)
    check_port(host, port)
    store = desk.store
    done = asdict(store.progress(""))
    print(
        f"reviewing {store.version.ref}: {len(store.items)} machine-made rows, each to "
        f"{plural(store.overlap, 'reviewer')} ({done['votes']} of {done['needed']} reviews so far)"
    )
    print(f"open {url_for(host, port)} in a browser; every decision is saved as it is made; Ctrl-C stops", flush=True)
    serve(app, host, port)
