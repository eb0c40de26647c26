"""The ranking app through its HTTP API and the CLI: 20 annotators at once, a killed server, a restart,
refusals, and the votes aggregated into a preference version."""

import io
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from align.cli import main
from align.labels import OPEN_USER, LabelError, add_annotator
from align.registry import Registry
from ui.label_app import LabelDesk, create_app, lease_number
from ui.serving import BackgroundServer, free_port

ROOT = Path(__file__).resolve().parents[2]


def candidate_rows(count: int, completions: int = 2) -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"question {i}"}],
            "completions": [[{"role": "assistant", "content": f"answer {i}.{j}"}] for j in range(completions)],
            "sources": [f"model-{j}" for j in range(completions)],
        }
        for i in range(count)
    ]


@pytest.fixture
def workspace(tmp_path):
    registry = Registry(tmp_path / "ws")
    registry.register(candidate_rows(30), name="cands", kind="candidates")
    yield registry
    registry.close()


def test_twenty_annotators_vote_at_once(workspace):
    """No vote lost or duplicated, no item past its overlap, nobody on an item twice."""
    people = [f"annotator-{n:02d}" for n in range(20)]
    for name in people:
        add_annotator(workspace, name, f"pw-{name}")
    overlap = 3
    app = create_app(LabelDesk(workspace, "cands", overlap=overlap))
    acknowledged: list[tuple[int, str, int, str]] = []
    first_items: list[int] = []
    retried: list[int] = []
    problems: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(len(people))

    def annotate(name: str, url: str) -> None:
        try:
            vote_until_done(name, url)
        except Exception as exc:  # a thread's failure must fail the test, not vanish
            with lock:
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
            start.abort()

    def vote_until_done(name: str, url: str) -> None:
        chooser = random.Random(name)
        with httpx.Client(base_url=url, auth=(name, f"pw-{name}"), timeout=60) as client:
            view = client.get("/label-api/item").json()
            with lock:
                first_items.append(view["item"])
            start.wait(timeout=120)  # everyone holds an item: now all vote at once
            while view["status"] != "done":
                if view["status"] == "wait":
                    time.sleep(0.05)  # every open slot is leased by others right now
                    view = client.get("/label-api/item").json()
                    continue
                choice = chooser.choice(["A", "B", "tie", "both-bad", "skip"])
                body = {"lease": view["lease"], "choice": choice, "reason": f"{name} on {view['item']}"}
                response = client.post("/label-api/vote", json=body)
                if response.status_code != 200:
                    with lock:
                        problems.append(f"{name}: {response.status_code} {response.text}")
                    return
                result = response.json()
                with lock:
                    acknowledged.append((result["vote"], name, view["item"], choice))
                if chooser.random() < 0.2:  # a retried request: answered, not recorded again
                    again = client.post("/label-api/vote", json=body).json()
                    if not again["duplicate"] or again["vote"] != result["vote"]:
                        with lock:
                            problems.append(f"{name}: a retry was recorded again: {again}")
                    with lock:
                        retried.append(result["vote"])
                view = result["next"]

    with BackgroundServer(app) as url:
        threads = [threading.Thread(target=annotate, args=(name, url)) for name in people]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    assert not problems
    assert retried  # the idempotence path ran

    rows = workspace.db.execute("SELECT id, annotator, item, choice FROM comparisons ORDER BY id").fetchall()
    assert sorted(acknowledged) == [tuple(row) for row in rows]  # every acknowledged vote, once, nothing else
    assert len({vote_id for vote_id, *_ in acknowledged}) == len(acknowledged)
    pairs = Counter((name, item) for _, name, item, _ in acknowledged)
    assert max(pairs.values()) == 1  # nobody got an item twice
    counted = Counter(item for _, _, item, choice in acknowledged if choice != "skip")
    assert counted == {item: overlap for item in range(30)}  # every item done, none past its overlap
    assert len({name for _, name, _, _ in acknowledged}) == 20
    assert len(set(first_items)) == 20  # while items were free, no two annotators held the same one


