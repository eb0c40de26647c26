"""The ranking app: people compare candidates, and every vote lands in the registry.

    align annotators add alice --admin                     # once per person; asks for a password
    align label --candidates seed-candidates --overlap 2   # http://127.0.0.1:7860/, log in as an annotator
    align label --candidates seed-candidates --open        # one local user ('local', an admin), no login
    align label --candidates my-cands@2 --mode rank        # order 3+ completions, ties allowed
    align label --candidates seed-candidates --mode thumbs # one completion at a time: up or down (for KTO)
    align label --candidates seed-candidates --rubric helpfulness,harmlessness,honesty   # + 1-5 per attribute
    align label --candidates seed-candidates --order random                  # a seeded shuffle, per annotator
    align label --candidates seed-candidates --order uncertainty --rm rm:rm  # the reward model's least sure first

Login is required whenever an annotator exists (Gradio's login page, checked against the salted scrypt hashes
in the registry), and --open is then refused; without annotators, the app starts only with --open. Admins
(`annotators add --admin`, and the --open user) also see the Quality tab.

Pairwise mode shows the prompt as a conversation and two completions side by side, in an order drawn at
random and stored with the vote. Keys: a or 1 = A better, b or 2 = B better, t = tie, x = both bad,
s = skip, u = undo the last vote (keys do nothing while typing in a text box). Rank mode gives each completion
a rank (1 = best, equal ranks = a tie); r = submit the ranking. Thumbs mode shows one completion: y or 1 = up
(a good reply), n or 2 = down, s = skip; the reason box says why, if you like.

With --rubric, each completion shown gets a 1-5 control per attribute beside the vote buttons; the scores go with
the vote (optional: an attribute left blank is not stored). In the JSON API they are "scores": {"helpfulness": 4}
in thumbs mode and {"helpfulness:A": 4, "helpfulness:B": 2} (the completion's letter as shown) otherwise; a value
outside 1-5, or a name the rubric does not hold, is refused.

--order picks which item comes next among the free ones (align/label_order.py): sequential (row order, the
default), random (a seeded shuffle; each annotator starts at their own place in it), or uncertainty: the items the
reward model named by --rm is least sure of first (its preference probability sigmoid(r_a - r_b) nearest 1/2; in
rank mode the smallest gap between two adjacent scores). The reward model scores the candidates once, in the
background, while votes go on in row order; the scores are kept in the workspace for the next start.

Everything shown from the candidates is escaped and shown as text: a completion holding <script> shows the
tag, it never runs.

The app binds to 127.0.0.1 unless --expose is given (ui.serving.check_host_access, the rule of `align serve`):
another --host needs --expose, and --expose needs login, so an app reachable from other machines never runs
with --open.

The HTTP API makes the same calls the buttons make (LabelDesk below), as JSON. Auth: HTTP Basic with an
annotator's name and password (none with --open); after too many failed logins the answer is 429 with the wait
(ui.serving.Throttle).

    GET  /label-api/health                 {"status": "ok"}; logged in (or with --open) also "candidates", "mode",
                                           "overlap", "items", "login" (and "rubric" and "order" when asked)
    GET  /label-api/item                   the item to label now: the same one until it is voted on
    POST /label-api/vote                   {"lease", "choice", "ranking"?, "reason"?, "scores"?}
                                           -> {"vote", "item", "duplicate", "next"}; 409 when refused, 422 for
                                           a field of the wrong type or out of range (a lease is a 64-bit
                                           integer, scores are finite numbers)
    POST /label-api/undo                   -> {"undone", "next"}

An item is {"status": "item" | "wait" | "done", "lease", "item", "shown": [completion indices], "labels": ["A",
"B", ...], "prompt": [messages], "completions": [[messages], ...] in the order shown, "progress": {...}}.
A ranking lists the rank of each completion in the order shown.
"""

# No `from __future__ import annotations` here: FastAPI reads the route functions' annotations at runtime.
import html
import os
import warnings
from dataclasses import asdict
from typing import Annotated

import gradio as gr
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, Field, FiniteFloat

