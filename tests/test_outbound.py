"""Tests for mailguard.outbound.runner: the queue runner.

Unit tests drive :class:`QueueRunner` with ``task.Clock``, a scripted courier and
synchronous queue I/O.  Loopback tests run the real runner on the real reactor
against a DNS server (twisted.names, in-memory zone) and an SMTP sink written here.
"""

from __future__ import annotations

import base64
import email
import email.policy
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from dns_doubles import MemoryAuthority
from twisted.internet import defer, protocol, reactor, ssl, task
from twisted.names import dns, server
from twisted.protocols.basic import LineReceiver

from mailguard import config as config_mod
from mailguard.outbound.runner import QueueRunner, next_attempt
from mailguard.storage.queue import DEFERRED, DELIVERED, FAILED, Queue, QueueEntry
from mailguard.outbound.client import Outcome

MESSAGE = (b"Received: from client (127.0.0.1)\r\nFrom: joe@here.test\r\nTo: ann@remote.test\r\n"
           b"Subject: numbers\r\n\r\nhello\r\n")


def make_config(tmp_path: Path, **outbound: Any) -> config_mod.Config:
    """A validated configuration with the given ``[outbound]`` keys."""
    data = {"server": {"hostname": "mail.here.test", "data_dir": str(tmp_path / "var")},
            "domains": {"here.test": {"route": "inbound"}},
            "outbound": outbound}
    return config_mod.parse(data, "test.toml", tmp_path)


def sync(f: Callable[..., Any], *args: Any, **kw: Any) -> defer.Deferred[Any]:
    """Queue I/O run in line (unit tests only; the runner uses deferToThread)."""
    return defer.maybeDeferred(f, *args, **kw)


class Courier:
    """A scripted courier: ``answers[address]`` is a list of (state, reply), used in turn."""

    def __init__(self, answers: dict[str, list[tuple[str, str]]] | None = None) -> None:
        self.answers = answers or {}
        self.calls: list[tuple[str, str, list[str]]] = []

    async def __call__(self, sender: str, domain: str, rcpts: list[str], message: bytes) -> dict[str, Outcome]:
        self.calls.append((sender, domain, list(rcpts)))
        out = {}
        for r in rcpts:
            script = self.answers.get(r, [])
            state, reply = script.pop(0) if script else (DELIVERED, "250 2.0.0 ok")
            out[r] = Outcome(state, reply, f"mx.{domain}[127.0.0.1]:25")
        return out


class Injected:
    """The core's inject(): records bounces; can fail the first ``failures`` calls."""

    def __init__(self, failures: int = 0) -> None:
        self.calls: list[tuple[str, list[str], bytes, str]] = []
        self.failures = failures

    def __call__(self, sender: str, recipients: list[str], message: bytes, msg_id: str = "") -> defer.Deferred[None]:
        self.calls.append((sender, recipients, message, msg_id))
        if self.failures:
            self.failures -= 1
            return defer.fail(OSError("disk full"))
        return defer.succeed(None)


class Unit:
    """A runner on task.Clock with a scripted courier and in-line queue I/O."""

    def __init__(self, tmp_path: Path, answers: dict[str, list[tuple[str, str]]] | None = None,
                 inject: Injected | None = None, **outbound: Any) -> None:
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.queue = Queue(tmp_path / "queue", clock=self.clock.seconds)
        self.courier = Courier(answers)
        self.inject = inject or Injected()
        self.runner = QueueRunner(make_config(tmp_path, **outbound), self.queue, self.clock, self.inject,
                                  courier=self.courier, blocking=sync)

    def start(self) -> None:
        self.runner.startService()
        self.clock.advance(0)

    def states(self, entry_id: str) -> dict[str, str]:
        return {r.address: r.state for r in self.queue.load(entry_id).recipients}


# -- pure retry schedule ------------------------------------------------------

def test_next_attempt_schedule() -> None:
    """The n-th failure waits schedule[n-1]; the last entry repeats."""
    schedule = (300, 900, 1800)
    assert [next_attempt(schedule, n) for n in (1, 2, 3, 4, 10)] == [300, 900, 1800, 1800, 1800]
    assert next_attempt((60,), 0) == 60
    with pytest.raises(ValueError):
        next_attempt((), 1)


# -- unit tests: task.Clock ---------------------------------------------------

def test_groups_by_domain_and_deletes_when_done(tmp_path: Path) -> None:
    """One courier call per destination domain; a fully delivered entry leaves the queue."""
    u = Unit(tmp_path)
    u.queue.enqueue("joe@here.test", ["a@x.test", "c@y.test", "b@X.test"], MESSAGE)
    u.start()
    assert sorted(u.courier.calls) == [("joe@here.test", "x.test", ["a@x.test", "b@X.test"]),
                                       ("joe@here.test", "y.test", ["c@y.test"])]
    assert u.queue.ids() == []
    assert u.runner.idle()


