"""The compare app: two models side by side, blind battles whose votes go to the registry, and the leaderboard.

    align compare --models smollm2-135m,adapter:sft --open                 # http://127.0.0.1:7860/, no login
    align compare --models smollm2-135m,adapter:sft,model:merged --arena round-2
    align compare --leaderboard --arena round-2 --plot heatmap.png         # the leaderboard in the terminal

Tabs:
  - Side by side: pick any two of the --models (the base, an adapter, a merged model); one input box, both
    models answer at once, streaming token by token, each model in its own thread of the conversation (it sees
    its own earlier replies). Regenerate redoes the last replies; Clear starts over.
  - Battle: two different models drawn at random and placed left (A) and right (B) at random; their names stay
    on the server until the vote. Chat as long as you like, then vote: A better, B better, tie, or both bad. The
    vote is committed to the registry (align/arena.py: one transaction) before the names are revealed; it ends
    the battle, and "New battle" draws again. `align data from-labels arena:NAME` turns the votes into
    preference data.
  - Leaderboard: Bradley-Terry ratings with 95% bootstrap intervals (seeded), online Elo, vote counts, and the
    win-rate heatmap, over the arena's votes.
The generation settings (system prompt, max new tokens, temperature, top-p) apply to both chat tabs.

Model output and user text are escaped and shown as text: a reply holding <script> shows the tag, it never runs.
Each model loads once, when the app starts (an adapter is folded into its own copy of the base for speed).

Login follows the ranking app: required whenever an annotator exists (`align annotators add`), and --open (one
local user, 'local') is then refused; without annotators the app starts only with --open. Like `align serve`,
it binds to 127.0.0.1 unless --expose is given, which needs login (ui.serving.check_host_access).
"""

import html
import queue
import random
import secrets
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from align.arena import DEFAULT_ARENA, arena_leaderboard, arenas, plot_win_rates, record_battle
from align.errors import AlignError
from align.labels import OPEN_USER
from align.registry import Registry
from align.registry.registry import ARTIFACT_KINDS, check_name
from ui.serving import ClientAddress, Logins, check_access, check_host_access, login_message, request_user

SIDES = ("a", "b")  # left, right
VOTES = (
    ("left", "A is better", "battle-vote-a"),
    ("right", "B is better", "battle-vote-b"),
    ("tie", "Tie", "battle-vote-tie"),
    ("both-bad", "Both are bad", "battle-vote-both-bad"),
)
HEADERS = ["rank", "model", "BT rating", "95% CI", "Elo", "votes", "W-T-L"]
SAID = {"left": "A is better", "right": "B is better", "tie": "a tie", "both-bad": "both are bad"}
CSS = """
.panel { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 12px; min-height: 12em; }
.panel .name { font-weight: 600; margin-bottom: 6px; }
.turn { border-radius: 8px; padding: 6px 10px; margin: 4px 0; }
.turn-user { background: var(--color-accent-soft); }
.turn-assistant { border: 1px solid var(--border-color-primary); }
.turn-error { border: 1px solid #c0392b; color: #c0392b; }
.who { font-size: 0.75em; font-weight: 600; text-transform: uppercase; opacity: 0.7; }
.text { white-space: pre-wrap; overflow-wrap: anywhere; }
.writing .text::after { content: "\u258d"; opacity: 0.6; }
"""