from align.errors import AlignError
from align.labels import INTEGER_RANGE, OPEN_USER, LabelError, LabelStore, quality
from align.registry import Registry
from ui.serving import (
    ClientAddress,
    LoginLocked,
    Logins,
    check_access,
    check_host_access,
    login_message,
    request_user,
)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
PAIRWISE_BUTTONS = (
    ("A", "A better", "vote-a", "a / 1"),
    ("B", "B better", "vote-b", "b / 2"),
    ("tie", "Tie", "vote-tie", "t"),
    ("both-bad", "Both bad", "vote-both-bad", "x"),
    ("skip", "Skip", "vote-skip", "s"),
)
RANK_BUTTONS = (
    ("rank", "Submit ranking", "vote-rank", "r"),
    ("both-bad", "All bad", "vote-both-bad", "x"),
    ("skip", "Skip", "vote-skip", "s"),
)
THUMBS_BUTTONS = (
    ("up", "Up: a good reply", "vote-up", "y / 1"),
    ("down", "Down: a bad reply", "vote-down", "n / 2"),
    ("skip", "Skip", "vote-skip", "s"),
)
BUTTONS = {"pairwise": PAIRWISE_BUTTONS, "rank": RANK_BUTTONS, "thumbs": THUMBS_BUTTONS}
RUBRIC_SCORES = [str(score) for score in range(1, 6)]
SHORTCUTS = """
<script>
(() => {
  const keys = {a: "vote-a", 1: "vote-a vote-up", b: "vote-b", 2: "vote-b vote-down", t: "vote-tie", 3: "vote-tie",
                x: "vote-both-bad", 4: "vote-both-bad", s: "vote-skip", 5: "vote-skip", r: "vote-rank", u: "undo",
                y: "vote-up", n: "vote-down"};
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const target = event.target;
    const choosing = target && target.tagName === "INPUT" && ["radio", "checkbox"].includes(target.type);  // a score
    if (target && !choosing && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName))) {
      return;
    }
    const button = (keys[event.key.toLowerCase()] || "").split(" ").map((id) => document.getElementById(id))
      .find((found) => found && found.offsetParent !== null);  // the one on screen: not on a hidden tab
    if (button && !button.disabled) {
      event.preventDefault();
      button.click();
    }
  });
})();
</script>
"""
CSS = """
.turn, .completion { border-radius: 8px; padding: 8px 12px; margin: 4px 0; }
.turn-user { background: var(--color-accent-soft); }
.turn-system, .turn-tool { background: var(--background-fill-secondary); font-style: italic; }
.turn-assistant { border: 1px solid var(--border-color-primary); }
.completion { border: 1px solid var(--border-color-primary); min-height: 6em; }
.completion .who { font-size: 1em; }
.who { font-size: 0.75em; font-weight: 600; text-transform: uppercase; opacity: 0.7; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
.notice { padding: 1em; font-size: 1.1em; }
"""


class VoteBody(BaseModel):
    lease: int = Field(ge=INTEGER_RANGE[0], le=INTEGER_RANGE[1])  # an SQLite integer
    choice: str
    ranking: list[int] | None = None
    reason: str | None = None
    scores: dict[str, FiniteFloat] | None = None


