"""Tests for :mod:`mailguard.pop3.server` over ``StringTransport`` with a ``task.Clock``."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import StringTransport
from zope.interface import directlyProvides

from delivery_helpers import deliver

from mailguard import config
from mailguard.pop3 import server as pop3
from mailguard.pop3 import stream
from mailguard.auth.authenticator import Throttled
from mailguard.storage.maildir import LockTable, Mailbox, maildir_path
from mailguard.pop3.server import POP3Factory

ALICE = "alice@example.com"
PASSWORD = "s3cret pass"


class FakeAuthenticator:
    """Knows alice and bob; can hold answers back or throttle."""

    def __init__(self) -> None:
        self.users = {"alice": (PASSWORD, ALICE), ALICE: (PASSWORD, ALICE),
                      "bob": ("bobpw", "bob@example.com")}
        self.calls: list[tuple[str, str, str, str]] = []
        self.hold = False
        self.held: list[defer.Deferred[str | None]] = []
        self.error: Exception | None = None

    def check(self, login: str, password: str, client_ip: str, service: str) -> defer.Deferred[str | None]:
        self.calls.append((login, password, client_ip, service))
        if self.error is not None:
            return defer.fail(self.error)
        entry = self.users.get(login)
        result = entry[1] if entry and entry[0] == password else None
        if self.hold:
            d: defer.Deferred[str | None] = defer.Deferred()
            self.held.append(d)
            d.addCallback(lambda _: result)
            return d
        return defer.succeed(result)


class FakePopBeforeSmtp:
    def __init__(self) -> None:
        self.recorded: list[str] = []

    def record(self, ip: str) -> None:
        self.recorded.append(ip)


class FakeTLS:
    def options(self) -> str:
        return "tls-options"


class TLSCapableTransport(StringTransport):
    """A StringTransport that can start TLS (and then provides ISSLTransport)."""

    tls_started_with: Any = None
    #: Like a real transport: past this many unread octets, pause the registered producer.
    bound: int | None = None

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.bound is not None and len(self.value()) > self.bound and self.producer is not None:
            self.producer.pauseProducing()

    def startTLS(self, options: Any) -> None:
        self.tls_started_with = options
        directlyProvides(self, ISSLTransport)


def sync(f: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args, **kw)


class Env:
    """A factory with fakes; sessions connect from chosen client IPs."""

    def __init__(self, tmp_path: Path, **overrides: Any) -> None:
        data = {"server": {"data_dir": str(tmp_path), "hostname": "mail.example.com"}}
        for section, values in overrides.items():
            data.setdefault(section, {}).update(values)
        self.cfg = config.parse(data, "test", tmp_path)
        self.auth = FakeAuthenticator()
        self.pbs = FakePopBeforeSmtp()
        self.clock = task.Clock()
        self.factory = POP3Factory(self.cfg, self.auth, self.pbs, FakeTLS(), clock=self.clock,
                                   run_in_thread=sync, locks=LockTable())
        self.box = maildir_path(self.cfg.mail_dir, ALICE)

    def session(self, ip: str = "192.0.2.1", tls: bool = False) -> Session:
        return Session(self, ip, tls)

    def deliver(self, *messages: bytes) -> None:
        for m in messages:
            deliver(self.box, m)


class Session:
    def __init__(self, env: Env, ip: str, tls: bool) -> None:
        self.env = env
        self.proto = env.factory.buildProtocol(IPv4Address("TCP", ip, 40000))
        self.transport = TLSCapableTransport(peerAddress=IPv4Address("TCP", ip, 40000))
        if tls:
            directlyProvides(self.transport, ISSLTransport)
        self.proto.makeConnection(self.transport)
        self.greeting = self.read()

    def send(self, data: bytes) -> bytes:
        self.proto.dataReceived(data)
        return self.read()

    def cmd(self, line: str) -> bytes:
        return self.send(line.encode() + b"\r\n")

    def read(self) -> bytes:
        self.pump()
        out = self.transport.value()
        self.transport.clear()
        return out

    def pump(self) -> None:
        """Let the session stream everything it has (a client that reads)."""
        self.proto.resumeProducing()

    def login(self) -> bytes:
        self.cmd("USER alice")
        return self.cmd(f"PASS {PASSWORD}")

    def drop(self) -> None:
        self.transport.loseConnection()
        self.proto.connectionLost(None)

    @property
    def closed(self) -> bool:
        return self.transport.disconnecting


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def plain(authzid: str, authcid: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{authcid}\0{password}".encode()).decode()


def unstuff(multiline: bytes) -> bytes:
    """The message octets of a multi-line answer: status line, terminator and stuffing removed."""
    status, _, rest = multiline.partition(b"\r\n")
    assert status.startswith(b"+OK"), status
    assert rest.endswith(b"\r\n.\r\n") or rest == b".\r\n"
    body = rest[:-3]
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


# -- greeting, CAPA, TLS rules ---------------------------------------------------------


def test_greeting(env: Env) -> None:
    """The server greets with +OK and its host name."""
    s = env.session()
    assert s.greeting == b"+OK mail.example.com POP3 server ready\r\n"


def test_capa_on_cleartext_offers_stls_but_no_login(env: Env) -> None:
    """On cleartext with auth_requires_tls: STLS offered, USER and SASL withheld."""
    reply = env.session().cmd("CAPA")
    lines = reply.split(b"\r\n")
    assert lines[0].startswith(b"+OK")
    assert reply.endswith(b"\r\n.\r\n")
    caps = set(lines[1:-2])
    assert {b"TOP", b"UIDL", b"RESP-CODES", b"PIPELINING", b"STLS", b"IMPLEMENTATION mailguard"} <= caps
    assert b"USER" not in caps and b"SASL PLAIN" not in caps
    assert b"PIPELINE" not in caps


def test_capa_on_tls_offers_login_not_stls(env: Env) -> None:
    """On an implicit-TLS channel: USER and SASL PLAIN offered, STLS not."""
    caps = set(env.session(tls=True).cmd("CAPA").split(b"\r\n")[1:-2])
    assert {b"USER", b"SASL PLAIN"} <= caps
    assert b"STLS" not in caps


def test_capa_cleartext_when_tls_not_required(tmp_path: Path) -> None:
    """With auth_requires_tls = false, cleartext offers both USER and STLS."""
    e = Env(tmp_path, tls={"auth_requires_tls": False})
    caps = set(e.session().cmd("CAPA").split(b"\r\n")[1:-2])
    assert {b"USER", b"SASL PLAIN", b"STLS"} <= caps


@pytest.mark.parametrize("lines", [["USER alice"], ["PASS x"], [f"AUTH PLAIN {plain('', 'alice', PASSWORD)}"],
                                   ["AUTH PLAIN"]])
def test_login_refused_on_cleartext(env: Env, lines: list[str]) -> None:
    """USER, PASS and AUTH on cleartext answer -ERR [AUTH] and never reach the authenticator."""
    s = env.session()
    for line in lines:
        assert s.cmd(line).startswith(b"-ERR [AUTH] ")
    assert env.auth.calls == []
    assert not s.closed


def test_stls_then_login(env: Env) -> None:
    """STLS answers +OK, starts TLS with the configured options, and login works after it."""
    s = env.session()
    assert s.cmd("STLS") == b"+OK Begin TLS negotiation\r\n"
    assert s.transport.tls_started_with == "tls-options"
    assert s.cmd("CAPA").count(b"STLS") == 0
    assert s.login().startswith(b"+OK Logged in")


def test_stls_discards_pipelined_cleartext(env: Env) -> None:
    """Commands sent in the clear after STLS, in the same packet, are never executed."""
    env.deliver(b"Subject: a\r\n\r\nb\r\n")
    s = env.session()
    out = s.send(b"STLS\r\nUSER alice\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\n")
    assert out == b"+OK Begin TLS negotiation\r\n"
    assert env.auth.calls == []
    assert s.cmd("STAT") == pop3.ERR_LOGIN_FIRST + b"\r\n"


def test_stls_refused_when_pointless(env: Env, tmp_path: Path) -> None:
    """STLS on TLS, after login, with an argument, or with no TLS configured gets -ERR."""
    assert env.session(tls=True).cmd("STLS").startswith(b"-ERR")
    s = env.session(tls=True)
    s.login()
    assert s.cmd("STLS").startswith(b"-ERR")
    assert env.session().cmd("STLS now").startswith(b"-ERR")
    env.factory.tls_context = None
    assert env.session().cmd("STLS").startswith(b"-ERR [SYS/TEMP]")


# -- login ------------------------------------------------------------------------------


def test_user_pass_login_records_pop_before_smtp(env: Env) -> None:
    """A good USER/PASS opens the mailbox, says what it holds, and records the client IP."""
    two = [b"Subject: a\r\n\r\nb\r\n", b"Subject: cc\r\n\r\nd\r\n"]
    env.deliver(*two)
    s = env.session("198.51.100.7", tls=True)
    assert s.cmd("USER alice") == b"+OK Send PASS\r\n"
    assert s.cmd(f"PASS {PASSWORD}") == b"+OK Logged in, 2 messages (%d octets)\r\n" % (len(two[0]) + len(two[1]))
    assert env.auth.calls == [("alice", PASSWORD, "198.51.100.7", "pop3")]
    assert env.pbs.recorded == ["198.51.100.7"]


def test_bad_password(env: Env) -> None:
    """A wrong password gets -ERR [AUTH], records nothing, and leaves the session logged out."""
    s = env.session(tls=True)
    s.cmd("USER alice")
    assert s.cmd("PASS wrong") == pop3.ERR_AUTH_FAILED + b"\r\n"
    assert env.pbs.recorded == []
    assert s.cmd("STAT") == pop3.ERR_LOGIN_FIRST + b"\r\n"
    assert s.cmd("PASS again") == pop3.ERR_USER_FIRST + b"\r\n"
    assert s.login().startswith(b"+OK Logged in")


def test_throttled_login(env: Env) -> None:
    """An authenticator that throttles the client gives -ERR [SYS/TEMP]."""
    env.auth.error = Throttled("192.0.2.1")
    s = env.session(tls=True)
    assert s.login() == pop3.ERR_THROTTLED + b"\r\n"
    assert not s.closed


def test_throttled_logins_end_the_session(env: Env) -> None:
    """Refusals are not free: the third throttled login in a session closes it (issue 17 item 6)."""
    env.auth.error = Throttled("192.0.2.1")
    s = env.session(tls=True)
    attempt = b"AUTH PLAIN " + plain("", "alice", "x").encode() + b"\r\n"
    out = s.send(attempt * 100)
    assert out == (pop3.ERR_THROTTLED + b"\r\n") * 3
    assert s.closed


def test_authenticator_failure_is_temporary(env: Env) -> None:
    """An unexpected authenticator error is a temporary -ERR, not a dropped connection."""
    env.auth.error = RuntimeError("directory down")
    s = env.session(tls=True)
    assert s.login().startswith(b"-ERR [SYS/TEMP]")
    assert not s.closed


@pytest.mark.parametrize("line", ["USER", "USER ", "PASS", "AUTH PLAIN !!!notbase64",
                                  "AUTH PLAIN " + base64.b64encode(b"no-nuls").decode(),
                                  "AUTH PLAIN =", "AUTH CRAM-MD5", "AUTH PLAIN a b", "APOP alice abc"])
def test_malformed_login_commands(env: Env, line: str) -> None:
    """Malformed login commands get -ERR and the session continues."""
    s = env.session(tls=True)
    assert s.cmd(line).startswith(b"-ERR")
    assert not s.closed
    assert s.login().startswith(b"+OK Logged in")


def test_auth_plain_initial_response(env: Env) -> None:
    """AUTH PLAIN with an initial response (RFC 5034) logs in."""
    s = env.session(tls=True)
    assert s.cmd(f"AUTH PLAIN {plain('', ALICE, PASSWORD)}").startswith(b"+OK Logged in")
    assert env.auth.calls[0][:2] == (ALICE, PASSWORD)


def test_auth_plain_continuation(env: Env) -> None:
    """AUTH PLAIN without a response gets '+ ' and takes the next line."""
    s = env.session(tls=True)
    assert s.cmd("AUTH PLAIN") == b"+ \r\n"
    assert s.cmd(plain(ALICE, ALICE, PASSWORD)).startswith(b"+OK Logged in")


def test_auth_plain_cancel_and_proxy(env: Env) -> None:
    """'*' cancels; an authorization identity other than the login is a failed login."""
    s = env.session(tls=True)
    s.cmd("AUTH PLAIN")
    assert s.cmd("*") == pop3.ERR_AUTH_CANCELLED + b"\r\n"
    assert s.cmd(f"AUTH PLAIN {plain('bob', 'alice', PASSWORD)}") == pop3.ERR_AUTH_FAILED + b"\r\n"
    assert env.auth.calls == []


@pytest.mark.parametrize("authzid", ["", ALICE, ALICE.upper(), "Alice@Example.com"])
def test_auth_plain_authzid_empty_or_the_login_in_any_case(env: Env, authzid: str) -> None:
    """RFC 4616: the authorization identity may be empty or the login itself, compared
    without regard to case (the rule SMTP AUTH follows too: one decoder for both)."""
    s = env.session(tls=True)
    assert s.cmd(f"AUTH PLAIN {plain(authzid, ALICE, PASSWORD)}").startswith(b"+OK Logged in")
    assert env.auth.calls[0][:2] == (ALICE, PASSWORD)


def test_bare_auth_lists_mechanisms(env: Env) -> None:
    """A bare AUTH lists PLAIN (the probe some clients send)."""
    assert env.session(tls=True).cmd("AUTH") == b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n"


def test_second_login_refused(env: Env) -> None:
    """USER, PASS and AUTH after login get -ERR."""
    s = env.session(tls=True)
    s.login()
    for line in ("USER bob", "PASS bobpw", f"AUTH PLAIN {plain('', 'bob', 'bobpw')}"):
        assert s.cmd(line) == pop3.ERR_ALREADY + b"\r\n"
    assert len(env.auth.calls) == 1


def test_in_use(env: Env) -> None:
    """A second session on a locked mailbox gets -ERR [IN-USE]; it may log in after QUIT."""
    first, second = env.session(tls=True), env.session(tls=True)
    first.login()
    assert second.login() == pop3.ERR_IN_USE + b"\r\n"
    assert not second.closed
    first.cmd("QUIT")
    assert second.login().startswith(b"+OK Logged in")


def test_dropped_connection_releases_lock(env: Env) -> None:
    """A dropped session releases the mailbox lock."""
    first = env.session(tls=True)
    first.login()
    first.drop()
    assert env.session(tls=True).login().startswith(b"+OK Logged in")


# -- TRANSACTION -------------------------------------------------------------------------


MESSAGES = [b"Subject: one\r\n\r\nbody one\r\n",
            b"Subject: two\r\n\r\n.starts with a dot\r\n..two dots\r\n.\r\n",
            b"Subject: three\r\nX: y\r\n\r\n1\r\n2\r\n3\r\n"]


@pytest.fixture
def logged_in(env: Env) -> Session:
    env.deliver(*MESSAGES)
    s = env.session(tls=True)
    s.login()
    return s


def test_stat_and_list(logged_in: Session) -> None:
    """STAT and LIST report the CRLF octet counts of the messages."""
    sizes = [len(m) for m in MESSAGES]
    assert logged_in.cmd("STAT") == b"+OK 3 %d\r\n" % sum(sizes)
    assert logged_in.cmd("LIST") == (b"+OK 3 messages (%d octets)\r\n" % sum(sizes)
                                     + b"".join(b"%d %d\r\n" % (i, n) for i, n in enumerate(sizes, 1)) + b".\r\n")
    assert logged_in.cmd("LIST 2") == b"+OK 2 %d\r\n" % sizes[1]


@pytest.mark.parametrize("line", ["LIST 0", "LIST 4", "LIST abc", "LIST -1", "LIST +1", "LIST 1 2", "LIST  1",
                                  "UIDL 9", "UIDL x", "RETR", "RETR 0", "RETR 1x", "DELE", "DELE 99",
                                  "TOP 1", "TOP 1 x", "TOP x 1", "TOP 1 -1", "TOP 9 1", "STAT 1", "RSET x",
                                  "NOOP x", "FOO", "", "\x00\xff", "RETR 99999999999999999999"])
def test_malformed_transaction_commands(logged_in: Session, line: str) -> None:
    """Every malformed command gets -ERR and the session carries on."""
    out = logged_in.send(line.encode("latin-1") + b"\r\n")
    assert out.startswith(b"-ERR"), out
    assert not logged_in.closed
    assert logged_in.cmd("NOOP") == b"+OK\r\n"


def test_uidl(logged_in: Session, env: Env) -> None:
    """UIDL lists the unique names; UIDL n gives one; both are printable and unique."""
    out = logged_in.cmd("UIDL")
    lines = out.split(b"\r\n")[1:-2]
    uids = [line.split(b" ")[1] for line in lines]
    assert len(set(uids)) == 3
    assert all(1 <= len(u) <= 70 and all(0x21 <= c <= 0x7E for c in u) for u in uids)
    assert logged_in.cmd("UIDL 2") == b"+OK 2 " + uids[1] + b"\r\n"
    assert sorted(n.split(",")[0] for n in os.listdir(env.box / "new")) == sorted(u.decode() for u in uids)


def test_retr_sends_crlf_stuffed_and_list_size_matches(logged_in: Session) -> None:
    """RETR sends each message in CRLF form, byte-stuffed; un-stuffed it is exactly LIST's size."""
    for i, message in enumerate(MESSAGES, 1):
        size = int(logged_in.cmd(f"LIST {i}").split()[2])
        out = logged_in.cmd(f"RETR {i}")
        assert out.startswith(b"+OK %d octets\r\n" % size)
        assert unstuff(out) == message
        assert len(message) == size
    assert b"\r\n..starts with a dot\r\n...two dots\r\n..\r\n.\r\n" in logged_in.cmd("RETR 2")