@dataclass(frozen=True)
class ChatSettings:
    system: str = ""
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9

    def __post_init__(self):
        if not 1 <= int(self.max_new_tokens) <= 4096:
            raise AlignError(f"max new tokens must be between 1 and 4096 (got {self.max_new_tokens})")
        if self.temperature < 0:
            raise AlignError(f"temperature must be 0 (greedy) or more (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise AlignError(f"top-p must be in (0, 1] (got {self.top_p})")

    def generate_kwargs(self) -> dict:
        if self.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}

    def record(self) -> dict:
        return {
            "system": self.system,
            "max_new_tokens": int(self.max_new_tokens),
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


@dataclass
class Piece:
    """One update of a stream: both replies so far, which sides are done, and any error per side."""

    texts: list[str]
    done: list[bool]
    errors: list[str | None]


class _TextSoFar:
    """A generate() streamer that sends the whole reply decoded so far after every token (not only at spaces,
    as transformers' TextStreamer does). While the text ends in an unfinished character (U+FFFD), it waits for up
    to 3 more tokens, enough to complete any UTF-8 character; bytes that never form one are shown as they are."""

    def __init__(self, tokenizer, side: int, events: queue.Queue):
        self.tokenizer, self.side, self.events = tokenizer, side, events
        self.ids: list[int] = []
        self.prompt_seen = False
        self.held = 0

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and self.held < 3:
            self.held += 1
            return
        self.held = 0
        self.events.put((self.side, "text", text))

    def end(self) -> None:
        self.events.put((self.side, "text", self.tokenizer.decode(self.ids, skip_special_tokens=True)))


class _StopWhenSet:
    """A stopping criterion: stop generating once the page that asked has gone (the stream was closed)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class CompareDesk:
    """The models, the streams, the votes and the leaderboard: what the Gradio callbacks call."""

    def __init__(
        self,
        registry: Registry,
        models: list[str],
        *,
        arena: str = DEFAULT_ARENA,
        open_access: bool = False,
        defaults: ChatSettings | None = None,
        seed: int | None = None,
        bootstrap: int = 1000,
    ):
        from align.generate import merged_for_inference
        from align.models import has_chat_template, load_model, resolve_model

        self.arena = check_name(arena, "arena")
        models = [ref.strip() for ref in models if ref and ref.strip()]
        if len(models) < 2:
            raise AlignError(f"compare needs at least two models: --models REF1,REF2 (got {','.join(models) or '-'})")
        if len(set(models)) != len(models):
            raise AlignError(f"a model is listed twice in --models: {','.join(models)}")
        for ref in models:
            if ref.startswith("rm:"):
                raise AlignError(f"{ref} is a reward model, which scores replies but does not write them")
            resolve_model(ref, registry)  # every reference checked before anything loads
        # Registry artifacts pinned to their version: a vote names exactly the model that answered.
        self.refs = [registry.resolve_artifact(r).ref if r.split(":", 1)[0] in ARTIFACT_KINDS else r for r in models]
        check_access(registry, open_access)
        self.open_access = open_access
        self.defaults = defaults or ChatSettings()
        self.bootstrap = bootstrap
        self.registry = registry  # its label and arena tables give each thread a connection of its own
        self._random = random.Random(seed) if seed is not None else random.SystemRandom()
        self._lock = threading.Lock()
        self.logins = Logins(registry.labels)
        self._board: tuple | None = None  # (last battle id, leaderboard): recomputed only after new votes
        self.loaded: dict[str, tuple] = {}
        for ref in self.refs:
            print(f"loading {ref} ...", flush=True)
            model, tokenizer = load_model(ref, registry)
            if not has_chat_template(tokenizer):
                raise AlignError(f"model {ref!r} has no chat template: compare needs instruct (chat) models")
            self.loaded[ref] = (merged_for_inference(model), tokenizer)

    # Login

    @property
    def login_required(self) -> bool:
        return not self.open_access

    def check_login(self, name: str, password: str) -> bool:
        return self.logins.check(name, password)

    # Conversations

    def new_battle(self) -> dict:
        """Two different models in a random order (left = A, right = B), drawn on the server."""
        with self._lock:
            pair = self._random.sample(self.refs, 2)
        return {"key": secrets.token_hex(16), "models": pair, "threads": [[], []], "vote": None, "shown_at": None}

    def messages(self, ref: str, thread: list[dict], settings: ChatSettings) -> list[dict]:
        """The system prompt, then the thread, shortened from the oldest exchange when it does not fit the model."""
        model, tokenizer = self.loaded[ref]
        start = [{"role": "system", "content": settings.system}] if settings.system.strip() else []
        limit = getattr(model.config, "max_position_embeddings", None) or 10**9
        turns = list(thread)
        while True:
            messages = start + turns
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            length = len(tokenizer(text, add_special_tokens=False)["input_ids"])
            if length + int(settings.max_new_tokens) <= limit:
                return messages
            users = [i for i, m in enumerate(turns) if m["role"] == "user"]
            if len(users) < 2:
                raise AlignError(
                    f"the conversation is too long for {ref} ({length} tokens + {int(settings.max_new_tokens)} new "
                    f"> {limit}): clear it or lower max new tokens"
                )
            turns = turns[users[1] :]  # drop the oldest exchange

    def stream(self, refs: list[str], threads: list[list[dict]], settings: ChatSettings) -> Iterator[Piece]:
        """Both models answer their thread (which ends with the user's turn) at once, each in its own thread of
        execution; yields the replies so far after each new token on either side."""
        events: queue.Queue = queue.Queue()
        stop = threading.Event()
        piece = Piece(["", ""], [False, False], [None, None])
        for side, (ref, thread) in enumerate(zip(refs, threads)):
            try:
                messages = self.messages(ref, thread, settings)
            except AlignError as exc:
                piece.done[side], piece.errors[side] = True, str(exc)
                continue
            worker = threading.Thread(
                target=self._generate,
                args=(side, ref, messages, settings, events, stop),
                name=f"compare-{side}",
                daemon=True,
            )
            worker.start()
        if all(piece.done):  # neither side could start
            yield piece
            return
        try:
            while not all(piece.done):
                updates = [events.get()]
                while True:  # take every update already waiting: one screen refresh for all of them
                    try:
                        updates.append(events.get_nowait())
                    except queue.Empty:
                        break
                for side, kind, value in updates:
                    if kind == "text":
                        piece.texts[side] = value
                    elif kind == "error":
                        piece.errors[side] = value
                    else:
                        piece.done[side] = True
                yield Piece(list(piece.texts), list(piece.done), list(piece.errors))
        finally:
            stop.set()  # the page went away mid-reply: stop generating

    def _generate(self, side, ref, messages, settings, events, stop) -> None:
        import torch
        from transformers import StoppingCriteriaList

        model, tokenizer = self.loaded[ref]
        try:
            inputs = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            ).to(model.device)
            with torch.inference_mode():
                model.generate(
                    **inputs,
                    max_new_tokens=int(settings.max_new_tokens),
                    pad_token_id=tokenizer.pad_token_id,
                    streamer=_TextSoFar(tokenizer, side, events),
                    stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                    use_cache=True,
                    **settings.generate_kwargs(),
                )
        except Exception as exc:  # shown in that side's panel; the other side carries on
            events.put((side, "error", f"{type(exc).__name__}: {exc}"))
        finally:
            events.put((side, "done", None))

    # Votes and the leaderboard

    def vote(self, user: str, battle: dict, choice: str) -> tuple[int, bool]:
        """Commit the vote (one transaction) before the caller reveals the names."""
        if not battle["threads"][0] or battle["threads"][0][-1]["role"] != "assistant":
            raise AlignError("ask the models something first: a vote judges their replies")
        seconds = time.time() - battle["shown_at"] if battle["shown_at"] else None
        left, right = battle["models"]
        return record_battle(
            self.registry,
            arena=self.arena,
            key=battle["key"],
            left=left,
            right=right,
            left_messages=battle["system"] + battle["threads"][0],
            right_messages=battle["system"] + battle["threads"][1],
            choice=choice,
            annotator=user,
            settings=battle["settings"],
            seconds=seconds,
        )

    def leaderboard(self):
        """The arena's leaderboard, recomputed only when a vote came in since the last time."""
        last = self.registry.arena.last_battle(self.arena)
        with self._lock:
            if self._board is not None and self._board[0] == last:
                return self._board[1]
        board = arena_leaderboard(self.registry, self.arena, rounds=self.bootstrap, seed=0)
        with self._lock:
            self._board = (last, board)
        return board


# Rendering: everything from the models and the user goes through html.escape.


def panel_html(name: str, thread: list[dict], piece: Piece | None = None, side: int = 0) -> str:
    """One side: its name, its thread, and while a stream runs, the reply so far (or the error) of `side`."""
    turns = [(message["role"], message["content"], "") for message in thread]
    if piece is not None and piece.errors[side]:
        turns.append(("error", piece.errors[side], ""))
    elif piece is not None:
        turns.append(("assistant", piece.texts[side], "" if piece.done[side] else " writing"))
    shown = "".join(
        f'<div class="turn turn-{html.escape(role)}{extra}"><div class="who">{html.escape(role)}</div>'
        f'<div class="text">{html.escape(text)}</div></div>'
        for role, text, extra in turns
    )
    return f'<div class="panel"><div class="name">{html.escape(name)}</div>{shown}</div>'


def leaderboard_view(board) -> tuple:
    if not board.votes:
        return "No votes yet: cast some in the Battle tab.", gr.Dataframe(value=None, headers=HEADERS), None
    rows = [
        [
            row["rank"],
            row["model"],
            round(row["rating"]),
            f"{row['low']:.0f} to {row['high']:.0f}",
            round(row["elo"]),
            row["votes"],
            f"{row['wins']}-{row['ties']}-{row['losses']}",
        ]
        for row in board.rows
    ]
    summary = (
        f"**{board.votes}** vote{'s' if board.votes != 1 else ''} · Bradley-Terry ratings on the Elo scale (mean "
        f"1000), 95% intervals from {board.rounds} bootstrap resamples of the votes (seed {board.seed}) · Elo: online, "
        "K = 32, in vote order · ties and both-bad count half a win each"
    )
    return summary, gr.Dataframe(value=rows, headers=HEADERS), heatmap_image(board)


def heatmap_image(board):
    return figure_image(plot_win_rates(board))


def figure_image(figure, dpi: int = 100):
    """A matplotlib figure as a PIL image for gr.Image; the figure is closed at once, not kept per refresh."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer)


def build_blocks(desk: CompareDesk) -> gr.Blocks:
    """`align compare`: Side by side, Battle and Leaderboard tabs under shared generation settings."""
    with gr.Blocks(title=f"align compare · {desk.arena}") as blocks:
        on_load, outputs = compare_panel(desk, leaderboard=True)
        blocks.load(on_load, None, outputs)
    return blocks


def chat_area(tab: str, third: str, third_id: str) -> tuple:
    """A tab's two reply panels, its message box, and its Send, Regenerate and `third` buttons (elem_ids TAB-a,
    TAB-b, TAB-input, TAB-send, TAB-regenerate, TAB-THIRD_ID), built in the current Blocks context."""
    with gr.Row(equal_height=True):
        panels = [gr.HTML(elem_id=f"{tab}-{s}", js_on_load=None) for s in SIDES]
    box = gr.Textbox(label="Your message", elem_id=f"{tab}-input", lines=2, max_lines=8)
    with gr.Row():
        buttons = (
            gr.Button("Send", variant="primary", elem_id=f"{tab}-send"),
            gr.Button("Regenerate", elem_id=f"{tab}-regenerate"),
            gr.Button(third, elem_id=f"{tab}-{third_id}"),
        )
    return panels, box, buttons


def compare_panel(desk: CompareDesk, *, leaderboard: bool) -> tuple:
    """The generation settings and the Side by side and Battle tabs (and Leaderboard), built in the current Blocks
    context. Returns (load function, its outputs) to run on page load."""
    defaults = desk.defaults
    side_state = gr.State(None)
    battle_state = gr.State(None)
    with gr.Accordion("Generation settings", open=False):
        with gr.Row():
            system = gr.Textbox(defaults.system, label="System prompt", elem_id="system", max_lines=4, scale=3)
            max_new = gr.Slider(1, 1024, value=defaults.max_new_tokens, step=1, label="Max new tokens")
            temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p")
    settings_inputs = [system, max_new, temperature, top_p]
    with gr.Tabs():
        with gr.Tab("Side by side", id="side"):
            with gr.Row():
                pick = [
                    gr.Dropdown(desk.refs, value=desk.refs[i], label=f"Model {label}", elem_id=f"side-model-{s}")
                    for i, (s, label) in enumerate(zip(SIDES, "AB"))
                ]
            side_panels, side_input, (side_send, side_regen, side_clear) = chat_area("side", "Clear", "clear")
            side_status = gr.Markdown(elem_id="side-status")
        with gr.Tab("Battle", id="battle"):
            gr.Markdown(
                "Two models, drawn at random and kept anonymous. Chat, then vote: the names are revealed after "
                "the vote, which ends the battle."
            )
            battle_panels, battle_input, (battle_send, battle_regen, battle_new) = chat_area(
                "battle", "New battle", "new"
            )
            with gr.Row():
                vote_buttons = [gr.Button(label, elem_id=elem) for _, label, elem in VOTES]
            battle_status = gr.Markdown(elem_id="battle-status")
        if leaderboard:
            with gr.Tab("Leaderboard", id="leaderboard") as board_tab:
                leaderboard_panel(desk.leaderboard, board_tab)

    def settings_from(values) -> ChatSettings:
        system_text, tokens, temp, nucleus = values
        return ChatSettings(system_text or "", int(tokens), float(temp), float(nucleus))

    def converse(outputs, state, values, text: str | None, *, failed: str, done: str):
        """Both models of a conversation answer, streaming: `text` as a new user turn, or with no text the last
        user turn again (their last replies dropped). The replies are kept only when both sides finish."""
        try:
            settings = settings_from(values)
        except AlignError as exc:
            yield outputs(state, None, f"Not sent: {exc}")
            return
        for thread in state["threads"]:
            if text is None:
                thread.pop()
            else:
                thread.append({"role": "user", "content": text})
        if text is not None:
            yield outputs(state, None, "", busy=True, text="")
        try:
            for pieces in desk.stream(state["models"], state["threads"], settings):
                yield outputs(state, pieces, busy=True)
        except AlignError as exc:
            yield outputs(state, None, f"Not sent: {exc}")
            return
        if any(pieces.errors):
            for thread in state["threads"]:
                thread.pop()  # the two threads stay in step: the question is taken back from both
            reasons = "; ".join(f"{'AB'[i]}: {pieces.errors[i]}" for i in range(2) if pieces.errors[i])
            yield outputs(state, None, f"{failed}: {reasons}")
            return
        for i in range(2):
            state["threads"][i].append({"role": "assistant", "content": pieces.texts[i].strip()})
        # What the replies were made with, and when they were shown: a battle vote records them.
        state["settings"] = settings.record()
        state["system"] = [{"role": "system", "content": settings.system}] if settings.system.strip() else []
        state["shown_at"] = time.time()
        yield outputs(state, None, done)

    # Side by side

    def side_fresh(left, right):
        return {"models": [left, right], "threads": [[], []]}

    def side_outputs(state, pieces=None, message="", busy=False, text=None):
        panels = [
            panel_html(f"Model {'AB'[i]}: {name}", state["threads"][i], pieces, i)
            for i, name in enumerate(state["models"])
        ]
        box = gr.Textbox() if text is None else gr.Textbox(value=text)
        buttons = [gr.Button(interactive=not busy) for _ in range(3)]
        return [state, *panels, box, message, *buttons]

    side_out = [side_state, *side_panels, side_input, side_status, side_send, side_regen, side_clear]
    side_said = {"failed": "Failed, nothing kept", "done": ""}

    def on_side_send(state, text, left, right, *values):
        state = state or side_fresh(left, right)
        if not (text or "").strip():
            yield side_outputs(state, None, "Type a message first.")
            return
        yield from converse(side_outputs, state, values, text, **side_said)

    def on_side_regen(state, left, right, *values):
        state = state or side_fresh(left, right)
        if not state["threads"][0] or state["threads"][0][-1]["role"] != "assistant":
            yield side_outputs(state, None, "Nothing to regenerate yet.")
            return
        yield from converse(side_outputs, state, values, None, **side_said)

    def on_side_clear(left, right):
        return side_outputs(side_fresh(left, right), None, "")

    # Battle

    def battle_outputs(state, pieces=None, message="", busy=False, text=None):
        voted = state["vote"] is not None
        panels = []
        for i in range(2):
            name = f"Model {'AB'[i]}" + (f": {state['models'][i]}" if voted else "")  # names only after the vote
            panels.append(panel_html(name, state["threads"][i], pieces, i))
        answered = bool(state["threads"][0]) and state["threads"][0][-1]["role"] == "assistant"
        box = gr.Textbox(interactive=not voted) if text is None else gr.Textbox(value=text, interactive=not voted)
        return [
            state,
            *panels,
            box,
            message,
            gr.Button(interactive=not busy and not voted),  # send
            gr.Button(interactive=not busy and not voted and answered),  # regenerate
            gr.Button(interactive=not busy),  # new battle
            *[gr.Button(interactive=not busy and not voted and answered) for _ in VOTES],
        ]

    battle_out = [
        battle_state,
        *battle_panels,
        battle_input,
        battle_status,
        battle_send,
        battle_regen,
        battle_new,
        *vote_buttons,
    ]
    battle_said = {"failed": "Failed, nothing to vote on", "done": "Vote when you are ready, or keep chatting."}

    def on_battle_send(state, text, *values):
        state = state or desk.new_battle()
        if state["vote"] is not None:
            yield battle_outputs(state, None, "This battle is over: start a new battle.")
            return
        if not (text or "").strip():
            yield battle_outputs(state, None, "Type a message first.")
            return
        yield from converse(battle_outputs, state, values, text, **battle_said)

    def on_battle_regen(state, *values):
        state = state or desk.new_battle()
        if state["vote"] is not None or not state["threads"][0]:
            yield battle_outputs(state, None, "Nothing to regenerate.")
            return
        yield from converse(battle_outputs, state, values, None, **battle_said)

    def make_vote(choice: str):
        def on_vote(state, request: gr.Request):
            state = state or desk.new_battle()
            if state["vote"] is not None:
                return battle_outputs(state, None, "Already voted: start a new battle.")
            try:
                battle_id, duplicate = desk.vote(request_user(request, desk.open_access), state, choice)
            except AlignError as exc:
                return battle_outputs(state, None, f"Not saved: {exc}")
            state["vote"] = choice
            left, right = state["models"]
            saved = "Already saved" if duplicate else "Saved"
            message = (
                f"{saved}: {SAID[choice]} (vote {battle_id} in arena `{desk.arena}`). "
                f"**A** was `{left}` · **B** was `{right}`. Start a new battle to vote again."
            )
            return battle_outputs(state, None, message)

        return on_vote

    def on_battle_new():
        return battle_outputs(desk.new_battle(), None, "A new battle: two models drawn at random.", text="")

    def on_load():
        first = desk.refs
        return [
            *side_outputs(side_fresh(first[0], first[1])),
            *battle_outputs(desk.new_battle()),
        ]

    side_send.click(on_side_send, [side_state, side_input, *pick, *settings_inputs], side_out)
    side_input.submit(on_side_send, [side_state, side_input, *pick, *settings_inputs], side_out)
    side_regen.click(on_side_regen, [side_state, *pick, *settings_inputs], side_out)
    side_clear.click(on_side_clear, pick, side_out)
    for dropdown in pick:
        dropdown.change(on_side_clear, pick, side_out)  # another model: a fresh conversation
    battle_send.click(on_battle_send, [battle_state, battle_input, *settings_inputs], battle_out)
    battle_input.submit(on_battle_send, [battle_state, battle_input, *settings_inputs], battle_out)
    battle_regen.click(on_battle_regen, [battle_state, *settings_inputs], battle_out)
    battle_new.click(on_battle_new, None, battle_out)
    for (choice, _, _), button in zip(VOTES, vote_buttons):
        button.click(make_vote(choice), [battle_state], battle_out)
    return on_load, [*side_out, *battle_out]


def leaderboard_panel(board, tab) -> None:
    """The arena leaderboard, built in the current context; `board()` computes it, on Refresh and when `tab` opens."""
    board_refresh = gr.Button("Refresh", size="sm", elem_id="leaderboard-refresh")
    board_summary = gr.Markdown(elem_id="leaderboard-summary")
    board_table = gr.Dataframe(headers=HEADERS, interactive=False, elem_id="leaderboard-table")
    board_plot = gr.Image(
        label="Win rate of the row's model against the column's (ties half; games in brackets)",
        elem_id="leaderboard-heatmap",
        interactive=False,
        type="pil",
    )

    def on_board():
        return leaderboard_view(board())

    board_refresh.click(on_board, None, [board_summary, board_table, board_plot])
    tab.select(on_board, None, [board_summary, board_table, board_plot])


def create_app(desk: CompareDesk):
    """The FastAPI app serving the desk's UI at /."""
    from fastapi import FastAPI

    # Gradio's own event analytics trip pandas 3 deprecation warnings on every event: not ours to fix, only noise.
    warnings.filterwarnings("ignore", message=r".*(no_silent_downcasting|The copy keyword is deprecated)")
    blocks = build_blocks(desk)
    blocks.queue(default_concurrency_limit=4)  # each stream holds a worker while both models write
    app = gr.mount_gradio_app(
        FastAPI(title="align compare", docs_url=None, redoc_url=None, openapi_url=None),
        blocks,
        path="/",
        auth=desk.check_login if desk.login_required else None,
        auth_message=login_message(f"Log in to compare models (arena {desk.arena})."),
        css=CSS,
        footer_links=["gradio"],
    )
    app.add_middleware(ClientAddress)  # the login check's view of the client address
    return app


def run_compare(
    workspace: str | None,
    models: list[str],
    *,
    arena: str,
    host: str,
    port: int,
    open_access: bool,
    defaults: ChatSettings,
    bootstrap: int,
    expose: bool = False,
) -> None:
    """`align compare`: serve until Ctrl-C."""
    from ui.serving import check_port, serve, url_for

    registry = Registry(workspace)
    check_host_access(registry, host, expose, open_access)  # before any model is loaded
    check_port(host, port)
    desk = CompareDesk(registry, models, arena=arena, open_access=open_access, defaults=defaults, bootstrap=bootstrap)
    app = create_app(desk)
    votes = dict(arenas(registry)).get(arena, 0)
    print(f"comparing {', '.join(desk.refs)}; battle votes go to arena '{arena}' ({votes} so far)")
    if open_access:
        print(f"single local user '{OPEN_USER}', no login (--open)")
    else:
        print("log in with an annotator's name and password (`align annotators list` shows who)")
    print(f"open {url_for(host, port)} in a browser; every vote is saved as it is cast; Ctrl-C stops", flush=True)
    serve(app, host, port)


def print_leaderboard(workspace: str | None, arena: str, *, bootstrap: int, seed: int, plot: str | None) -> None:
    """`align compare --leaderboard`: the table in the terminal (and the heatmap as a PNG)."""
    from align.arena import leaderboard_text

    registry = Registry(workspace)
    check_name(arena, "arena")
    board = arena_leaderboard(registry, arena, rounds=bootstrap, seed=seed)
    if not board.votes:
        known = ", ".join(f"{name} ({votes})" for name, votes in arenas(registry)) or "none yet"
        raise AlignError(f"no votes in arena {arena!r} at {registry.root} (arenas with votes: {known})")
    print(f"arena '{arena}': {board.votes} votes; 95% intervals from {bootstrap} bootstrap resamples (seed {seed})")
    print(leaderboard_text(board))
    if plot:
        plot_win_rates(board, Path(plot))
        print(f"win-rate heatmap: {plot}")