class LabelDesk:
    """What the buttons and the HTTP API both call: the item to show, a vote, an undo, the quality numbers."""

    def __init__(
        self,
        registry: Registry,
        candidates: str,
        *,
        mode: str = "pairwise",
        overlap: int = 2,
        open_access: bool = False,
        lease_seconds: float = 600.0,
        rubric: str | list[str] | None = None,
        order: str = "sequential",
        scorer=None,
    ):
        self.store = LabelStore(
            registry,
            candidates,
            mode=mode,
            overlap=overlap,
            lease_seconds=lease_seconds,
            rubric=rubric,
            order=order,
            scorer=scorer,
        )
        self.open_access = open_access
        check_access(registry, open_access)
        self.width = max(len(item) for item in self.store.items)  # completions shown at most
        if self.width > len(LETTERS):
            raise AlignError(f"a row of {self.store.version.ref} has {self.width} completions: 26 at most are shown")
        self.logins = Logins(registry.labels)

    @property
    def login_required(self) -> bool:
        return not self.open_access

    def check_login(self, name: str, password: str) -> bool:
        return self.logins.check(name, password)

    def is_admin(self, user: str) -> bool:
        if self.open_access:
            return True
        found = self.store.tables.annotator(user)
        return bool(found and found["admin"])

    def current(self, user: str) -> dict:
        return self._view(user, self.store.current(user))

    def vote(self, user: str, lease: int, choice: str, *, ranking=None, reason=None, scores=None) -> dict:
        receipt = self.store.vote(user, lease, choice, ranking=ranking, reason=reason, scores=scores)
        return {"vote": receipt.vote, "item": receipt.item, "duplicate": receipt.duplicate, "next": self.current(user)}

    def undo(self, user: str) -> dict:
        undone, assignment = self.store.undo(user)
        shown = None
        if undone is not None:
            vote = undone.vote
            shown = {"vote": vote.id, "item": vote.item, "choice": vote.choice, "reason": vote.reason}
        return {"undone": shown, "next": self._view(user, assignment)}

    def quality(self, user: str) -> dict:
        if not self.is_admin(user):
            raise LabelError(f"{user!r} is not an admin: the Quality tab is for admins")
        return quality(self.store.rows, self.store.votes())

    def _view(self, user: str, assignment) -> dict:
        view = {
            "status": assignment.status,
            "user": user,
            "mode": self.store.mode,
            "progress": asdict(self.store.progress(user)),
        }
        if self.store.rubric:
            view["rubric"] = list(self.store.rubric)
        if assignment.status == "item":
            row = self.store.rows[self.store.item_rows[assignment.item]]
            view |= {
                "lease": assignment.lease,
                "item": assignment.item,
                "shown": list(assignment.shown),
                "labels": list(LETTERS[: len(assignment.shown)]),
                "prompt": row["prompt"],
                "completions": [row["completions"][index] for index in assignment.shown],
            }
        return view


# Rendering: every piece of text from the candidates goes through html.escape.


def conversation_html(messages: list[dict]) -> str:
    turns = [
        f'<div class="turn turn-{html.escape(m["role"])}"><div class="who">{html.escape(m["role"])}</div>'
        f'<div class="text">{html.escape(m["content"])}</div></div>'
        for m in messages
    ]
    return "".join(turns)


def completion_html(label: str, messages: list[dict]) -> str:
    text = "\n\n".join(message["content"] for message in messages)
    return (
        f'<div class="completion" data-label="{label}"><div class="who">{label}</div>'
        f'<div class="text">{html.escape(text)}</div></div>'
    )


def progress_text(view: dict) -> str:
    p = view["progress"]
    return (
        f"Labelled **{p['complete']}** of **{p['items']}** items ({p['votes']} of {p['needed']} votes) · "
        f"your votes: **{p['mine']}**"
    )


UNDO_LABEL = "Undo last vote"
SAID = {"A": "A better", "B": "B better", "tie": "tie", "both-bad": "both bad", "skip": "skip", "rank": "ranking"}
SAID |= {"up": "thumbs up", "down": "thumbs down"}
NOTICES = {
    "done": "All done: every item you can label has its votes. Thank you!",
    "wait": "Every item left is being labelled by someone else right now. Check again in a minute.",
}


def build_blocks(desk: LabelDesk) -> gr.Blocks:
    """`align label`: the Label and Quality tabs for one candidates version."""
    with gr.Blocks(title=f"align label · {desk.store.version.ref}") as blocks:
        chosen = gr.Textbox(desk.store.version.ref, visible=False)
        with gr.Tabs():
            on_load, outputs = label_panel(
                lambda ref: desk, chosen, mode=desk.store.mode, width=desk.width, rubric=desk.store.rubric
            )
        blocks.load(on_load, [chosen], outputs)
    return blocks