def test_refusals_and_login(workspace):
    add_annotator(workspace, "alice", "alice-pw")
    add_annotator(workspace, "bob", "bob-pw")
    app = create_app(LabelDesk(workspace, "cands", overlap=1))
    with BackgroundServer(app) as url:
        assert httpx.get(url + "label-api/item").status_code == 401
        assert httpx.get(url + "label-api/item", auth=("alice", "wrong")).status_code == 401
        assert httpx.get(url + "label-api/item", auth=("mallory", "alice-pw")).status_code == 401
        alice = httpx.Client(base_url=url, auth=("alice", "alice-pw"))
        bob = httpx.Client(base_url=url, auth=("bob", "bob-pw"))
        lease = alice.get("/label-api/item").json()["lease"]
        refused = bob.post("/label-api/vote", json={"lease": lease, "choice": "A"})
        assert refused.status_code == 409 and "not leased to 'bob'" in refused.json()["detail"]
        assert alice.post("/label-api/vote", json={"lease": lease, "choice": "C"}).status_code == 409
        assert alice.post("/label-api/vote", json={"lease": "x", "choice": "A"}).status_code == 422
        assert alice.post("/label-api/vote", json={"lease": lease, "choice": "A"}).status_code == 200
        undone = alice.post("/label-api/undo").json()
        assert undone["undone"]["choice"] == "A" and undone["next"]["item"] == 0
        assert httpx.get(url + "label-api/health").json() == {"status": "ok"}  # anonymous: nothing about the data
        health = alice.get("/label-api/health").json()
        assert health == {
            "status": "ok",
            "candidates": "cands@1",
            "mode": "pairwise",
            "overlap": 1,
            "items": 30,
            "login": True,
        }
        assert httpx.get(url + "label-api/health", auth=("alice", "wrong")).status_code == 401
        alice.close()
        bob.close()
    rows = workspace.db.execute("SELECT annotator, choice, undoes FROM comparisons ORDER BY id").fetchall()
    assert [tuple(row) for row in rows] == [("alice", "A", None), ("alice", "undo", 1)]


def test_failed_logins_lock_out_the_api_and_the_login_page(workspace, caplog):
    """After NAME_LIMIT failures, even the right password waits: 429 with the wait on the API, and Gradio's login
    page (which only reacts to 400) gets the reason; every failure is logged with the client's address."""
    from ui.serving import NAME_LIMIT

    add_annotator(workspace, "alice", "alice-pw")
    caplog.set_level(logging.WARNING, logger="ui.serving")
    app = create_app(LabelDesk(workspace, "cands", overlap=1))
    with BackgroundServer(app) as url, httpx.Client(base_url=url) as client:
        for _ in range(NAME_LIMIT):
            failed = client.post("/login", data={"username": "alice", "password": "guess"})
            assert failed.status_code == 400 and failed.json()["detail"] == "Incorrect credentials."
        locked = client.post("/login", data={"username": "alice", "password": "alice-pw"})
        assert locked.status_code == 400
        assert locked.json()["detail"] == "too many failed logins for alice; try again in 30 s"
        api = client.get("/label-api/item", auth=("alice", "alice-pw"))
        assert api.status_code == 429 and api.headers["retry-after"] == "30"
        assert api.json()["detail"] == "too many failed logins for alice; try again in 30 s"
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("failed login")]
    assert len(failed) == NAME_LIMIT and all("for 'alice' from 127.0.0.1 at " in line for line in failed)