def test_top(logged_in: Session) -> None:
    """TOP n k: the headers, the blank line and k body lines."""
    assert unstuff(logged_in.cmd("TOP 3 0")) == b"Subject: three\r\nX: y\r\n\r\n"
    assert unstuff(logged_in.cmd("TOP 3 2")) == b"Subject: three\r\nX: y\r\n\r\n1\r\n2\r\n"
    assert unstuff(logged_in.cmd("TOP 2 1")) == b"Subject: two\r\n\r\n.starts with a dot\r\n"


def test_dele_rset_quit(logged_in: Session, env: Env) -> None:
    """DELE hides a message; RSET restores; only QUIT removes from disk."""
    assert logged_in.cmd("DELE 1") == b"+OK Message 1 deleted\r\n"
    assert logged_in.cmd("DELE 1").startswith(b"-ERR")
    assert logged_in.cmd("RETR 1").startswith(b"-ERR")
    assert logged_in.cmd("STAT") == b"+OK 2 %d\r\n" % (len(MESSAGES[1]) + len(MESSAGES[2]))
    assert b"\r\n1 " not in logged_in.cmd("LIST")
    assert logged_in.cmd("RSET").startswith(b"+OK 3 messages")
    logged_in.cmd("DELE 2")
    assert len(os.listdir(env.box / "new")) == 3
    assert logged_in.cmd("QUIT") == b"+OK Bye, 1 messages deleted\r\n"
    assert logged_in.closed
    mb = Mailbox.open(env.box)
    assert [m.size for _, m in mb.live()] == [len(MESSAGES[0]), len(MESSAGES[2])]