def label_panel(desk_for, chosen, *, mode: str, width: int, rubric: tuple[str, ...] = ()) -> tuple:
    """The Label and Quality tabs, built in the current Blocks context, for the desk `desk_for(ref)` of the
    candidates version named by the `chosen` component (a hidden box in `align label`, a dropdown in
    `align serve`). Returns (load function, its outputs): run it on page load and whenever `chosen` changes.
    `rubric`: attributes scored 1-5 for each completion shown."""
    buttons_spec = BUTTONS[mode]
    width = {"pairwise": 2, "thumbs": 1}.get(mode, width)

    with gr.Tab("Label", id="label"):
        lease = gr.Textbox(visible=False, elem_id="lease")  # the lease of the item on screen, sent with each vote
        heading = gr.Markdown(elem_id="heading")
        progress = gr.Markdown(elem_id="progress")
        prompt = gr.HTML(elem_id="prompt", js_on_load=None)
        panels, ranks, scores = [], [], []  # scores: (key, control) per attribute and completion
        if mode != "rank":
            with gr.Row(equal_height=True):
                for letter in LETTERS[:width]:
                    panels.append(gr.HTML(elem_id=f"completion-{letter.lower()}", js_on_load=None))
        else:
            choices = [str(rank) for rank in range(1, width + 1)]
            for letter in LETTERS[:width]:
                with gr.Row(equal_height=True):
                    panels.append(gr.HTML(elem_id=f"completion-{letter.lower()}", js_on_load=None))
                    ranks.append(
                        gr.Dropdown(choices, label=f"Rank of {letter}", elem_id=f"rank-{letter.lower()}", scale=0)
                    )
        if rubric:
            with gr.Row(elem_id="rubric"):
                for letter in LETTERS[:width]:
                    for attribute in rubric:
                        key = attribute if width == 1 else f"{attribute}:{letter}"
                        label = f"{attribute} (1-5)" if width == 1 else f"{attribute} of {letter} (1-5)"
                        elem = f"score-{attribute}" + ("" if width == 1 else f"-{letter.lower()}")
                        scores.append((key, gr.Radio(RUBRIC_SCORES, label=label, elem_id=elem, min_width=160)))
        score_controls = [control for _, control in scores]
        reason = gr.Textbox(label="Reason (optional)", elem_id="reason", max_lines=4)
        with gr.Row():
            buttons = [gr.Button(label, elem_id=elem, variant="primary") for _, label, elem, _ in buttons_spec]
        with gr.Row():
            undo = gr.Button(UNDO_LABEL, elem_id="undo", size="sm")
            again = gr.Button("Check for a new item", elem_id="next-item", size="sm")
        status = gr.Markdown(elem_id="status")
        keys = " · ".join(f"`{key}` {label}" for _, label, _, key in buttons_spec)
        hint = {"pairwise": "", "rank": "Rank 1 is the best; equal ranks are a tie. "}.get(mode, "")
        gr.Markdown(f"{hint}Keys: {keys} · `u` undo (not while typing in a text box)")
    with gr.Tab("Quality", id="quality", visible=False, elem_id="quality-tab") as quality_tab:
        refresh = gr.Button("Refresh", elem_id="quality-refresh", size="sm")
        summary = gr.Markdown(elem_id="quality-summary")
        people = gr.Dataframe(
            label="Per annotator (and all): counted votes, skips, median seconds per vote, position bias "
            "(share of A picks among A/B votes), tie and both-bad rates, accuracy on gold items",
            elem_id="quality-annotators",
            interactive=False,
        )
        kappas = gr.Dataframe(
            label="Cohen's kappa for each pair of annotators, over the completion pairs both judged",
            elem_id="quality-kappa",
            interactive=False,
        )

    screen = [lease, heading, progress, prompt, *panels, *ranks, *score_controls, reason, status, *buttons, undo]

    def render(
        desk: LabelDesk,
        view: dict,
        message: str = "",
        reason_text: str = "",
        *,
        shown_before: int = 0,
        score_values: tuple = (),
    ) -> list:
        """The screen for `view`. `shown_before`: the completions the screen showed before (a vote's item): with as
        many now, only values change, and plain values spare Gradio rebuilding a component per output (most of a
        vote's time under load). `score_values`: the rubric controls' values to keep (a vote not saved), else
        they are cleared for the next item."""
        kept_scores = list(score_values) or [None] * len(score_controls)
        store = desk.store
        item = view["status"] == "item"
        shown = len(view.get("completions", ()))
        heading_text = (
            f"**{view['user']}** · `{store.version.ref}` · {store.mode} · each item to {store.overlap} "
            f"annotator{'s' if store.overlap > 1 else ''}"
        )
        if store.order != "sequential":
            heading_text += f" · order: {html.escape(store.order_text())}"
        if item:
            body = conversation_html(view["prompt"])
            texts = [completion_html(label, c) for label, c in zip(view["labels"], view["completions"])]
        else:
            body = f'<div class="notice">{html.escape(NOTICES[view["status"]])}</div>'
            texts = []
        panel_texts = [texts[i] if i < len(texts) else "" for i in range(len(panels))]
        if item and shown == shown_before:  # the same layout, the buttons still enabled
            panel_updates, rank_updates = panel_texts, [None] * len(ranks)
            score_updates = kept_scores
            button_updates = [label for _, label, _, _ in buttons_spec]
            undo_update = UNDO_LABEL
        else:
            panel_updates = [gr.HTML(value=text, visible=i < shown) for i, text in enumerate(panel_texts)]
            rank_updates = [gr.Dropdown(value=None, visible=i < shown) for i in range(len(ranks))]
            score_updates = [
                gr.Radio(value=value, visible=_letter(key, width) < max(shown, 1))
                for (key, _), value in zip(scores, kept_scores)
            ]
            button_updates = [gr.Button(interactive=item) for _ in buttons]
            undo_update = gr.Button(interactive=True)  # always on once a version is open: "Nothing to undo." else
        return [
            str(view.get("lease") or ""),
            heading_text,
            progress_text(view),
            body,
            *panel_updates,
            *rank_updates,
            *score_updates,
            reason_text,
            message,
            *button_updates,
            undo_update,
        ]

    def nothing(message: str) -> list:
        """The screen when there is nothing to label (no candidates version chosen, or it cannot be opened)."""
        return [
            "",
            "",
            "",
            f'<div class="notice">{html.escape(message)}</div>',
            *[gr.HTML(value="", visible=False) for _ in panels],
            *[gr.Dropdown(value=None, visible=False) for _ in ranks],
            *[gr.Radio(value=None) for _ in score_controls],
            "",
            "",
            *[gr.Button(interactive=False) for _ in buttons],
            gr.Button(interactive=False),
        ]

    def on_load(ref: str, request: gr.Request):
        try:
            desk = desk_for(ref)
        except AlignError as exc:
            return [*nothing(str(exc)), gr.Tab(visible=False)]
        user = request_user(request, desk.open_access)
        return [*render(desk, desk.current(user)), gr.Tab(visible=desk.is_admin(user))]

    def make_vote(choice: str):
        def on_vote(request: gr.Request, ref: str, lease_value: str, reason_text: str, *values):
            desk = desk_for(ref)
            user = request_user(request, desk.open_access)
            rank_values, score_values = values[: len(ranks)], values[len(ranks) :]
            try:
                lease = lease_number(lease_value)
            except LabelError as exc:
                return render(desk, desk.current(user), f"Not saved: {exc}", reason_text)
            shown = desk.store.lease_shown(lease) or ()  # the item on screen
            given = {key: int(value) for (key, _), value in zip(scores, score_values) if value not in (None, "")}
            try:
                ranking = None
                if choice == "rank":
                    ranking = [int(value) for value in rank_values[: len(shown)] if value not in (None, "")]
                    if len(ranking) < len(shown):
                        message = "Not saved: give every completion a rank."
                        return render(
                            desk,
                            desk.current(user),
                            message,
                            reason_text,
                            shown_before=len(shown),
                            score_values=score_values,
                        )
                result = desk.vote(user, lease, choice, ranking=ranking, reason=reason_text, scores=given or None)
            except LabelError as exc:
                message = f"Not saved: {exc}"
                return render(
                    desk, desk.current(user), message, reason_text, shown_before=len(shown), score_values=score_values
                )
            verb = "Already saved" if result["duplicate"] else "Saved"
            message = f"{verb}: {SAID[choice]} on item {result['item']}."
            return render(desk, result["next"], message, shown_before=len(shown))

        return on_vote

    def on_undo(ref: str, request: gr.Request):
        desk = desk_for(ref)
        result = desk.undo(request_user(request, desk.open_access))
        undone = result["undone"]
        if undone is None:
            return render(desk, result["next"], "Nothing to undo.")
        message = f"Undid your vote ({undone['choice']}) on item {undone['item']}: vote again."
        return render(desk, result["next"], message, undone["reason"] or "")

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

    # A vote, an undo or the next item is a few short SQLite transactions, each thread on its own connection. They
    # skip Gradio's queue (queue=False: the page POSTs the event and reads the answer from that one response): the
    # queue's event stream costs several times the vote itself in server CPU, and nothing here needs its waiting
    # line, progress or streaming. Gradio's worker threads bound how many run at once.
    for (choice, *_), button in zip(buttons_spec, buttons):
        button.click(make_vote(choice), [chosen, lease, reason, *ranks, *score_controls], screen, queue=False)
    undo.click(on_undo, [chosen], screen, queue=False)
    again.click(on_again, [chosen], screen, queue=False)
    refresh.click(on_quality, [chosen], [summary, people, kappas])
    quality_tab.select(on_quality, [chosen], [summary, people, kappas])
    return on_load, [*screen, quality_tab]