def test_numbers_out_of_range_are_refused_naming_the_field(workspace):
    """A lease SQLite cannot hold, or a score that is not a finite number: 422 naming the field and the value,
    never a 500; the desk (what the buttons call) refuses them too."""
    desk = LabelDesk(workspace, "cands", overlap=1, open_access=True)
    with BackgroundServer(create_app(desk)) as url, httpx.Client(base_url=url) as client:
        lease = client.get("/label-api/item").json()["lease"]
        for lease_sent in (10**23, -(10**23), 2**63):
            refused = client.post("/label-api/vote", json={"lease": lease_sent, "choice": "A"})
            assert refused.status_code == 422, refused.text
            assert refused.json()["detail"].startswith("field 'lease': Input should be ")
            assert refused.json()["detail"].endswith(f"(got {lease_sent})")
        for number, shown in (("1e999", "inf"), ("-Infinity", "-inf"), ("NaN", "nan")):  # JSON readers take them
            refused = client.post(
                "/label-api/vote",
                content=f'{{"lease": {lease}, "choice": "A", "scores": {{"clarity": {number}}}}}',
                headers={"content-type": "application/json"},
            )
            assert refused.status_code == 422, (number, refused.text)
            assert refused.json()["detail"] == f"field 'scores.clarity': Input should be a finite number (got {shown})"
        refused = client.post("/label-api/vote", json={"lease": "x", "choice": "A"})
        assert refused.json()["detail"] == (
            "field 'lease': Input should be a valid integer, unable to parse string as an integer (got 'x')"
        )
        assert client.post("/label-api/vote", json={"lease": lease, "choice": "A"}).status_code == 200
        health = client.get("/label-api/health").json()  # --open: loopback only, so the details are shown
        assert health["status"] == "ok" and health["items"] == 30
    with pytest.raises(LabelError, match=r"field 'lease' must be a whole number .* \(got 100000000000000000000000\)"):
        desk.vote(OPEN_USER, 10**23, "A")
    assert desk.store.lease_shown(10**23) is None
    with pytest.raises(LabelError, match=r"field 'scores' must map rubric names to finite numbers \(got \{'x': inf\}"):
        desk.vote(OPEN_USER, lease + 1, "A", scores={"x": float("inf")})
    with pytest.raises(LabelError, match="field 'lease' must be a whole number \\(got 'x1'\\)"):
        lease_number("x1")