def test_4xx_retried_on_schedule(tmp_path: Path) -> None:
    """A 451 defers the recipient for schedule[0] seconds, then schedule[1]; then it is delivered."""
    u = Unit(tmp_path, {"a@x.test": [(DEFERRED, "451 4.3.0 busy"), (DEFERRED, "451 4.3.0 busy")]},
             retry_schedule=[300, 900])
    entry_id = u.queue.enqueue("joe@here.test", ["a@x.test"], MESSAGE)
    u.start()
    r = u.queue.load(entry_id).recipients[0]
    assert (r.state, r.attempts, r.last_reply) == (DEFERRED, 1, "451 4.3.0 busy")
    assert r.next_attempt == u.clock.seconds() + 300
    u.clock.advance(299)
    assert len(u.courier.calls) == 1
    u.clock.advance(1)
    assert len(u.courier.calls) == 2
    u.clock.advance(899)
    assert len(u.courier.calls) == 2
    u.clock.advance(1)
    assert len(u.courier.calls) == 3
    assert u.queue.ids() == [] and u.inject.calls == []


def test_5xx_fails_at_once_and_bounces(tmp_path: Path) -> None:
    """A 550 fails that recipient without retry; one DSN goes to the sender from <>."""
    u = Unit(tmp_path, {"a@x.test": [(FAILED, "550 5.1.1 no such user")]})
    u.queue.enqueue("joe@here.test", ["a@x.test", "b@x.test"], MESSAGE)
    u.start()
    assert len(u.courier.calls) == 1
    [(sender, rcpts, dsn, _)] = u.inject.calls
    assert (sender, rcpts) == ("", ["joe@here.test"])
    report = email.message_from_bytes(dsn, policy=email.policy.default)
    block = report.get_payload()[1].get_payload()[1]
    assert block["Final-Recipient"] == "rfc822; a@x.test"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert u.queue.ids() == []


def test_one_bounce_per_message(tmp_path: Path) -> None:
    """Recipients of one message failing at different times: one DSN to the sender, not one per
    failure (issue 17 item 7); the later failure is logged as bounce-suppressed."""
    u = Unit(tmp_path, {"a@x.test": [(FAILED, "550 5.1.1 no such user")],
                        "b@y.test": [(DEFERRED, "451 4.3.0 busy"), (FAILED, "550 5.7.1 refused")]},
             retry_schedule=[300])
    u.queue.enqueue("joe@here.test", ["a@x.test", "b@y.test"], MESSAGE)
    u.start()
    assert len(u.inject.calls) == 1
    u.clock.advance(300)
    assert len(u.courier.calls) == 3
    assert len(u.inject.calls) == 1
    assert u.queue.ids() == []


def test_null_sender_failure_is_dropped(tmp_path: Path) -> None:
    """A message from <> that fails is removed without a bounce (no bounce loops)."""
    u = Unit(tmp_path, {"a@x.test": [(FAILED, "550 5.1.1 no such user")]})
    u.queue.enqueue("", ["a@x.test"], MESSAGE)
    u.start()
    assert u.inject.calls == []
    assert u.queue.ids() == []


def test_max_queue_time_fails_and_bounces(tmp_path: Path) -> None:
    """A recipient still deferred max_queue_time after queueing fails, with its last reply in the DSN."""
    busy = [(DEFERRED, "451 4.4.1 connection refused")] * 10
    u = Unit(tmp_path, {"a@x.test": busy}, retry_schedule=[300], max_queue_time=1000)
    u.queue.enqueue("joe@here.test", ["a@x.test"], MESSAGE)
    u.start()
    for _ in range(3):
        u.clock.advance(300)
    assert len(u.courier.calls) == 4 and u.inject.calls == []
    u.clock.advance(99)
    assert u.inject.calls == []
    u.clock.advance(1)
    assert len(u.courier.calls) == 4
    [(_, _, dsn, _)] = u.inject.calls
    block = email.message_from_bytes(dsn).get_payload()[1].get_payload()[1]
    assert block["Status"] == "4.4.1" and "connection refused" in block["Diagnostic-Code"]
    assert u.queue.ids() == []