def _letter(key: str, width: int) -> int:
    """The position of the completion a rubric control scores: `attribute:LETTER`, or 0 with one completion."""
    return 0 if width == 1 else LETTERS.index(key.rpartition(":")[2])


def lease_number(text: str) -> int:
    """The lease the page sent back with a vote (a hidden box; empty: no lease)."""
    try:
        return int(text or 0)
    except ValueError:
        raise LabelError(f"field 'lease' must be a whole number (got {text!r})") from None


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def quality_tables(report: dict) -> tuple[str, list[list], list[list]]:
    def number(value, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    def share(value) -> str:
        return "-" if value is None else f"{value:.0%}"

    agreement, overall = report["agreement"], report["overall"]
    alpha = agreement["krippendorff_alpha"]
    summary = (
        f"**Krippendorff's alpha** over all annotators: "
        f"{'- (needs pairs judged by two annotators)' if alpha is None else f'{alpha:.3f}'} · "
        f"**raw agreement** {share(agreement['pairwise_agreement'])} · "
        f"{plural(agreement['votes'], 'vote')} from {plural(agreement['annotators'], 'annotator')} · "
        f"**position bias** {share(overall['left_share'])} left (A) picks · "
        f"ties {share(overall['tie_rate'])} · both bad {share(overall['both_bad_rate'])}"
    )
    headers = [
        "annotator",
        "votes",
        "skips",
        "median s/vote",
        "left picks",
        "ties",
        "both bad",
        "gold votes",
        "gold accuracy",
    ]
    people = [
        [
            row["annotator"],
            row["votes"],
            row["skips"],
            number(row["median_seconds"], 1),
            share(row["left_share"]),
            share(row["tie_rate"]),
            share(row["both_bad_rate"]),
            row["gold_votes"],
            share(row["gold_accuracy"]),
        ]
        for row in [*report["annotators"], report["overall"]]
    ]
    kappas = [
        [entry["annotators"][0], entry["annotators"][1], entry["shared"], number(entry["kappa"], 3)]
        for entry in agreement["cohen_kappa"]
    ]
    return (
        summary,
        gr.Dataframe(value=people, headers=headers),
        gr.Dataframe(value=kappas or [["-", "-", 0, "-"]], headers=["annotator", "annotator", "shared pairs", "kappa"]),
    )


# The HTTP API, on the same FastAPI app as the Gradio UI


def build_api(desk: LabelDesk):
    app = FastAPI(title="align label", docs_url=None, redoc_url=None, openapi_url=None)
    basic = HTTPBasic(auto_error=False)

    Credentials = Annotated[HTTPBasicCredentials | None, Depends(basic)]

    def annotator(request: Request, credentials: Credentials) -> str:
        if desk.open_access:
            return OPEN_USER
        if credentials is not None:
            address = request.client.host if request.client else "unknown"
            try:
                if desk.logins.verify(credentials.username, credentials.password, address):
                    return credentials.username
            except LoginLocked as exc:
                raise HTTPException(429, str(exc), {"Retry-After": str(exc.wait)}) from None
        raise HTTPException(401, "log in with an annotator's name and password", {"WWW-Authenticate": "Basic"})

    def caller(request: Request, credentials: Credentials) -> str | None:
        """The annotator, or None for a caller without credentials when login is required."""
        if credentials is None and not desk.open_access:
            return None
        return annotator(request, credentials)

    User = Annotated[str, Depends(annotator)]

    def refused(exc: LabelError) -> HTTPException:
        return HTTPException(409, str(exc))

    @app.exception_handler(RequestValidationError)
    def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with one line per bad field, naming it and the value sent (FastAPI's own answer echoes the value as
        JSON, which fails for a number JSON cannot hold, such as 1e999)."""
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
            lines.append(f"field '{field}': {error['msg']} (got {error.get('input')!r})")
        return JSONResponse({"detail": "; ".join(lines)}, status_code=422)

    @app.get("/label-api/health")
    def health(user: Annotated[str | None, Depends(caller)]) -> dict:
        if user is None:
            return {"status": "ok"}  # anonymous: nothing about the data
        store = desk.store
        found = {
            "status": "ok",
            "candidates": store.version.ref,
            "mode": store.mode,
            "overlap": store.overlap,
            "items": len(store.items),
            "login": desk.login_required,
        }
        if store.order != "sequential":
            found["order"] = store.order_text()
        return found | ({"rubric": list(store.rubric)} if store.rubric else {})

    @app.get("/label-api/item")
    def item(user: User) -> dict:
        return desk.current(user)

    @app.post("/label-api/vote")
    def vote(body: VoteBody, user: User) -> dict:
        try:
            return desk.vote(
                user, body.lease, body.choice, ranking=body.ranking, reason=body.reason, scores=body.scores
            )
        except LabelError as exc:
            raise refused(exc) from None

    @app.post("/label-api/undo")
    def undo(user: User) -> dict:
        return desk.undo(user)

    return app


def spare_event_analytics() -> None:
    """Gradio sums up the timings of its last 10,000 queued events with pandas after every event, for a monitoring
    dashboard these apps leave off: a quarter of a vote's server time. Once in a million events is enough (unless
    GRADIO_ANALYTICS_CACHE_FREQUENCY says otherwise). Call before Blocks.queue(), which reads it."""
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000000")


def create_app(desk: LabelDesk):
    """The FastAPI app serving the desk's UI at / and its API at /label-api/."""
    # Gradio's own event analytics trip pandas 3 deprecation warnings on every event: not ours to fix, only noise.
    warnings.filterwarnings("ignore", message=r".*(no_silent_downcasting|The copy keyword is deprecated)")
    spare_event_analytics()
    blocks = build_blocks(desk)
    blocks.queue(default_concurrency_limit=8)  # SQLite serialises the writes; several people can vote at once
    app = gr.mount_gradio_app(
        build_api(desk),
        blocks,
        path="/",
        auth=desk.check_login if desk.login_required else None,
        auth_message=login_message(f"Log in to label {desk.store.version.ref}."),
        css=CSS,
        head=SHORTCUTS,
        footer_links=["gradio"],
    )
    app.add_middleware(ClientAddress)  # the login check's view of the client address
    return app