def test_drop_deletes_nothing(logged_in: Session, env: Env) -> None:
    """DELE followed by a dropped connection (no QUIT) deletes nothing."""
    logged_in.cmd("DELE 1")
    logged_in.cmd("DELE 2")
    logged_in.drop()
    assert Mailbox.open(env.box).stat()[0] == 3


def test_retrieved_messages_become_seen_and_keep_uidl(logged_in: Session, env: Env) -> None:
    """After RETR + QUIT the message moves to cur/ with :2,S; its UIDL is unchanged next session."""
    uids = logged_in.cmd("UIDL")
    logged_in.cmd("RETR 2")
    logged_in.cmd("TOP 3 1")
    logged_in.cmd("QUIT")
    (cur,) = os.listdir(env.box / "cur")
    assert cur.endswith(":2,S")
    assert len(os.listdir(env.box / "new")) == 2
    again = env.session(tls=True)
    again.login()
    assert again.cmd("UIDL") == uids


def test_noop_rset_and_quit_in_authorization(env: Env) -> None:
    """QUIT before login says goodbye and closes; transaction commands before login get -ERR."""
    s = env.session()
    for line in ("STAT", "LIST", "RETR 1", "NOOP", "DELE 1"):
        assert s.cmd(line) == pop3.ERR_LOGIN_FIRST + b"\r\n"
    assert s.cmd("QUIT") == b"+OK Bye\r\n"
    assert s.closed


