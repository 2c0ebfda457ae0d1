"""The LDAP connection pool: backoff after failures, deadlines on requests (task.Clock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task

from mailguard.config import ldap as ldap_config
from mailguard.directory import ldapfilter
from mailguard.directory.base import DirectoryError
from mailguard.directory.ldap import LDAPDirectory
from mailguard.directory.ldapconn import Connection, Entry, Pool

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


class FakeDirectoryPool:
    """Answers searches from a table: (base, attributes asked) -> entries; subtree searches by filter text."""

    def __init__(self, by_filter: dict[str, list[Entry]], by_base: dict[str, Entry]) -> None:
        self.by_filter = by_filter
        self.by_base = by_base
        self.asked: list[tuple[str, list[str]]] = []

    def search(self, base: str, scope: int, filt: Any, attributes: list[str]) -> defer.Deferred[list[Entry]]:
        self.asked.append((base, attributes))
        if scope == 2:
            return defer.succeed([e for text, es in self.by_filter.items() if text.encode() in filt.toWire() for e in es])
        ranged = [a for a in attributes if ";range=" in a]
        entry = self.by_base.get(base + ("|" + ranged[0] if ranged else ""))
        return defer.succeed([entry] if entry else [])

    def close(self) -> None:
        pass


def test_active_directory_member_ranges_are_all_read() -> None:
    """A group AD returns as member;range=0-1 is read on (range=2-*) until the range ends in '*'."""
    cfg = ldap_config.parse({"url": "ldap://dc1.example", "base": "dc=example", "schema": "ad"},
                            lambda k, m: AssertionError(f"{k}: {m}"), Path("/"), required=True)
    users = {f"cn=u{i},dc=example": Entry(f"cn=u{i},dc=example", {"objectclass": ("user",),
                                                                  "mail": (f"u{i}@example.org",)})
             for i in range(5)}
    group = Entry("cn=big,dc=example", {"objectclass": ("group",), "mail": ("big@example.org",),
                                        "member;range=0-1": ("cn=u0,dc=example", "cn=u1,dc=example")})
    page2 = Entry("cn=big,dc=example", {"member;range=2-3": ("cn=u2,dc=example", "cn=u3,dc=example")})
    page3 = Entry("cn=big,dc=example", {"member;range=4-*": ("cn=u4,dc=example",)})
    pool = FakeDirectoryPool({"group": [group]},
                             {**users, "cn=big,dc=example|member;range=2-*": page2,
                              "cn=big,dc=example|member;range=4-*": page3})
    d = LDAPDirectory(cfg, task.Clock(), ["example.org"], pool=pool)  # type: ignore[arg-type]
    result = d.expand("big@example.org")
    got = result.result
    assert sorted(got.mailboxes) == [f"u{i}@example.org" for i in range(5)]