def run_cli(workspace: Path, *args: str, stdin: str | None = None, capsys=None) -> tuple[int, str, str]:
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        code = main([*args, "--workspace", str(workspace)])
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_errors_at_start(workspace, capsys):
    root = workspace.root
    workspace.register(
        [{"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}],
        name="prefs",
        kind="preference",
    )  # fmt: skip
    code, _, err = run_cli(root, "label", "--candidates", "prefs", "--open", capsys=capsys)
    assert code == 2 and "holds 'preference' rows, but the ranking app needs 'candidates' rows" in err
    code, _, err = run_cli(root, "label", "--candidates", "cands", capsys=capsys)
    assert code == 2 and "no annotators in" in err and "--open" in err
    code, _, err = run_cli(root, "label", "--candidates", "cands", "--mode", "rank", "--open", capsys=capsys)
    assert code == 2 and "rank mode orders three or more completions" in err
    add_annotator(workspace, "alice", "alice-pw")
    code, _, err = run_cli(root, "label", "--candidates", "cands", "--open", capsys=capsys)
    assert code == 2 and "--open is refused: 1 annotator(s) exist" in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _, err = run_cli(root, "label", "--candidates", "cands", "--port", str(port), capsys=capsys)
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err


def test_cli_label_and_compare_bind_to_loopback_unless_exposed(workspace, capsys, monkeypatch):
    """The rule of `align serve`: another --host needs --expose, and --expose needs login (never --open)."""
    import ui.serving

    served = []
    monkeypatch.setattr(ui.serving, "serve", lambda app, host, port: served.append(host))
    root, port = workspace.root, str(free_port())
    label = ["label", "--candidates", "cands", "--port", port]
    compare = ["compare", "--models", "nowhere-a,nowhere-b", "--port", port]  # refused before any model loads
    for command in (label, compare):
        code, _, err = run_cli(root, *command, "--open", "--host", "0.0.0.0", capsys=capsys)
        assert code == 2 and "--host 0.0.0.0 would make the app reachable from other machines: add --expose" in err
        code, _, err = run_cli(root, *command, "--open", "--host", "0.0.0.0", "--expose", capsys=capsys)
        assert code == 2 and "--open and --expose do not go together" in err
        code, _, err = run_cli(root, *command, "--host", "0.0.0.0", "--expose", capsys=capsys)
        assert code == 2 and "--expose needs login, and there are no annotators" in err
    assert served == []
    add_annotator(workspace, "alice", "alice-pw")
    code, out, _ = run_cli(root, *label, "--host", "0.0.0.0", "--expose", capsys=capsys)
    assert code == 0 and served == ["0.0.0.0"] and "log in with an annotator's name and password" in out


def test_cli_annotators_and_from_labels(workspace, capsys):
    root = workspace.root
    code, out, _ = run_cli(root, "annotators", "list", capsys=capsys)
    assert code == 0 and out.startswith("no annotators in")
    code, out, _ = run_cli(
        root, "annotators", "add", "alice", "--admin", "--password-stdin", stdin="a-pw\n", capsys=capsys
    )
    assert (code, out) == (0, "added annotator alice (admin)\n")
    code, out, _ = run_cli(root, "annotators", "add", "bob", "--password-stdin", stdin="b-pw\n", capsys=capsys)
    assert code == 0
    code, _, err = run_cli(root, "annotators", "add", "bob", "--password-stdin", stdin="x\n", capsys=capsys)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(root, "data", "from-labels", "cands", "--name", "prefs", capsys=capsys)
    assert code == 2 and "no votes on cands@1 yet" in err

    from align.labels import LabelStore

    store = LabelStore(workspace, "cands", overlap=2, seed=0)
    for name in ("alice", "bob"):
        for _ in range(3):
            shown = store.current(name)
            # Both prefer the completion with index 0 on items 0-2.
            store.vote(name, shown.lease, "A" if shown.shown[0] == 0 else "B")
    code, out, err = run_cli(root, "data", "from-labels", "cands", "--name", "prefs", "--min-votes", "2", capsys=capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "prefs@1  3 rows  kind=preference  (from cands@1)"
    assert (
        lines[1]
        == "6 votes by 2 annotators on 3 pairs: 3 kept, 0 ties kept, 0 ties dropped, 0 both bad, 0 below --min-votes"
    )
    assert lines[2] == "agreement: Krippendorff's alpha -, raw 100%"  # one label throughout: alpha undefined
    version = Registry(root).resolve("prefs")
    rows = Registry(root).rows(version)
    assert [row["chosen"][0]["content"] for row in rows] == ["answer 0.0", "answer 1.0", "answer 2.0"]
    assert all((row["margin"], row["weight"]) == (1.0, 1.0) for row in rows)
    code, out, _ = run_cli(root, "annotators", "list", capsys=capsys)
    assert [line.split()[:3] for line in out.splitlines()] == [
        ["ANNOTATOR", "ADMIN", "VOTES"],
        ["alice", "yes", "3"],
        ["bob", "-", "3"],
    ]


def start_cli_server(root: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "align.cli", "label", "--candidates", "cands", "--open", "--port", str(port),
         "--workspace", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    lines = []
    for line in process.stdout:  # the last line it prints before serving names the URL
        lines.append(line)
        if line.startswith("open http"):
            break
    assert lines[-1].startswith(f"open http://127.0.0.1:{port}/"), "".join(lines) + process.stderr.read()
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/label-api/health").status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.1)


def test_a_killed_server_loses_no_acknowledged_vote_and_resumes(workspace):
    root, port = workspace.root, free_port()
    process = start_cli_server(root, port)
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        view = api.get("/label-api/item").json()
        acknowledged = []
        for choice in ("A", "B", "tie", "skip", "both-bad"):
            result = api.post("/label-api/vote", json={"lease": view["lease"], "choice": choice}).json()
            acknowledged.append((result["vote"], view["item"], choice))
            view = result["next"]
        os.kill(process.pid, signal.SIGKILL)  # no shutdown, no flush
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
    votes = Registry(root).labels.votes(workspace.resolve("cands").id)
    assert [(v.id, v.item, v.choice, v.annotator) for v in votes] == [(*a, "local") for a in acknowledged]

    process = start_cli_server(root, port)
    try:
        again = httpx.get(f"http://127.0.0.1:{port}/label-api/item").json()
        assert (again["lease"], again["item"], again["shown"]) == (view["lease"], view["item"], view["shown"])
        assert again["progress"]["mine"] == 4  # the skip does not count
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
