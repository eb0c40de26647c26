"""Serving the Gradio apps: who may come in (annotator logins, or one local user with --open), from where (loopback
only unless --expose), check the port before starting, run in the foreground (the CLI) or in a background thread
(tests), and stop cleanly.

Logins. Passwords are checked against the registry's salted scrypt hashes; an unknown name is checked against a
dummy hash, so that it costs as long as a known one (the answer time does not tell which names exist). Failed
logins are counted per name and per client address (in memory, for the life of the server): after
`NAME_LIMIT` failures for a name, or `ADDRESS_LIMIT` from an address, with no `QUIET_SECONDS` pause between them,
that name or address is refused for `LOCK_SECONDS`, doubling with each further failure up to `MAX_LOCK_SECONDS`
("too many failed logins for NAME; try again in N s"), whatever the password. Every failed or refused login is
logged (name, address, time) to the server's log.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import socket
import threading
import time
from collections import OrderedDict
from datetime import datetime, timezone

from align.errors import AlignError

log = logging.getLogger(__name__)

NAME_LIMIT = 5  # failed logins for one name before it waits
ADDRESS_LIMIT = 20  # failed logins from one address (several annotators may share one) before it waits
QUIET_SECONDS = 15 * 60  # a pause this long without a failure forgets the failures before it
LOCK_SECONDS = 30.0  # the first wait; it doubles with each failure after it
MAX_LOCK_SECONDS = 15 * 60.0
MAX_TRACKED = 10_000  # names and addresses remembered at most (the quietest are forgotten first)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


def check_exposure(host: str, expose: bool, annotators: int, root) -> bool:
    """Whether login is required; refuses a non-loopback host without --expose, and --expose without annotators."""
    if not is_loopback(host) and not expose:
        raise AlignError(
            f"--host {host} would make the app reachable from other machines: add --expose to mean it "
            "(login is then required), or leave --host at 127.0.0.1"
        )
    if expose and not annotators:
        raise AlignError(
            f"--expose needs login, and there are no annotators in {root} yet: add one with "
            "`align annotators add NAME --admin` (it asks for a password)"
        )
    return annotators > 0


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


def check_host_access(registry, host: str, expose: bool, open_access: bool) -> None:
    """`align label` and `align compare`: the host rule of `align serve` (check_exposure: a non-loopback host
    needs --expose, and --expose needs login), then the --open rule (check_access)."""
    if open_access and expose:
        raise AlignError("--open and --expose do not go together: an exposed app requires login (drop --open)")
    check_exposure(host, expose, registry.labels.count_annotators(), registry.root)
    check_access(registry, open_access)


# Logins


CLIENT = contextvars.ContextVar("client_address", default="unknown")  # set for each request by ClientAddress


class ClientAddress:
    """ASGI middleware that puts each request's client address in CLIENT, for the login check Gradio calls with
    a name and a password only."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        client = scope.get("client") if scope["type"] in ("http", "websocket") else None
        if not client:
            return await self.app(scope, receive, send)
        token = CLIENT.set(str(client[0]))
        try:
            await self.app(scope, receive, send)
        finally:
            CLIENT.reset(token)


class LoginLocked(AlignError):
    """A login refused before its password is checked: too many failed logins for its name or from its address."""

    def __init__(self, message: str, wait: int):
        super().__init__(message)
        self.wait = wait  # seconds until it may try again


class Throttle:
    """Failed logins per name and per address, on `clock` (seconds; tests pass a fake one). See the module
    docstring for the rule."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._failures: OrderedDict[tuple[str, str], list[float]] = OrderedDict()  # key -> [count, last, until]
        self._lock = threading.Lock()

    def check(self, name: str, address: str) -> None:
        """Raise LoginLocked while the name or the address must wait."""
        now = self.clock()
        with self._lock:
            for key, said in ((("name", name), f"for {name}"), (("address", address), f"from {address}")):
                until = self._failures[key][2] if key in self._failures else 0.0
                if until > now:
                    wait = math.ceil(until - now)
                    raise LoginLocked(f"too many failed logins {said}; try again in {wait} s", wait)

    def failed(self, name: str, address: str) -> int:
        """Count a failure for the name and the address; returns the name's failures in a row."""
        now = self.clock()
        counts = []
        with self._lock:
            for key, limit in ((("name", name), NAME_LIMIT), (("address", address), ADDRESS_LIMIT)):
                count, last, until = self._failures.pop(key, (0, now, 0.0))
                count = 1 if now - last >= QUIET_SECONDS else count + 1
                if count >= limit:
                    until = now + min(MAX_LOCK_SECONDS, LOCK_SECONDS * 2 ** min(count - limit, 20))
                self._failures[key] = [count, now, until]  # the newest last: the oldest are forgotten first
                counts.append(count)
            while len(self._failures) > MAX_TRACKED:
                self._failures.popitem(last=False)
        return counts[0]

    def succeeded(self, name: str) -> None:
        """A right password forgets the name's failures (not the address's: one good account must not reset it)."""
        with self._lock:
            self._failures.pop(("name", name), None)


@functools.cache
def dummy_hash() -> str:
    """The hash an unknown name's password is checked against: a random password's, made once per process."""
    from align.labels import hash_password

    return hash_password(secrets.token_hex(16))


class Logins:
    """Checks a name and password against the registry's salted scrypt hashes, behind the failed-login throttle.
    scrypt runs once per password, not on every request (a verified login is remembered as a keyed hash, never as
    the password)."""

    def __init__(self, labels, *, clock=time.monotonic):
        self._labels = labels  # the registry's label tables (registry.labels): a connection per thread
        self._secret = secrets.token_bytes(32)
        self._verified: set[bytes] = set()
        self._lock = threading.Lock()
        self._dummy = dummy_hash()
        self.throttle = Throttle(clock)

    def check(self, name: str, password: str) -> bool:
        """Gradio's login check (the address comes from ClientAddress). A locked-out login is answered HTTP 400,
        what Gradio's login page shows as a failed login, with the reason as its detail."""
        try:
            return self.verify(name, password, CLIENT.get())
        except LoginLocked as exc:
            from fastapi import HTTPException

            raise HTTPException(400, str(exc)) from None

    def verify(self, name: str, password: str, address: str) -> bool:
        """Whether the password is the name's; raises LoginLocked while the name or the address must wait.
        Every failed or refused login is logged."""
        try:
            self.throttle.check(name, address)
        except LoginLocked as exc:
            log.warning("refused login for %r from %s at %s: %s", name, address, _utc_now(), exc)
            raise
        if self._password_ok(name, password):
            self.throttle.succeeded(name)
            return True
        count = self.throttle.failed(name, address)
        log.warning("failed login for %r from %s at %s (%d in a row for the name)", name, address, _utc_now(), count)
        return False

    def _password_ok(self, name: str, password: str) -> bool:
        from align.labels import verify_password

        if not password:
            return False
        found = self._labels.annotator(name)
        if found is None:
            verify_password(password, self._dummy)  # as long as a known name takes
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


def login_message(what: str) -> str:
    """The text over Gradio's login form: what to log in to, and the lockout rule (the form itself says only
    "Incorrect credentials", even while a name is locked out)."""
    return f"{what} After {NAME_LIMIT} failed logins, a name waits {LOCK_SECONDS:.0f} s or more before it tries again."


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