def test_delay_warning_sent_once_while_retrying(tmp_path: Path) -> None:
    """With delay_warning set, a still-deferred recipient gets one RFC 3464 'delayed' notice, then delivery."""
    busy = [(DEFERRED, "451 4.4.1 connection refused")] * 6
    u = Unit(tmp_path, {"a@x.test": busy}, retry_schedule=[600], delay_warning=1000, max_queue_time=86400)
    entry_id = u.queue.enqueue("joe@here.test", ["a@x.test", "b@x.test"], MESSAGE)
    u.start()
    u.clock.advance(999)
    assert u.inject.calls == []
    u.clock.advance(1)                                  # due at queued_at + 1000, between two attempts
    [(sender, rcpts, dsn, _)] = u.inject.calls
    assert (sender, rcpts) == ("", ["joe@here.test"])
    report = email.message_from_bytes(dsn, policy=email.policy.default)
    assert report.get_content_type() == "multipart/report"
    assert report["Subject"].startswith("Delayed Mail")
    blocks = report.get_payload()[1].get_payload()
    assert len(blocks) == 2                             # per-message block + a@x.test only (b was delivered)
    block = blocks[1]
    assert block["Final-Recipient"] == "rfc822; a@x.test"
    assert block["Action"] == "delayed" and block["Status"] == "4.4.1"
    assert "Will-Retry-Until" in block
    assert u.queue.load(entry_id).recipients[0].warned
    for _ in range(4):
        u.clock.advance(600)
    assert len(u.inject.calls) == 1                     # one warning, not one per attempt
    u.clock.advance(600 * 3)
    assert u.queue.ids() == [] and len(u.inject.calls) == 1


def test_no_delay_warning_when_off_or_for_null_sender(tmp_path: Path) -> None:
    """delay_warning = 0 (the default) sends none; a message from <> never gets one."""
    busy = [(DEFERRED, "451 4.4.1 connection refused")] * 4
    off = Unit(tmp_path / "off", {"a@x.test": list(busy)}, retry_schedule=[600])
    off.queue.enqueue("joe@here.test", ["a@x.test"], MESSAGE)
    off.start()
    off.clock.advance(3000)
    assert off.inject.calls == []
    null = Unit(tmp_path / "null", {"a@x.test": list(busy)}, retry_schedule=[600], delay_warning=100)
    null.queue.enqueue("", ["a@x.test"], MESSAGE)
    null.start()
    null.clock.advance(3000)
    assert null.inject.calls == []


def test_flush_request_from_another_process(tmp_path: Path) -> None:
    """The flush trigger file makes the runner retry deferred recipients within FLUSH_POLL seconds."""
    u = Unit(tmp_path, {"a@x.test": [(DEFERRED, "451 4.3.0 busy")]}, retry_schedule=[3600])
    u.queue.enqueue("joe@here.test", ["a@x.test"], MESSAGE)
    u.start()
    assert len(u.courier.calls) == 1
    Queue(tmp_path / "queue").request_flush()
    u.clock.advance(QueueRunner.FLUSH_POLL)
    assert len(u.courier.calls) == 2
    assert u.queue.ids() == [] and not (tmp_path / "queue" / "flush").exists()


def test_restart_delivers_only_pending(tmp_path: Path) -> None:
    """Started on an entry left by a crash, the runner tries only the recipients not yet delivered."""
    u = Unit(tmp_path)
    entry_id = u.queue.enqueue("joe@here.test", ["a@x.test", "b@x.test"], MESSAGE)

    def half_done(e: QueueEntry) -> None:
        e.recipients[0].state = DELIVERED

    u.queue.update(entry_id, half_done)
    u.start()
    assert u.courier.calls == [("joe@here.test", "x.test", ["b@x.test"])]
    assert u.queue.ids() == []


def test_failed_bounce_is_retried(tmp_path: Path) -> None:
    """When inject fails (disk full), the entry stays and the bounce is tried again later."""
    u = Unit(tmp_path, {"a@x.test": [(FAILED, "550 5.1.1 unknown")]}, inject=Injected(failures=1),
             retry_schedule=[60])
    entry_id = u.queue.enqueue("joe@here.test", ["a@x.test"], MESSAGE)
    u.start()
    assert len(u.inject.calls) == 1 and u.states(entry_id) == {"a@x.test": FAILED}
    u.clock.advance(60)
    assert len(u.inject.calls) == 2 and len(u.courier.calls) == 1
    assert u.queue.ids() == []


def test_wake_after_enqueue(tmp_path: Path) -> None:
    """A message queued while the runner is idle goes out when wake() is called."""
    u = Unit(tmp_path)
    u.start()
    u.queue.enqueue("joe@here.test", ["a@x.test"], MESSAGE)
    assert u.courier.calls == []
    u.runner.wake()
    u.clock.advance(0)
    assert len(u.courier.calls) == 1 and u.queue.ids() == []


# -- loopback doubles ---------------------------------------------------------



ZONE = {
    b"remote.test": [dns.Record_MX(10, b"mx.remote.test")],
    b"mx.remote.test": [dns.Record_A("127.0.0.1")],
    b"nullmx.test": [dns.Record_MX(0, b"")],
}

