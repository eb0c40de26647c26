"""Serving the Gradio apps: who may come in (annotator logins, or one local user with --open), check the port
before starting, run in the foreground (the CLI) or in a background thread (tests), and stop cleanly."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import socket
import threading
import time

from align.errors import AlignError


def check_access(registry, open_access: bool) -> None:
    """Login is required whenever an annotator exists; without one, an app starts only for one local user."""
    annotators, root = registry.labels.count_annotators(), registry.root
    if not open_access and not annotators:
        raise AlignError(
            f"no annotators in {root} yet: add one with `align annotators add NAME` "
            "(it asks for a password), or run with --open for a single local user"
        )
    if open_access and annotators:
        raise AlignError(
            f"--open is refused: {annotators} annotator(s) exist in {root}, so login is required "
            "(drop --open and log in; `align annotators list` shows who)"
        )


class Logins:
    """Checks a name and password against the registry's salted scrypt hashes; scrypt runs once per password,
    not on every request (a verified login is remembered as a keyed hash, never as the password)."""

    def __init__(self, labels):
        self._labels = labels  # the registry's label tables (registry.labels): a connection per thread
        self._secret = secrets.token_bytes(32)
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()

    def check(self, name: str, password: str) -> bool:
        from align.labels import verify_password

        found = self._labels.annotator(name)
        if found is None or not password:
            return False
        key = hmac.new(self._secret, f"{name}\0{password}\0{found['password']}".encode(), hashlib.sha256).digest()
        with self._lock:
            if key in self._verified:
                return True
        if not verify_password(password, found["password"]):
            return False
        with self._lock:
            self._verified.add(key)
        return True


def request_user(request, open_access: bool) -> str:
    """Who sent a Gradio request: the one local user with --open, else the annotator logged in."""
    from align.labels import OPEN_USER, LabelError

    if open_access:
        return OPEN_USER
    if request is None or not request.username:
        raise LabelError("not logged in")
    return request.username


def check_port(host: str, port: int) -> None:
    """Fail at start, with a message, when the port cannot be had (rather than deep inside uvicorn)."""
    if not 0 < port < 65536:
        raise AlignError(f"--port {port} is not a port number (1-65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise AlignError(f"cannot listen on {host}:{port} ({exc.strerror}): pass another --port") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def url_for(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(app, host: str, port: int) -> None:
    """Run until Ctrl-C (uvicorn handles the signal and shuts down gracefully)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning")


class BackgroundServer:
    """`with BackgroundServer(app) as url:` serves the app on a free localhost port in a thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None):
        import uvicorn

        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return url_for(self.host, self.port)

    def start(self, timeout: float = 60.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
