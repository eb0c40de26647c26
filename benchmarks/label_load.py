"""Votes under load: simulated annotators vote through the ranking app's Gradio events, the path a browser takes.

    python benchmarks/label_load.py                                   # N = 1, 20, 50 for 20 s each, then kill -9
    python benchmarks/label_load.py --annotators 20 --seconds 10 --no-kill

Everything runs on this machine, against 127.0.0.1 only, for a bounded time:

 1. A workspace in a temporary folder: a candidates version (pairwise, overlap 2) and SEED votes already stored
    (100,000 by default, each with the lease it used, written in one transaction through align/registry's label
    tables, as the app writes them; 0.5% of them undone, 3% skips), with room left for new votes.
 2. `align label` started as a subprocess, login required: one annotator per simulated person.
 3. For each N: N annotators log in with gradio_client (Gradio's own client) and load the page, whose load event
    (queued: join the queue, read the result from the event stream) hands each an item. Then for SECONDS each one,
    in a loop: waits a think time drawn uniformly from 0 to 2 x THINK seconds, clicks a vote button chosen at
    random (the event the button fires in the browser, with the lease and reason boxes as inputs), and times the
    round trip from sending the event to its result, which shows the next item. The vote events skip Gradio's
    queue (queue=False), so, as the browser does, the client POSTs them to the event's run route with the page's
    session and reads the result from the response; a queued vote event would go through the queue instead.
    votes/s counts the votes answered within the SECONDS.
 4. The kill -9 check: KILL_ANNOTATORS annotators vote as above; after KILL_AFTER seconds the server gets SIGKILL
    (no shutdown, no flush) while votes are in flight. The server starts again on the same workspace; each
    annotator logs in again, loads the page, re-sends the vote that was in flight (same lease, same choice: the
    app answers "Already saved" when it had been stored) and votes for a few seconds more. Then the registry is
    read: every acknowledged vote (its answer said Saved or Already saved) must be stored, with its annotator,
    item and choice, exactly once; no annotator may hold two votes on one item.

The clients run in this process, on the same machine (and CPU core, when pinned) as the server: their own work is in
the figures, which are therefore pessimistic. Targets (issue 18): p95 < 150 ms at 20 annotators, >= 50 votes/s at 50.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry: the benchmark talks to 127.0.0.1 only
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
from gradio_client import Client  # noqa: E402

from align.labels import add_annotator  # noqa: E402
from align.registry import Registry  # noqa: E402
from align.registry.labels import Vote  # noqa: E402
from ui.serving import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
OVERLAP = 2
BUTTONS = {"A": "vote-a", "B": "vote-b", "tie": "vote-tie", "both-bad": "vote-both-bad", "skip": "vote-skip"}
CHOICES = ["A", "B", "tie", "both-bad", "skip"]
WEIGHTS = [40, 40, 10, 7, 3]
SAID = ("Saved:", "Already saved:")  # the status line of an acknowledged vote
TARGETS = {20: ("p95", 150.0), 50: ("votes/s", 50.0)}


# The workspace


def seed_workspace(root: Path, *, seed_votes: int, spare_items: int, people: list[str], rng: random.Random) -> str:
    """A candidates version with `seed_votes` votes stored; the benchmark's annotators added. Returns its ref."""
    registry = Registry(root)
    items = seed_votes // OVERLAP + spare_items
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Question {i}: how would you explain item {i} to a friend?"}],
            "completions": [[{"role": "assistant", "content": f"Answer {j} to question {i}. " * 8}] for j in (0, 1)],
            "sources": ["model-a", "model-b"],
        }
        for i in range(items)
    ]
    version = registry.register(rows, name="load-cands", kind="candidates")
    tables = registry.labels
    now = time.time() - 86_400  # a day's labeling, already done
    with tables.transaction():
        for k in range(seed_votes):
            item, annotator = k // OVERLAP, f"past-{(k // OVERLAP) % 20 * OVERLAP + k % OVERLAP:02d}"
            shown = rng.sample([0, 1], 2)
            leased = now + k * 0.5
            lease = tables.add_lease(version.id, "pairwise", item, annotator, shown, leased, leased + 600)
            choice = rng.choices(CHOICES, WEIGHTS)[0]
            seconds = round(rng.uniform(2, 30), 3)
            vote = tables.add_vote(
                version.id, "pairwise", item, annotator, shown, choice,
                ranking=None, scores=None, reason=None, seconds=seconds, lease_id=lease,
            )  # fmt: skip
            tables.release_lease(lease, leased + seconds)
            if rng.random() < 0.005:
                tables.add_undo(version.id, "pairwise", Vote(vote, item, annotator, "pairwise", tuple(shown), choice))
    for name in people:
        add_annotator(registry, name, password(name))
    registry.close()
    return version.ref