def test_commit_failure_is_reported(logged_in: Session, env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deletion the disk refuses makes QUIT answer -ERR (RFC 1939 section 6)."""
    logged_in.cmd("DELE 1")

    def refuse(path: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "unlink", refuse)
    assert logged_in.cmd("QUIT") == pop3.ERR_COMMIT + b"\r\n"
    monkeypatch.undo()
    assert Mailbox.open(env.box).stat()[0] == 3


# -- dot-stuffing across chunk boundaries -------------------------------------------------


def test_dot_lines_on_chunk_boundaries(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """'.' lines at the body start and at offsets 16384 and 32768 arrive stuffed and intact.

    The sender reads 16 KiB chunks here, so those lines start chunks (the "16 KiB hole"
    of docs/twisted.rst); a dot starting a chunk mid-line must stay single.
    """
    monkeypatch.setattr(stream, "CHUNK", 16384)
    header = b"Subject: dots\n\n"
    stored = bytearray(header + b".\n")
    for boundary in (16384, 32768):
        filler = boundary - len(stored)
        stored += b"x" * (filler - 1) + b"\n"
        assert len(stored) == boundary
        stored += b".\n"
    # A dot that starts chunk four in the middle of a line must not be stuffed.
    stored += b"z" * (49152 - len(stored)) + b".mid-line\n"
    stored += b"y" * 5000 + b"\n" + b".\n" + b"end\n"
    message = bytes(stored).replace(b"\n", b"\r\n")
    env.deliver(message)
    s = env.session(tls=True)
    s.login()
    size = int(s.cmd("LIST 1").split()[2])
    s.transport.bound = 1                    # a client that does not read yet
    s.proto.dataReceived(b"RETR 1\r\nNOOP\r\n")
    held = s.transport.value()
    assert held.startswith(b"+OK") and len(held) < 16384 + 1000  # one chunk, not one giant write
    s.transport.bound = None
    out = s.read()
    first, _, rest = out.partition(b"\r\n")
    assert first == b"+OK %d octets" % size
    retr, _, tail = rest.partition(b"\r\n.\r\n")
    assert tail == b"+OK\r\n"  # the pipelined NOOP ran after the whole message
    assert unstuff(first + b"\r\n" + retr + b"\r\n.\r\n") == message
    assert len(message) == size
    assert retr.count(b"\r\n..\r\n") == 4 and retr.startswith(b"Subject: dots\r\n\r\n..\r\n")
    assert b"z.mid-line\r\n" in retr


def test_large_message_size_matches_retr(env: Env) -> None:
    """For a 300 KiB message LIST's size equals the octets RETR sends before stuffing."""
    body = b"".join(b".line %d\r\n" % i if i % 7 == 0 else b"line %d\r\n" % i for i in range(30000))
    message = b"Subject: big\r\n\r\n" + body
    env.deliver(message)
    s = env.session(tls=True)
    s.login()
    size = int(s.cmd("LIST 1").split()[2])
    out = s.cmd("RETR 1")
    assert len(unstuff(out)) == size == len(message)


# -- pipelining, line limits, timeouts, connection limits -----------------------------------


def test_pipelined_commands_wait_for_login(env: Env) -> None:
    """Commands pipelined behind PASS run only after the login has completed, in order."""
    env.deliver(*MESSAGES)
    env.auth.hold = True
    s = env.session(tls=True)
    out = s.send(b"CAPA\r\nUSER alice\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\nUIDL 1\r\nQUIT\r\n")
    assert out.startswith(b"+OK Capability list follows\r\n")
    assert out.endswith(b".\r\n+OK Send PASS\r\n")
    env.auth.held[0].callback(None)
    rest = s.read().split(b"\r\n")
    assert rest[0].startswith(b"+OK Logged in, 3 messages")
    assert rest[1].startswith(b"+OK 3 ")
    assert rest[2].startswith(b"+OK 1 ")
    assert rest[3].startswith(b"+OK Bye")
    assert s.closed


def test_connection_lost_during_login(env: Env) -> None:
    """A session that drops while its login is checked leaves the mailbox unlocked."""
    env.auth.hold = True
    s = env.session(tls=True)
    s.login()
    s.drop()
    env.auth.held[0].callback(None)
    env.auth.hold = False
    assert env.session(tls=True).login().startswith(b"+OK Logged in")


def test_long_command_line(env: Env) -> None:
    """A command over 255 octets gets -ERR and the session goes on."""
    s = env.session()
    assert s.cmd("NOOP " + "x" * 251) == pop3.ERR_TOO_LONG + b"\r\n"
    assert s.cmd("USER " + "x" * 248) == pop3.ERR_NEEDS_TLS + b"\r\n"
    assert not s.closed


def test_unterminated_line_closes(env: Env) -> None:
    """A line that never ends is refused once it passes the limit, then the connection closes."""
    s = env.session()
    assert s.send(b"x" * 4000) == b""
    assert not s.closed
    assert s.send(b"x" * 5000) == pop3.ERR_TOO_LONG + b"\r\n"
    assert s.closed
    assert s.send(b"\r\nCAPA\r\n") == b""


def test_long_auth_response_is_accepted(env: Env) -> None:
    """SASL responses may exceed 255 octets (RFC 5034 section 4)."""
    env.auth.users["alice"] = ("p" * 400, ALICE)
    s = env.session(tls=True)
    assert s.cmd(f"AUTH PLAIN {plain('', 'alice', 'p' * 400)}").startswith(b"+OK Logged in")


def test_bare_lf_and_lowercase_commands(env: Env) -> None:
    """Commands are case-insensitive and LF alone ends a line."""
    s = env.session(tls=True)
    assert s.send(b"user alice\n") == b"+OK Send PASS\r\n"
    assert s.send(b"pass " + PASSWORD.encode() + b"\n").startswith(b"+OK Logged in")


def test_idle_timeout_logs_out_without_update(logged_in: Session, env: Env) -> None:
    """After idle_timeout seconds the server closes the session and applies no deletions."""
    logged_in.cmd("DELE 1")
    env.clock.advance(env.cfg.limits.idle_timeout - 1)
    assert not logged_in.closed
    logged_in.cmd("NOOP")
    env.clock.advance(env.cfg.limits.idle_timeout - 1)
    assert not logged_in.closed
    env.clock.advance(1)
    assert logged_in.read() == pop3.ERR_AUTOLOGOUT + b"\r\n"
    assert logged_in.closed
    logged_in.proto.connectionLost(None)
    assert Mailbox.open(env.box).stat()[0] == 3
    assert env.session(tls=True).login().startswith(b"+OK Logged in")


def test_idle_timeout_from_config(tmp_path: Path) -> None:
    """The idle timeout is [limits] idle_timeout."""
    e = Env(tmp_path, limits={"idle_timeout": 42})
    s = e.session()
    e.clock.advance(41)
    assert not s.closed
    e.clock.advance(1)
    assert s.closed


def test_session_timeout_ends_a_busy_session(tmp_path: Path) -> None:
    """A client that never idles (a NOOP every second) is still closed at session_timeout."""
    e = Env(tmp_path, limits={"idle_timeout": 5, "session_timeout": 20})
    s = e.session()
    for _ in range(19):
        s.cmd("NOOP")
        e.clock.advance(1)
    assert not s.closed
    e.clock.advance(1)
    assert s.read().endswith(pop3.ERR_AUTOLOGOUT + b"\r\n")
    assert s.closed


def test_connections_per_ip_limit(tmp_path: Path) -> None:
    """Past max_connections_per_ip, a new connection from that IP gets -ERR [SYS/TEMP] and closes."""
    e = Env(tmp_path, limits={"max_connections_per_ip": 2})
    a, b = e.session("192.0.2.9"), e.session("192.0.2.9")
    c = e.session("192.0.2.9")
    assert c.greeting.startswith(b"-ERR [SYS/TEMP]") and c.closed
    assert e.session("192.0.2.10").greeting.startswith(b"+OK")
    a.drop()
    c.proto.connectionLost(None)
    assert e.session("192.0.2.9").greeting.startswith(b"+OK")
    assert not b.closed


def test_listeners_share_locks(env: Env) -> None:
    """Two factories of one process (the pop3 and pop3s listeners) share the mailbox locks."""
    first = POP3Factory(env.cfg, env.auth, env.pbs, FakeTLS(), clock=env.clock, run_in_thread=sync)
    second = POP3Factory(env.cfg, env.auth, env.pbs, None, clock=env.clock, run_in_thread=sync)
    assert first.locks is second.locks
    env.factory = first
    a = env.session(tls=True)
    a.login()
    env.factory = second
    assert env.session(tls=True).login().startswith(b"-ERR [IN-USE]")
    a.cmd("QUIT")
    assert env.session(tls=True).login().startswith(b"+OK Logged in")


def test_large_pipelined_backlog_pauses_reading(env: Env) -> None:
    """While a command waits, a backlog over 64 KiB stops reading from the socket; it resumes
    once the backlog is worked off, and every pipelined command is answered in order."""
    env.auth.hold = True
    s = env.session(tls=True)
    s.cmd("USER alice")
    s.send(b"PASS " + PASSWORD.encode() + b"\r\n")
    backlog = b"NOOP\r\n" * 12000
    s.proto.dataReceived(backlog)
    assert s.transport.producerState == "paused"
    assert s.read() == b""
    env.auth.held[0].callback(None)
    out = s.read().split(b"\r\n")
    assert out[0].startswith(b"+OK Logged in")
    assert out[1:-1] == [b"+OK"] * 12000
    assert s.transport.producerState == "producing"


# -- back-pressure: a client that does not read (issue 17 item 1) ----------------------------


def test_paused_output_stops_commands_and_reading(env: Env) -> None:
    """While the transport's buffer is full, no command runs and reading stops once 64 KiB wait;
    when the client reads again every command is answered in order."""
    s = env.session(tls=True)
    s.login()
    s.proto.pauseProducing()                    # what the transport does when its buffer is full
    s.proto.dataReceived(b"NOOP\r\n" * 12000)
    assert s.transport.value() == b""
    assert s.transport.producerState == "paused"
    out = s.read().split(b"\r\n")
    assert out[:-1] == [b"+OK"] * 12000
    assert s.transport.producerState == "producing"


def test_error_flood_closes_the_session(env: Env) -> None:
    """50 -ERR replies in one session: the last is followed by a closing -ERR, and nothing more."""
    s = env.session()
    out = s.send(b"\r\n" * 1000).split(b"\r\n")
    assert out[:50] == [pop3.ERR_UNKNOWN] * 50
    assert out[50:] == [pop3.ERR_TOO_MANY_ERRORS, b""]
    assert s.closed


def test_top_is_streamed_while_the_client_reads(env: Env) -> None:
    """TOP of a big message with a huge line count goes out one chunk per buffer drain, whole."""
    body = b"".join(b"line %d\r\n" % i for i in range(200000))
    env.deliver(b"Subject: big\r\n\r\n" + body)
    s = env.session(tls=True)
    s.login()
    s.transport.bound = 1
    s.proto.dataReceived(b"TOP 1 999999999\r\nNOOP\r\n")
    held = s.transport.value()
    assert held.startswith(b"+OK Top of message follows\r\n") and len(held) < 2 * stream.CHUNK
    s.transport.bound = None
    out = s.read()
    assert out.endswith(b"\r\n.\r\n+OK\r\n")
    assert unstuff(out[:-len(b"+OK\r\n")]) == b"Subject: big\r\n\r\n" + body


@pytest.mark.parametrize("lines, expected", [
    (0, b"Subject: a\n\n"),
    (2, b"Subject: a\n\none\ntwo\n"),
    (9, b"Subject: a\n\none\ntwo\nthree\n"),
])
def test_top_cut_across_chunk_boundaries(lines: int, expected: bytes) -> None:
    """TopCut gives the same cut whatever the chunk size (the blank line split across chunks)."""
    text = b"Subject: a\n\none\ntwo\nthree\n"
    for size in (1, 2, 3, 5, 100):
        cut = stream.TopCut(lines)
        out = b""
        for i in range(0, len(text), size):
            part, done = cut.feed(text[i:i + size])
            out += part
            if done:
                break
        assert out == expected, size
