"""Who may come in: the failed-login throttle (on a fake clock), the same cost for unknown and known names, the
failed-login log, and the host rule `align label` and `align compare` share with `align serve`."""

import hashlib
import logging

import pytest
from fastapi import HTTPException

from align.errors import AlignError
from align.labels import add_annotator
from align.registry import Registry
from ui import serving
from ui.serving import ADDRESS_LIMIT, LOCK_SECONDS, NAME_LIMIT, QUIET_SECONDS, LoginLocked, Logins, check_host_access


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "ws")
    add_annotator(registry, "alice", "alice-pw")
    yield registry
    registry.close()


def test_a_name_is_locked_out_after_repeated_failures_for_a_growing_time(registry, caplog):
    clock = Clock()
    logins = Logins(registry.labels, clock=clock)
    caplog.set_level(logging.WARNING, logger="ui.serving")
    for _ in range(NAME_LIMIT):
        assert logins.verify("alice", "guess", "10.0.0.5") is False
    with pytest.raises(LoginLocked, match=f"too many failed logins for alice; try again in {LOCK_SECONDS:.0f} s"):
        logins.verify("alice", "alice-pw", "10.0.0.6")  # the right password, from elsewhere: still refused
    clock.now += LOCK_SECONDS - 1
    with pytest.raises(LoginLocked, match="try again in 1 s"):
        logins.verify("alice", "alice-pw", "10.0.0.5")
    clock.now += 1
    assert logins.verify("alice", "guess", "10.0.0.5") is False  # one more failure: the wait doubles
    with pytest.raises(LoginLocked, match=f"try again in {2 * LOCK_SECONDS:.0f} s"):
        logins.verify("alice", "alice-pw", "10.0.0.5")
    clock.now += 2 * LOCK_SECONDS
    assert logins.verify("alice", "alice-pw", "10.0.0.5") is True
    assert logins.verify("alice", "guess", "10.0.0.5") is False  # a success forgot the failures before it
    assert logins.verify("alice", "alice-pw", "10.0.0.5") is True

    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("failed login")]
    refused = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused login")]
    assert len(failed) == NAME_LIMIT + 2 and len(refused) == 3
    assert all("'alice' from 10.0.0.5 at 20" in line for line in failed)  # name, address, time
    assert "refused login for 'alice' from 10.0.0.6 at 20" in refused[0]


def test_failures_far_apart_do_not_lock(registry):
    clock = Clock()
    logins = Logins(registry.labels, clock=clock)
    for _ in range(2):
        for _ in range(NAME_LIMIT - 1):
            assert logins.verify("alice", "guess", "10.0.0.5") is False
        clock.now += QUIET_SECONDS
    assert logins.verify("alice", "alice-pw", "10.0.0.5") is True


def test_an_address_is_locked_out_whatever_name_it_tries(registry):
    clock = Clock()
    logins = Logins(registry.labels, clock=clock)
    for n in range(ADDRESS_LIMIT):
        assert logins.verify(f"user-{n}", "guess", "10.0.0.9") is False  # unknown names count too
    with pytest.raises(LoginLocked, match="too many failed logins from 10.0.0.9; try again in 30 s"):
        logins.verify("alice", "alice-pw", "10.0.0.9")
    assert logins.verify("alice", "alice-pw", "10.0.0.10") is True  # from another address


def test_gradio_login_check_answers_a_lockout_with_the_reason(registry):
    """Gradio's login page calls check(name, password); the address comes from the ClientAddress middleware."""
    logins = Logins(registry.labels, clock=Clock())
    token = serving.CLIENT.set("192.0.2.1")
    try:
        for _ in range(NAME_LIMIT):
            assert logins.check("alice", "guess") is False
        with pytest.raises(HTTPException) as refused:
            logins.check("alice", "alice-pw")
    finally:
        serving.CLIENT.reset(token)
    assert refused.value.status_code == 400 and refused.value.detail.startswith("too many failed logins for alice")
    for n in range(ADDRESS_LIMIT - NAME_LIMIT):  # check() counted its failures against the request's address
        assert logins.verify(f"user-{n}", "guess", "192.0.2.1") is False
    with pytest.raises(LoginLocked, match="from 192.0.2.1"):
        logins.verify("carol", "guess", "192.0.2.1")


def test_an_unknown_name_costs_one_scrypt_like_a_known_one(registry, monkeypatch):
    logins = Logins(registry.labels, clock=Clock())
    calls = []
    real = hashlib.scrypt

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "scrypt", counted)
    assert logins.verify("mallory", "guess", "10.0.0.5") is False
    unknown = len(calls)
    calls.clear()
    assert logins.verify("alice", "guess", "10.0.0.5") is False
    assert unknown == len(calls) == 1


def test_label_and_compare_take_the_host_rule_of_serve(registry, tmp_path):
    empty = Registry(tmp_path / "empty")
    check_host_access(empty, "127.0.0.1", False, True)  # loopback, --open, nobody registered
    check_host_access(registry, "0.0.0.0", True, False)  # exposed, with login
    with pytest.raises(AlignError, match="--host 0.0.0.0 would make the app reachable.*add --expose"):
        check_host_access(empty, "0.0.0.0", False, True)
    with pytest.raises(AlignError, match="--open and --expose do not go together"):
        check_host_access(empty, "0.0.0.0", True, True)
    with pytest.raises(AlignError, match="--expose needs login.*align annotators add"):
        check_host_access(empty, "0.0.0.0", True, False)
    with pytest.raises(AlignError, match="--open is refused: 1 annotator"):
        check_host_access(registry, "127.0.0.1", False, True)
    empty.close()