def password(name: str) -> str:
    return f"pw-{name}"


# The server


class Server:
    """`align label` in a subprocess, its output in a log file."""

    def __init__(self, root: Path, ref: str, port: int):
        self.root, self.ref, self.port = root, ref, port
        self.url = f"http://{HOST}:{port}/"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 180.0) -> None:
        self.starts += 1
        log = open(self.root.parent / f"server-{self.starts}.log", "w")
        command = [
            sys.executable, "-m", "align.cli", "label", "--candidates", self.ref, "--overlap", str(OVERLAP),
            "--host", HOST, "--port", str(self.port), "--workspace", str(self.root),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.url + "label-api/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                text = (self.root.parent / f"server-{self.starts}.log").read_text()
                raise RuntimeError(f"the label server did not start:\n{text[-3000:]}")
            time.sleep(0.2)

    def cpu_seconds(self) -> float:
        """The CPU time the server process has used (user + system)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush."""
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)


# The simulated annotators


class Gone(Exception):
    """The server went away while a vote was in flight."""


class TimedOut(Exception):
    """No answer to a vote within --timeout seconds."""


@dataclass
class Sent:
    """One vote event: what was sent, when, and what came back."""

    annotator: str
    lease: int
    item: int | None
    choice: str
    started: float
    latency: float | None = None  # seconds, None when no answer came
    status: str = ""  # the status line the app answered with

    @property
    def acknowledged(self) -> bool:
        return self.status.startswith(SAID)