#: A throw-away certificate authority; the sinks' certificates name 127.0.0.1 and sink.test.
CA = trustme.CA()
_TLS: list[ssl.CertificateOptions] = []


def self_signed() -> ssl.CertificateOptions:
    """TLS options for the sink: a certificate from :data:`CA` (unknown to the system store)."""
    if not _TLS:
        issued = CA.issue_cert("127.0.0.1", "sink.test")
        key = serialization.load_pem_private_key(issued.private_key_pem.bytes(), None)
        cert = x509.load_pem_x509_certificate(issued.cert_chain_pems[0].bytes())
        _TLS.append(ssl.CertificateOptions(privateKey=key, certificate=cert))
    return _TLS[0]


def ca_file(tmp_path: Path) -> str:
    """:data:`CA`'s certificate as a PEM file, for ``[outbound] tls_ca_file``."""
    path = tmp_path / "ca.pem"
    CA.cert_pem.write_to_path(str(path))
    return str(path)


class Sink(protocol.Factory):
    """The remote host: records what it receives, answers as scripted.

    :ivar rcpt: address -> replies to RCPT, used in turn (then 250).
    :ivar tls: offer STARTTLS; :ivar auth: (user, password) required (over TLS) before MAIL.
    """

    def __init__(self, rcpt: dict[str, list[str]] | None = None, tls: bool = False,
                 auth: tuple[str, str] | None = None) -> None:
        self.rcpt = rcpt or {}
        self.tls = self_signed() if tls or auth else None
        self.auth = auth
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.commands: list[bytes] = []
        self.connections = 0

    def buildProtocol(self, addr: Any) -> SinkSession:
        self.connections += 1
        s = SinkSession()
        s.sink = self
        return s


class SinkSession(LineReceiver):
    """One SMTP session with the sink."""

    MAX_LENGTH = 1 << 20
    sink: Sink

    def connectionMade(self) -> None:
        self.data: bytes | None = None
        self.secure = False
        self.authed = False
        self.sender = ""
        self.rcpts: list[str] = []
        self.sendLine(b"220 sink.test ESMTP")

    def reply(self, text: str) -> None:
        self.sendLine(text.encode())

    def lineReceived(self, line: bytes) -> None:
        if self.data is not None:
            if line == b".":
                self.sink.messages.append((self.sender, self.rcpts, self.data))
                self.data, self.rcpts = None, []
                self.reply("250 2.0.0 queued")
            else:
                self.data += (line[1:] if line.startswith(b".") else line) + b"\r\n"
            return
        self.sink.commands.append(line)
        verb, _, arg = line.decode().partition(" ")
        verb = verb.upper()
        if verb == "EHLO":
            caps = ["sink.test", "SIZE 10000000", "8BITMIME"]
            if self.sink.tls is not None and not self.secure:
                caps.append("STARTTLS")
            if self.sink.auth and self.secure:
                caps.append("AUTH PLAIN LOGIN")
            for c in caps[:-1]:
                self.reply(f"250-{c}")
            self.reply(f"250 {caps[-1]}")
        elif verb == "STARTTLS" and self.sink.tls is not None:
            self.reply("220 2.0.0 go ahead")
            self.transport.startTLS(self.sink.tls)
            self.secure = True
        elif verb == "AUTH" and self.sink.auth and self.secure:
            _, user, password = base64.b64decode(arg.split()[1]).decode().split("\0")
            self.authed = (user, password) == self.sink.auth
            self.reply("235 2.7.0 ok" if self.authed else "535 5.7.8 bad credentials")
        elif verb == "MAIL":
            if self.sink.auth and not self.authed:
                self.reply("530 5.7.0 authentication required")
                return
            self.sender = arg.partition("<")[2].partition(">")[0]
            self.reply("250 2.1.0 ok")
        elif verb == "RCPT":
            address = arg.partition("<")[2].partition(">")[0]
            script = self.sink.rcpt.get(address, [])
            answer = script.pop(0) if script else "250 2.1.5 ok"
            if answer.startswith("2"):
                self.rcpts.append(address)
            self.reply(answer)
        elif verb == "DATA":
            self.data = b""
            self.reply("354 go ahead")
        elif verb == "QUIT":
            self.reply("221 2.0.0 bye")
            self.transport.loseConnection()
        else:
            self.reply("502 5.5.1 not here")


