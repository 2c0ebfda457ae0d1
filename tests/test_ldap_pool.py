"""The LDAP connection pool: backoff after failures, deadlines on requests (task.Clock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from mailguard.config import ldap as ldap_config
from mailguard.directory import ldapfilter
from mailguard.directory.base import DirectoryError
from mailguard.directory.ldapconn import Connection, Pool

CFG = ldap_config.parse({"url": "ldap://127.0.0.1:1", "base": "dc=example", "starttls": False},
                        lambda k, m: AssertionError(f"{k}: {m}"), Path("/"), required=True)
FILTER = ldapfilter.parse("(mail=a@example.org)")


class FakeClient:
    """An ldaptor client whose requests are never answered."""

    def __init__(self) -> None:
        self.connected = 1
        self.sent: list[Any] = []
        self.aborted = 0
        self.transport = self

    def send_multiResponse(self, op: Any, handler: Any) -> defer.Deferred[Any]:
        self.sent.append(op)
        return defer.Deferred()

    def abortConnection(self) -> None:
        self.aborted += 1
        self.connected = 0


class Opener:
    """Stands in for connect+bind: each call returns a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[defer.Deferred[Connection]] = []

    def __call__(self) -> defer.Deferred[Connection]:
        d: defer.Deferred[Connection] = defer.Deferred()
        self.calls.append(d)
        return d


def failure_of(d: defer.Deferred[Any]) -> BaseException:
    box: list[Any] = []
    d.addErrback(box.append)
    assert box, "the Deferred has not failed"
    return box[0].value  # type: ignore[no-any-return]


def test_backoff_after_failed_connects_then_recovery() -> None:
    """Each failed connect doubles the wait (0.5 s, 1, 2 ... at most max_backoff); lookups in between fail at once."""
    clock = task.Clock()
    opener = Opener()
    pool = Pool(clock, CFG, opener=opener, max_backoff=4)
    waits = []
    for _ in range(5):
        d = pool.connection()
        assert len(opener.calls) == len(waits) + 1
        opener.calls[-1].errback(DirectoryError("connection refused"))
        assert "connection refused" in str(failure_of(d))
        early = pool.connection()                        # inside the backoff: no new attempt
        assert len(opener.calls) == len(waits) + 1
        assert "unreachable" in str(failure_of(early))
        wait = pool._retry_at - clock.seconds()
        waits.append(wait)
        clock.advance(wait)
    assert waits == [0.5, 1, 2, 4, 4]
    d = pool.connection()
    conn = Connection(FakeClient(), clock, 10)
    opener.calls[-1].callback(conn)
    assert d.result is conn
    assert pool._failures == 0


def test_waiters_share_one_connect() -> None:
    """Lookups that arrive while a connection is being opened wait for it, not for one each."""
    clock = task.Clock()
    opener = Opener()
    pool = Pool(clock, CFG, opener=opener, size=1)
    first, second = pool.connection(), pool.connection()
    assert len(opener.calls) == 1
    conn = Connection(FakeClient(), clock, 10)
    opener.calls[0].callback(conn)
    assert first.result is conn and second.result is conn


def test_search_without_answer_times_out_and_drops_the_connection() -> None:
    """A search the server never answers fails with DirectoryError after the timeout; the connection is aborted."""
    clock = task.Clock()
    opener = Opener()
    pool = Pool(clock, CFG, opener=opener, size=1, timeout=10)
    client = FakeClient()
    d = pool.search("dc=example", 2, FILTER, ["mail"])
    opener.calls[0].callback(Connection(client, clock, 10))
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert len(client.sent) == 1 and outcome == []
    clock.advance(9.9)
    assert outcome == []
    clock.advance(0.2)
    assert isinstance(outcome[0].value, DirectoryError)
    assert client.aborted == 1
    pool.connection()
    assert len(opener.calls) == 2                          # a fresh connection is opened at once


@pytest.mark.parametrize("value, escaped", [("*", r"\2a"), ("a(b)c", r"a\28b\29c"), ("x\\y", r"x\5cy"),
                                            ("nul\0", r"nul\00"), ("plain@example.org", "plain@example.org")])
def test_rfc4515_escaping(value: str, escaped: str) -> None:
    """The five characters RFC 4515 section 3 names are escaped; the parsed value is the original."""
    assert ldapfilter.escape(value) == escaped
    parsed = ldapfilter.parse(ldapfilter.fill("(mail={address})", value))
    assert parsed.assertionValue.value == value.encode()