@dataclass
class Annotator:
    name: str
    client: Client
    events: dict  # "load" and each choice -> the dependency's api_name
    ref: str
    lease: int = 0
    sent: list[Sent] = field(default_factory=list)
    http: httpx.Client | None = None  # for the events that skip the queue

    @classmethod
    def login(cls, url: str, name: str, ref: str) -> Annotator:
        client = Client(
            url,
            auth=(name, password(name)),
            verbose=False,
            analytics_enabled=False,
            download_files=False,
            ssl_verify=False,  # plain HTTP on loopback: skips loading CA certificates for each request
            httpx_kwargs={"timeout": 60},
        )
        annotator = cls(name, client, vote_events(client.config), ref)
        # The page's own connection for the events that skip the queue (the login cookie; plain HTTP on loopback)
        annotator.http = httpx.Client(cookies=client.cookies, verify=False, timeout=httpx.Timeout(60, connect=10))
        annotator.load()
        return annotator

    def load(self) -> None:
        """What the browser does on opening the page: the load event shows the annotator's item."""
        self.show(self.client.submit(self.ref, api_name=self.events["load"].api_name).result(timeout=120))

    def show(self, outputs) -> None:
        self.lease = int(outputs[0] or 0)  # the hidden lease box is the first output

    def vote(
        self, choice: str, *, lease: int | None = None, gone: threading.Event | None = None, timeout: float = 60.0
    ) -> Sent:
        """Click a vote button; wait for the answer (raise Gone if the server is killed meanwhile, TimedOut after
        `timeout` seconds)."""
        sent = Sent(self.name, self.lease if lease is None else lease, None, choice, time.monotonic())
        self.sent.append(sent)
        event = self.events[choice]
        if event.queued:
            outputs = self.through_queue(event, sent, gone, timeout)
        else:
            outputs = self.direct(event, sent, gone, timeout)
        sent.latency = time.monotonic() - sent.started
        sent.status = next((text for text in outputs if isinstance(text, str) and text.startswith(SAID)), "")
        if not sent.status:
            sent.status = next((t for t in outputs if isinstance(t, str) and t.startswith("Not saved")), "?")
        if sent.acknowledged:
            sent.item = int(sent.status.rsplit("item ", 1)[1].rstrip("."))
        self.show(outputs)
        return sent

    def through_queue(self, event: Event, sent: Sent, gone, timeout: float) -> list:
        """A queued event, as the browser sends it: join Gradio's queue, read the result from the event stream."""
        job = self.client.submit(self.ref, str(sent.lease), "", api_name=event.api_name)
        while True:
            try:
                return job.result(timeout=0.25)
            except TimeoutError:
                if gone is not None and gone.is_set():
                    raise Gone from None
                if time.monotonic() - sent.started > timeout:
                    raise TimedOut from None
            except Exception as exc:
                if gone is not None and gone.is_set():
                    raise Gone from None
                raise RuntimeError(f"{self.name}: the vote event failed: {exc}") from exc

    def direct(self, event: Event, sent: Sent, gone, timeout: float) -> list:
        """An event that skips the queue (queue=False), as the browser sends it: one POST to the event's run route
        with the page's session and the login cookie; the outputs come back in its response."""
        data = [self.ref, str(sent.lease), "", *[None] * (event.inputs - 3)]
        body = {"data": data, "fn_index": event.fn_index, "trigger_id": event.trigger_id, "event_data": None}
        try:
            response = self.http.post(
                f"{self.client.src.rstrip('/')}/gradio_api/run{event.api_name}",
                json={**body, "session_hash": self.client.session_hash},
            )
        except httpx.TimeoutException:
            raise TimedOut from None
        except httpx.TransportError as exc:
            if gone is not None and gone.is_set():
                raise Gone from None
            raise RuntimeError(f"{self.name}: the vote event failed: {exc}") from exc
        if response.status_code != 200:
            if gone is not None and gone.is_set():
                raise Gone from None
            raise RuntimeError(f"{self.name}: the vote event answered {response.status_code}: {response.text[:200]}")
        return response.json()["data"]

    def close(self) -> None:
        if self.http is not None:
            self.http.close()
        self.client.close()


@dataclass
class Event:
    """One event of the page, as its config describes it."""

    api_name: str
    fn_index: int
    trigger_id: int
    inputs: int
    queued: bool


def vote_events(config: dict) -> dict:
    """The page's load event and each vote button's click event (an Event), found by the buttons' elem_ids."""
    ids = {component.get("props", {}).get("elem_id"): component["id"] for component in config["components"]}
    events = {}
    for dependency in config["dependencies"]:
        for target, trigger in dependency["targets"]:
            event = Event(
                "/" + dependency["api_name"], dependency["id"], target, len(dependency["inputs"]),
                dependency.get("queue") is not False,
            )  # fmt: skip
            if trigger == "load":
                events["load"] = event
            for choice, elem_id in BUTTONS.items():
                if trigger == "click" and target == ids.get(elem_id):
                    events[choice] = event
    missing = {"load", *BUTTONS} - set(events)
    if missing:
        raise RuntimeError(f"the page has no event for {sorted(missing)}: has the ranking app changed?")
    return events


class NoPage(Exception):
    """Some annotators could not open the page."""


def log_in(url: str, names: list[str], ref: str, tries: int = 3) -> list[Annotator]:
    """Log everyone in and open the page, all at once, as a team starting work would; a page that fails to load is
    loaded again, up to `tries` times in all (raise NoPage if that fails)."""
    found: dict[str, Annotator] = {}
    errors: list[str] = []

    def one(name: str) -> None:
        for attempt in range(tries):
            try:
                found[name] = Annotator.login(url, name, ref)
                return
            except Exception as exc:
                if attempt == tries - 1:
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise NoPage(f"{len(errors)} of {len(names)} annotators could not open the page ({tries} tries): {errors[0]}")
    return [found[name] for name in names]