class Loopback:
    """DNS server, SMTP sink and a runner on the real reactor, all on free loopback ports."""

    def __init__(self, tmp_path: Path, sink: Sink, inject: Injected | None = None, **outbound: Any) -> None:
        self.sink = sink
        self.smtp_port = reactor.listenTCP(0, sink, interface="127.0.0.1")
        factory = server.DNSServerFactory(authorities=[MemoryAuthority(ZONE)])
        self.dns_port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
        outbound.setdefault("port", self.smtp_port.getHost().port)
        outbound.setdefault("connect_timeout", 3)
        outbound.setdefault("command_timeout", 3)
        outbound["dns_servers"] = [f"127.0.0.1:{self.dns_port.getHost().port}"]
        self.queue = Queue(tmp_path / "queue")
        self.inject = inject or Injected()
        self.runner = QueueRunner(make_config(tmp_path, **outbound), self.queue, reactor, self.inject)

    async def enqueue(self, sender: str, recipients: list[str], message: bytes = MESSAGE) -> str:
        entry_id: str = await defer.maybeDeferred(self.queue.enqueue, sender, recipients, message)
        self.runner.wake()
        return entry_id

    async def until(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait (bounded) until ``condition()`` holds and the runner is idle."""
        deadline = reactor.seconds() + timeout
        while not (condition() and self.runner.idle()):
            if reactor.seconds() > deadline:
                raise AssertionError("timed out waiting for the runner")
            await task.deferLater(reactor, 0.02)

    async def close(self) -> None:
        await defer.maybeDeferred(self.runner.stopService)
        await defer.maybeDeferred(self.smtp_port.stopListening)
        await defer.maybeDeferred(self.dns_port.stopListening)


def dotted_message() -> bytes:
    """A message with a line that is just ``.`` at offsets 16384 and 32768."""
    body = bytearray(b"From: joe@here.test\r\nSubject: dots\r\n\r\n")
    for offset in (16384, 32768):
        while len(body) < offset:
            body += b"y" * min(76, max(0, offset - len(body) - 2)) + b"\r\n"
        body = body[:offset - 2] + b"\r\n"
        assert len(body) == offset
        body += b".\r\nQUIT\r\n"
    return bytes(body) + b"the end\r\n"


# -- loopback tests -----------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_loopback_message_arrives_intact(tmp_path: Path) -> None:
    """Through MX lookup to the sink, a message with ``.`` lines at 16384 and 32768 arrives byte for byte."""
    lo = Loopback(tmp_path, Sink())
    try:
        lo.runner.startService()
        message = dotted_message()
        await lo.enqueue("joe@here.test", ["ann@remote.test"], message)
        await lo.until(lambda: bool(lo.sink.messages) and not lo.queue.ids())
        assert lo.sink.messages == [("joe@here.test", ["ann@remote.test"], message)]
        assert lo.sink.connections == 1
    finally:
        await lo.close()


@pytest_twisted.ensureDeferred
async def test_loopback_451_then_250(tmp_path: Path) -> None:
    """A sink that answers 451 then 250 gets the message on the retry, once."""
    lo = Loopback(tmp_path, Sink(rcpt={"ann@remote.test": ["451 4.3.0 greylisted"]}), retry_schedule=[1])
    try:
        lo.runner.startService()
        entry_id = await lo.enqueue("joe@here.test", ["ann@remote.test"])
        await lo.until(lambda: lo.sink.connections == 1 and lo.queue.load(entry_id).recipients[0].attempts == 1)
        r = lo.queue.load(entry_id).recipients[0]
        assert (r.state, r.last_reply) == (DEFERRED, "451 4.3.0 greylisted")
        await lo.until(lambda: bool(lo.sink.messages) and not lo.queue.ids())
        assert lo.sink.messages == [("joe@here.test", ["ann@remote.test"], MESSAGE)]
        assert lo.sink.commands.count(b"RCPT TO:<ann@remote.test>") == 2
    finally:
        await lo.close()


@pytest_twisted.ensureDeferred
async def test_loopback_550_bounces(tmp_path: Path) -> None:
    """A 550 from the sink produces an RFC 3464 report to the sender, sent from <>."""
    lo = Loopback(tmp_path, Sink(rcpt={"ann@remote.test": ["550 5.1.1 <ann@remote.test>: no such user"]}))
    try:
        lo.runner.startService()
        await lo.enqueue("joe@here.test", ["ann@remote.test", "bob@remote.test"])
        await lo.until(lambda: bool(lo.inject.calls) and not lo.queue.ids())
        assert lo.sink.messages == [("joe@here.test", ["bob@remote.test"], MESSAGE)]
        [(sender, rcpts, raw, _)] = lo.inject.calls
        assert (sender, rcpts) == ("", ["joe@here.test"])
        dsn = email.message_from_bytes(raw, policy=email.policy.default)
        assert dsn.get_content_type() == "multipart/report"
        assert dsn.get_param("report-type") == "delivery-status"
        text, status, headers = dsn.get_payload()
        assert (text.get_content_type(), status.get_content_type(), headers.get_content_type()) == \
            ("text/plain", "message/delivery-status", "text/rfc822-headers")
        per_message, per_rcpt = status.get_payload()
        assert per_message["Reporting-MTA"] == "dns; mail.here.test"
        assert per_rcpt["Final-Recipient"] == "rfc822; ann@remote.test"
        assert per_rcpt["Action"] == "failed"
        assert per_rcpt["Status"] == "5.1.1"
        assert per_rcpt["Remote-MTA"] == "dns; mx.remote.test"
        assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <ann@remote.test>: no such user"
        assert "Subject: numbers" in headers.get_payload()
    finally:
        await lo.close()


@pytest_twisted.ensureDeferred
async def test_loopback_null_sender_dropped(tmp_path: Path) -> None:
    """A failing message from <> is dropped: no bounce, and it leaves the queue."""
    lo = Loopback(tmp_path, Sink(rcpt={"ann@remote.test": ["550 5.1.1 no such user"]}))
    try:
        lo.runner.startService()
        await lo.enqueue("", ["ann@remote.test"])
        await lo.until(lambda: lo.sink.connections == 1 and not lo.queue.ids())
        assert lo.inject.calls == [] and lo.sink.messages == []
    finally:
        await lo.close()


@pytest_twisted.ensureDeferred
async def test_loopback_null_mx_fails_permanently(tmp_path: Path) -> None:
    """A recipient in a null-MX domain fails at once (5.1.10) without any connection."""
    lo = Loopback(tmp_path, Sink())
    try:
        lo.runner.startService()
        await lo.enqueue("joe@here.test", ["ann@nullmx.test"])
        await lo.until(lambda: bool(lo.inject.calls) and not lo.queue.ids())
        block = email.message_from_bytes(lo.inject.calls[0][2]).get_payload()[1].get_payload()[1]
        assert block["Status"] == "5.1.10"
        assert lo.sink.connections == 0
    finally:
        await lo.close()


def starttls_smarthost_runner(tmp_path: Path, lo: Loopback, password: str, **extra: Any) -> QueueRunner:
    """A runner sending everything through the loopback sink as smarthost: STARTTLS, AUTH office@isp.test.

    The sink's certificate is verified against the test CA (``extra`` may change that).
    """
    settings: dict[str, Any] = {"tls_ca_file": ca_file(tmp_path), **extra}
    return QueueRunner(make_config(tmp_path, smarthost=f"127.0.0.1:{lo.smtp_port.getHost().port}",
                                   smarthost_tls="starttls", smarthost_user="office@isp.test",
                                   smarthost_password=password, connect_timeout=3, command_timeout=3,
                                   **settings),
                       lo.queue, reactor, lo.inject)


@pytest_twisted.ensureDeferred
async def test_loopback_smarthost_auth_over_starttls(tmp_path: Path) -> None:
    """Smarthost mode: STARTTLS, then AUTH with the configured credentials, then delivery."""
    sink = Sink(auth=("office@isp.test", "s3cret"))
    lo = Loopback(tmp_path, sink)
    lo.runner = starttls_smarthost_runner(tmp_path, lo, "s3cret")
    try:
        lo.runner.startService()
        await lo.enqueue("joe@here.test", ["ann@anywhere.example"])
        await lo.until(lambda: bool(sink.messages) and not lo.queue.ids())
        assert sink.messages == [("joe@here.test", ["ann@anywhere.example"], MESSAGE)]
        verbs = [c.split()[0] for c in sink.commands]
        assert verbs[:5] == [b"EHLO", b"STARTTLS", b"EHLO", b"AUTH", b"MAIL"]
    finally:
        await lo.close()


@pytest_twisted.ensureDeferred
async def test_loopback_smarthost_unknown_ca_keeps_mail_and_password(tmp_path: Path) -> None:
    """A smarthost whose certificate does not verify gets no AUTH; the mail stays queued with why."""
    sink = Sink(auth=("office@isp.test", "s3cret"))
    lo = Loopback(tmp_path, sink)
    lo.runner = starttls_smarthost_runner(tmp_path, lo, "s3cret", tls_ca_file="")
    try:
        lo.runner.startService()
        entry_id = await lo.enqueue("joe@here.test", ["ann@anywhere.example"])
        await lo.until(lambda: lo.queue.load(entry_id).recipients[0].attempts == 1)
        r = lo.queue.load(entry_id).recipients[0]
        assert r.state == DEFERRED
        assert r.last_reply.startswith("451 4.7.5 ") and "certificate verify failed" in r.last_reply
        assert [c.split()[0] for c in sink.commands] == [b"EHLO", b"STARTTLS"]
        assert sink.messages == []
    finally:
        await lo.close()


@pytest_twisted.ensureDeferred
async def test_loopback_smarthost_unverified_when_configured(tmp_path: Path) -> None:
    """smarthost_tls_verify = false: the admin's choice, delivered over unverified TLS."""
    sink = Sink(auth=("office@isp.test", "s3cret"))
    lo = Loopback(tmp_path, sink)
    lo.runner = starttls_smarthost_runner(tmp_path, lo, "s3cret", tls_ca_file="", smarthost_tls_verify=False)
    try:
        lo.runner.startService()
        await lo.enqueue("joe@here.test", ["ann@anywhere.example"])
        await lo.until(lambda: bool(sink.messages) and not lo.queue.ids())
        assert [c.split()[0] for c in sink.commands][:4] == [b"EHLO", b"STARTTLS", b"EHLO", b"AUTH"]
    finally:
        await lo.close()


@pytest_twisted.ensureDeferred
async def test_loopback_smarthost_wrong_password_defers(tmp_path: Path) -> None:
    """A refused login at the smarthost keeps the message queued (deferred), never bounced."""
    sink = Sink(auth=("office@isp.test", "right"))
    lo = Loopback(tmp_path, sink)
    lo.runner = starttls_smarthost_runner(tmp_path, lo, "wrong")
    try:
        lo.runner.startService()
        entry_id = await lo.enqueue("joe@here.test", ["ann@anywhere.example"])
        await lo.until(lambda: lo.queue.load(entry_id).recipients[0].attempts == 1)
        r = lo.queue.load(entry_id).recipients[0]
        assert r.state == DEFERRED and "535 5.7.8" in r.last_reply
        assert sink.messages == [] and lo.inject.calls == []
    finally:
        await lo.close()


@pytest_twisted.ensureDeferred
async def test_loopback_restart_after_crash(tmp_path: Path) -> None:
    """An entry left on disk with one recipient delivered and one pending: only the pending one is sent."""
    lo = Loopback(tmp_path, Sink())
    try:
        entry_id = lo.queue.enqueue("joe@here.test", ["ann@remote.test", "bob@remote.test"], MESSAGE)

        def crashed_mid_delivery(e: QueueEntry) -> None:
            e.recipients[0].state = DELIVERED
            e.recipients[0].attempts = 1
            e.recipients[0].last_reply = "250 2.0.0 queued"

        lo.queue.update(entry_id, crashed_mid_delivery)
        lo.runner.startService()
        await lo.until(lambda: bool(lo.sink.messages) and not lo.queue.ids())
        assert lo.sink.messages == [("joe@here.test", ["bob@remote.test"], MESSAGE)]
        assert b"RCPT TO:<ann@remote.test>" not in lo.sink.commands
    finally:
        await lo.close()


@pytest_twisted.ensureDeferred
async def test_loopback_refused_connection_defers(tmp_path: Path) -> None:
    """Nothing listening on the MX port: the recipient is deferred with a connect failure."""
    probe = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
    closed_port = probe.getHost().port
    await defer.maybeDeferred(probe.stopListening)
    lo = Loopback(tmp_path, Sink(), port=closed_port)
    try:
        lo.runner.startService()
        entry_id = await lo.enqueue("joe@here.test", ["ann@remote.test"])
        await lo.until(lambda: lo.queue.load(entry_id).recipients[0].attempts == 1)
        r = lo.queue.load(entry_id).recipients[0]
        assert r.state == DEFERRED and r.last_reply.startswith("451 4.4.1 connect to")
    finally:
        await lo.close()


@pytest_twisted.ensureDeferred
async def test_loopback_smarthost_implicit_tls(tmp_path: Path) -> None:
    """smarthost_tls = tls: the connection is TLS from the first byte (port 465 style)."""
    sink = Sink()
    tls_port = reactor.listenSSL(0, sink, self_signed(), interface="127.0.0.1")
    lo = Loopback(tmp_path, Sink())
    lo.runner = QueueRunner(make_config(tmp_path, smarthost=f"127.0.0.1:{tls_port.getHost().port}",
                                        smarthost_tls="tls", connect_timeout=3, command_timeout=3,
                                        tls_ca_file=ca_file(tmp_path)),
                            lo.queue, reactor, lo.inject)
    try:
        lo.runner.startService()
        await lo.enqueue("joe@here.test", ["ann@anywhere.example"])
        await lo.until(lambda: bool(sink.messages) and not lo.queue.ids())
        assert sink.messages == [("joe@here.test", ["ann@anywhere.example"], MESSAGE)]
        assert b"STARTTLS" not in sink.commands
    finally:
        await lo.close()
        await defer.maybeDeferred(tls_port.stopListening)


def test_each_decision_logged(tmp_path: Path) -> None:
    """Every outcome is one log line with the queue id, recipient, state, relay host and reply."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mailguard.outbound.runner":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        u = Unit(tmp_path, {"a@x.test": [(FAILED, "550 5.1.1 no such user")]})
        entry_id = u.queue.enqueue("joe@here.test", ["a@x.test", "b@x.test"], MESSAGE, msg_id="2k7f3q1x9b")
        u.start()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert (f"mailguard outbound: id={entry_id} msg=2k7f3q1x9b to=<a@x.test> state=failed "
            "relay=mx.x.test[127.0.0.1]:25 reply=550 5.1.1 no such user") in lines
    assert (f"mailguard outbound: id={entry_id} msg=2k7f3q1x9b to=<b@x.test> state=delivered "
            "relay=mx.x.test[127.0.0.1]:25 reply=250 2.0.0 ok") in lines
    assert (f"mailguard outbound: id={entry_id} msg=2k7f3q1x9b to=<a@x.test> state=bounced relay=<joe@here.test> "
            "reply=550 5.1.1 no such user") in lines
    # The bounce is handed on with the bounced message's id: its own queue lines carry it.
    assert [(c[0], c[1], c[3]) for c in u.inject.calls] == [("", ["joe@here.test"], "2k7f3q1x9b")]


def test_a_damaged_entry_is_logged_once_and_left_alone(tmp_path: Path) -> None:
    """An envelope the runner cannot read is reported with its id and reason, once, and not deleted."""
    from twisted.logger import formatEvent, globalLogPublisher

    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mailguard.outbound.runner":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        u = Unit(tmp_path)
        entry_id = u.queue.enqueue("joe@here.test", ["a@x.test"], MESSAGE)
        u.queue.envelope_path(entry_id).write_bytes(b"{not json")
        u.start()
        u.runner.wake()
        u.clock.advance(1)
    finally:
        globalLogPublisher.removeObserver(observe)
    damaged = [ln for ln in lines if f"id={entry_id}" in ln]
    assert len(damaged) == 1
    assert damaged[0].startswith(f"mailguard outbound: id={entry_id} is damaged and stays queued undelivered: "
                                 "unreadable envelope: JSONDecodeError: ")
    assert u.queue.envelope_path(entry_id).exists() and u.courier.calls == []


def test_held_entry_waits_until_released_then_delivers_locally_and_remotely(tmp_path: Path) -> None:
    """A held entry is neither tried nor expired; once released its remote recipients go out
    and its local mailboxes go to the local delivery."""
    local_calls: list[tuple[str, list[str], bytes]] = []

    def local(sender: str, mailboxes: list[str], message: bytes) -> defer.Deferred[None]:
        local_calls.append((sender, mailboxes, message))
        return defer.succeed(None)

    u = Unit(tmp_path, max_queue_time=60)
    u.runner.local = local
    entry_id = u.queue.enqueue("joe@here.test", ["a@x.test"], MESSAGE, held="spam", local=["bob@here.test"])
    u.start()
    u.clock.advance(3600)
    u.runner.wake()
    u.clock.advance(0)
    assert u.courier.calls == [] and local_calls == []
    assert u.states(entry_id) == {"a@x.test": "pending", "bob@here.test": "pending"}
    assert u.queue.release(entry_id)
    u.runner.wake()
    u.clock.advance(0)
    assert u.courier.calls == [("joe@here.test", "x.test", ["a@x.test"])]
    assert local_calls == [("joe@here.test", ["bob@here.test"], MESSAGE)]
    assert u.queue.ids() == []


def test_a_bug_in_mx_handling_defers_and_keeps_the_message(tmp_path: Path) -> None:
    """The real courier with a resolver that has a programming error: the recipient is deferred
    (retried later), the message stays queued, and the error is logged with its traceback."""
    from twisted.internet.testing import MemoryReactorClock

    from test_mx import BuggyResolver, _failures_logged

    clock = MemoryReactorClock()
    clock.advance(1_700_000_000)
    queue = Queue(tmp_path / "queue", clock=clock.seconds)
    runner = QueueRunner(make_config(tmp_path), queue, clock, Injected(), resolver=BuggyResolver(("A", "AAAA")),
                         blocking=sync)
    entry_id = queue.enqueue("joe@here.test", ["ann@x.test"], MESSAGE)
    events, stop = _failures_logged()
    try:
        runner.startService()
        clock.advance(0)
    finally:
        stop()
    (r,) = queue.load(entry_id).recipients
    assert (r.state, r.last_reply) == (DEFERRED, "451 4.3.0 Local error routing mail for x.test (logged)")
    assert r.next_attempt is not None and r.next_attempt > clock.seconds()
    assert queue.read_message(entry_id) == MESSAGE
    assert [e["log_failure"].type for e in events] == [TypeError]