def run_label(
    workspace: str | None,
    candidates: str,
    *,
    mode: str,
    overlap: int,
    host: str,
    port: int,
    open_access: bool,
    lease_minutes: float,
    expose: bool = False,
    rubric: str | None = None,
    order: str = "sequential",
    rm: str | None = None,
) -> None:
    """`align label`: serve until Ctrl-C."""
    from align.label_order import check_order, open_scorer
    from ui.serving import check_port, serve, url_for

    registry = Registry(workspace)
    check_host_access(registry, host, expose, open_access)
    check_order(order, rm, mode)
    scorer = open_scorer(registry, rm) if rm else None
    if scorer is not None:
        print(f"loading {scorer.ref} to order the items by its uncertainty", flush=True)
    desk = LabelDesk(
        registry,
        candidates,
        mode=mode,
        overlap=overlap,
        open_access=open_access,
        lease_seconds=lease_minutes * 60,
        rubric=rubric,
        order=order,
        scorer=scorer,
    )
    app = create_app(desk)
    check_port(host, port)
    store = desk.store
    done = asdict(store.progress(""))
    print(
        f"labeling {store.version.ref}: {len(store.items)} items, {store.mode} mode, each to {store.overlap} "
        f"annotator{'s' if store.overlap > 1 else ''} ({done['votes']} of {done['needed']} votes so far)"
    )
    if store.rubric:
        print(f"rubric: {', '.join(store.rubric)}, scored 1-5 for each completion shown (optional)")
    if store.order != "sequential":
        print(f"order: {store.order_text()}")
    if open_access:
        print(f"single local user '{OPEN_USER}' (an admin), no login (--open)")
        if overlap > 1:
            print(f"note: one user gives each item one vote, so no item reaches --overlap {overlap} in this mode")
    else:
        print("log in with an annotator's name and password (`align annotators list` shows who)")
    print(f"open {url_for(host, port)} in a browser; every vote is saved as it is cast; Ctrl-C stops", flush=True)
    serve(app, host, port)