def vote_for(
    annotators: list[Annotator], seconds: float, think: float, seed: int, *, timeout: float, gone=None, kill=None
) -> dict:
    """Every annotator votes in a loop for `seconds`; `kill(after)` runs in the main thread meanwhile if given.
    An annotator whose vote gets no answer within `timeout` seconds stops. Returns {"sent": [Sent], "errors": [str],
    "in_flight": [Sent], "timed_out": [Sent], "window": (start, stop)}."""
    stop = time.monotonic() + seconds
    result = {"sent": [], "errors": [], "in_flight": [], "timed_out": []}
    lock = threading.Lock()

    def run(annotator: Annotator, rng: random.Random) -> None:
        try:
            while time.monotonic() < stop:
                pause = rng.uniform(0, 2 * think)
                if pause and (gone.wait(pause) if gone is not None else time.sleep(pause)):
                    return
                if time.monotonic() >= stop:
                    return
                sent = annotator.vote(rng.choices(CHOICES, WEIGHTS)[0], gone=gone, timeout=timeout)
                with lock:
                    result["sent"].append(sent)
        except Gone:
            with lock:
                result["in_flight"].append(annotator.sent[-1])
        except TimedOut:
            with lock:
                result["timed_out"].append(annotator.sent[-1])
        except Exception as exc:
            with lock:
                result["errors"].append(f"{annotator.name}: {type(exc).__name__}: {exc}")

    threads = [
        threading.Thread(target=run, args=(annotator, random.Random(f"{seed}:{annotator.name}")), daemon=True)
        for annotator in annotators
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    if kill is not None:
        kill(started)
    for thread in threads:
        thread.join(max(0.0, stop - time.monotonic()) + timeout + 30)
    result["window"] = (started, stop)
    return result


# Figures


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize(n: int, result: dict) -> dict:
    started, stop = result["window"]
    answered = [sent for sent in result["sent"] if sent.latency is not None]
    in_time = [sent for sent in answered if sent.started + sent.latency <= stop]
    refused = [sent for sent in answered if not sent.acknowledged]
    latencies = [sent.latency * 1000 for sent in answered]
    return {
        "n": n,
        "votes": len(in_time),
        "rate": len(in_time) / (stop - started),
        "p50": percentile(latencies, 50) if latencies else float("nan"),
        "p95": percentile(latencies, 95) if latencies else float("nan"),
        "p99": percentile(latencies, 99) if latencies else float("nan"),
        "refused": len(refused),
        "timed_out": len(result["timed_out"]),
        "errors": result["errors"],
    }


def target_text(row: dict) -> str:
    if row["n"] not in TARGETS:
        return ""
    key, goal = TARGETS[row["n"]]
    if key == "p95":
        return f"target p95 < {goal:.0f} ms: {'met' if row['p95'] < goal else 'NOT met'}"
    return f"target >= {goal:.0f} votes/s: {'met' if row['rate'] >= goal else 'NOT met'}"


def print_row(row: dict) -> None:
    print(
        f"{row['n']:>10}  {row['votes']:>6}  {row['rate']:>7.1f}  {row['p50']:>7.0f}  {row['p95']:>7.0f}  "
        f"{row['p99']:>7.0f}  {row['refused']:>7}  {row['timed_out']:>9}  {len(row['errors']):>6}  "
        f"{row['cpu'][0] * 1000:>6.1f} {row['cpu'][1] * 1000:>6.1f}  {row['load']:>4.1f}  {target_text(row)}",
        flush=True,
    )
    for error in row["errors"][:5]:
        print(f"            error: {error}", flush=True)


# The kill -9 check


def kill_check(server: Server, names: list[str], args) -> dict:
    gone = threading.Event()
    registry = Registry(server.root)
    version = registry.resolve(server.ref)
    before = registry.labels.last_row(version.id)  # the rows written from here on are this check's
    registry.close()
    annotators = log_in(server.url, names, server.ref)

    def kill(started: float) -> None:
        time.sleep(max(0.0, started + args.kill_after - time.monotonic()))
        deadline, waiting = time.monotonic() + 10, max(2, len(annotators) // 5)
        while (
            time.monotonic() < deadline
            and sum(bool(a.sent) and a.sent[-1].latency is None for a in annotators) < waiting
        ):
            time.sleep(0.002)  # kill while several votes are in flight (some may have their answer on the way)
        gone.set()  # set first: a vote failing from here on was in flight at the kill
        server.kill()

    first = vote_for(
        annotators, args.kill_after + 60, args.think, args.seed, timeout=args.timeout, gone=gone, kill=kill
    )
    for annotator in annotators:
        annotator.close()
    server.start()
    annotators = log_in(server.url, names, server.ref)  # a fresh page each: the load event shows their item
    retried = []
    for sent in first["in_flight"] + first["timed_out"]:
        annotator = next(a for a in annotators if a.name == sent.annotator)
        retried.append(annotator.vote(sent.choice, lease=sent.lease, timeout=args.timeout))  # the same click again
    second = vote_for(annotators, args.after_restart, args.think, args.seed + 1, timeout=args.timeout)
    for annotator in annotators:
        annotator.close()
    server.stop()

    acknowledged = [s for s in first["sent"] + retried + second["sent"] if s.acknowledged]
    registry = Registry(server.root)
    tables = registry.labels
    theirs = [vote for vote in tables.votes(version.id) if vote.annotator in set(names)]
    rows = [vote for vote in theirs if vote.id > before]
    by_id = {vote.id: vote for vote in rows}
    stored = 0
    for sent in acknowledged:
        vote_id = tables.vote_on_lease(sent.lease)
        vote = by_id.get(vote_id)
        if vote is not None and (vote.annotator, vote.item, vote.choice) == (sent.annotator, sent.item, sent.choice):
            stored += 1
    registry.close()
    pairs = Counter((vote.annotator, vote.item) for vote in theirs)  # over all their votes, before the check too
    leases = {sent.lease for sent in acknowledged}
    return {
        "acknowledged": len(acknowledged),
        "distinct": len(leases),
        "stored": stored,
        "duplicated": sum(count - 1 for count in pairs.values() if count > 1),
        "rows": len(rows),
        "in_flight": len(first["in_flight"]) + len(first["timed_out"]),
        "already_saved": sum(s.status.startswith("Already saved") for s in retried),
        "errors": first["errors"] + second["errors"],
    }


def quiet_client_threads() -> None:
    """gradio_client reads each event's stream on a thread of its own; when the kill -9 check cuts the server off,
    those threads die with a connection error. Say so in one line instead of a traceback per thread."""

    def hook(args: threading.ExceptHookArgs) -> None:
        print(f"(a client thread ended: {args.exc_type.__name__}: {args.exc_value})", file=sys.stderr)

    threading.excepthook = hook


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--annotators", default="1,20,50", help="the N to measure, in order (default: 1,20,50)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long each N votes (default: 20)")
    parser.add_argument("--think", type=float, default=0.5, help="mean think time before each vote, s (default: 0.5)")
    parser.add_argument("--seed-votes", type=int, default=100_000, help="votes stored before (default: 100,000)")
    parser.add_argument("--spare-items", type=int, default=10_000, help="items with no vote yet (default: 10,000)")
    parser.add_argument("--kill-annotators", type=int, default=20, help="annotators in the kill -9 check")
    parser.add_argument("--kill-after", type=float, default=6.0, help="seconds of voting before the SIGKILL")
    parser.add_argument("--after-restart", type=float, default=4.0, help="seconds of voting after the restart")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up on a vote after this many seconds")
    parser.add_argument("--no-kill", action="store_true", help="skip the kill -9 check")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main() -> int:
    quiet_client_threads()
    return 1 if measure(parser().parse_args())["failed"] else 0


def measure(args) -> dict:
    """The whole benchmark, printed as it goes. Returns {"rows": [one dict per N], "kill": the kill -9 check's
    figures or None, "failed": bool, "not_measured": why, or None}."""
    levels = [int(n) for n in args.annotators.split(",")]
    people = [f"bench-{i:02d}" for i in range(max(levels + [args.kill_annotators]))]
    measured = {"rows": [], "kill": None, "failed": False, "not_measured": None}
    print(f"label load benchmark, {datetime.now(timezone.utc).isoformat(timespec='seconds')}", flush=True)
    print(f"code: {ROOT}; python {sys.version.split()[0]}; cpus allowed: {sorted(os.sched_getaffinity(0))}")
    with tempfile.TemporaryDirectory(prefix="label-load-") as folder:
        root = Path(folder) / "ws"
        began = time.monotonic()
        ref = seed_workspace(
            root, seed_votes=args.seed_votes, spare_items=args.spare_items, people=people, rng=random.Random(args.seed)
        )
        print(
            f"workspace: {ref}, {args.seed_votes:,} votes stored before, {len(people)} annotators "
            f"(seeded in {time.monotonic() - began:.0f} s)"
        )
        server = Server(root, ref, free_port(HOST))
        began = time.monotonic()
        server.start()
        print(f"server: align label on {server.url} (started in {time.monotonic() - began:.1f} s)")
        print(
            f"each N votes for {args.seconds:g} s; think time uniform in [0, {2 * args.think:g}] s; latency = "
            "sending the vote event to its result, the browser's path (a POST, the vote events skip the queue); "
            "CPU ms/vote = CPU "
            "time of the server process (its idle queue polling included) and of these clients over the votes; "
            "load = the machine's 1-minute load average after the run"
        )
        print(f"{'annotators':>10}  {'votes':>6}  {'votes/s':>7}  {'p50 ms':>7}  {'p95 ms':>7}  {'p99 ms':>7}  "
              f"{'refused':>7}  {'timed out':>9}  {'errors':>6}  {'CPU ms/vote':>13}  {'load':>4}")  # fmt: skip
        print(f"{'':>73}{'server':>6} {'client':>6}")
        failed = False
        try:
            everyone = log_in(server.url, people[: max(levels)], ref)
            for n in levels:
                before = server.cpu_seconds(), sum(os.times()[:2])
                result = vote_for(everyone[:n], args.seconds, args.think, args.seed + n, timeout=args.timeout)
                row = summarize(n, result)
                votes = max(1, len(result["sent"]))
                row["cpu"] = [(server.cpu_seconds() - before[0]) / votes, (sum(os.times()[:2]) - before[1]) / votes]
                row["load"] = os.getloadavg()[0]
                print_row(row)
                measured["rows"].append(row)
                failed |= bool(row["errors"])
            for annotator in everyone:
                annotator.close()
            if not args.no_kill:
                check = kill_check(server, people[: args.kill_annotators], args)
                print(
                    f"kill -9 check ({args.kill_annotators} annotators, SIGKILL after {args.kill_after:g} s, "
                    f"{check['in_flight']} votes in flight re-sent after the restart, {check['already_saved']} "
                    "of them answered 'Already saved'):"
                )
                print(
                    f"  acknowledged {check['acknowledged']} ({check['distinct']} distinct leases), stored "
                    f"{check['stored']}, duplicated {check['duplicated']}; rows of these annotators {check['rows']}"
                )
                for error in check["errors"][:5]:
                    print(f"  error: {error}")
                ok = check["stored"] == check["distinct"] and check["duplicated"] == 0
                ok &= check["rows"] == check["distinct"]
                print(f"  {'passed' if ok else 'FAILED'}: every acknowledged vote stored once, nothing else stored")
                measured["kill"] = check | {"passed": ok}
                failed |= not ok
        except NoPage as exc:
            print(f"not measured: {exc}")
            measured["not_measured"] = str(exc)
            failed = True
        finally:
            server.stop()
    return measured | {"failed": failed}


if __name__ == "__main__":
    sys.exit(main())
