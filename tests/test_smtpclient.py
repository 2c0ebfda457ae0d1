"""Unit tests for mailguard.outbound.client: the SMTP client over StringTransport and task.Clock."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport

from mailguard.storage.queue import DEFERRED, DELIVERED, FAILED
from mailguard.outbound.client import (ClientConnection, ServerReply, SessionError, SessionOptions,
                                  capabilities, transact)

MESSAGE = b"Subject: hi\r\n\r\nline one\r\n.starts with a dot\r\nlast\r\n"


class Peer:
    """Plays the server side: feed replies, read what the client wrote."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.clock = task.Clock()
        self.transport = StringTransport()
        self.conn = ClientConnection(self.clock, timeout)
        self.conn.makeConnection(self.transport)

    def start(self, opts: SessionOptions, recipients: list[str], message: bytes = MESSAGE,
              sender: str = "joe@here.example") -> defer.Deferred[Any]:
        return defer.ensureDeferred(transact(self.conn, opts, sender, recipients, message, "mx.test[127.0.0.1]:25"))

    def reply(self, text: str) -> bytes:
        """Send one reply (lines separated by \\n); return what the client wrote next."""
        self.transport.clear()
        self.conn.dataReceived(text.replace("\n", "\r\n").encode() + b"\r\n")
        self.pump()
        return self.transport.value()

    def pump(self) -> None:
        """Run a registered pull producer to its end (a real transport does this)."""
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()


def opts(**kw: Any) -> SessionOptions:
    return SessionOptions(hostname="mail.here.example", **kw)


def result(d: defer.Deferred[Any]) -> Any:
    """The synchronous result of a Deferred (fails the test if it has none)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "transaction did not finish"
    if isinstance(out[0], defer.Failure):
        out[0].raiseException()
    return out[0]


def test_full_transaction_dot_stuffed() -> None:
    """A plain EHLO/MAIL/RCPT/DATA/QUIT dialogue sends the message dot-stuffed and delivers."""
    p = Peer()
    d = p.start(opts(), ["ann@remote.example"])
    assert p.reply("220 mx.test ESMTP") == b"EHLO mail.here.example\r\n"
    assert p.reply("250-mx.test\n250-SIZE 100000\n250 8BITMIME") == \
        b"MAIL FROM:<joe@here.example> SIZE=%d\r\n" % len(MESSAGE)
    assert p.reply("250 2.1.0 ok") == b"RCPT TO:<ann@remote.example>\r\n"
    assert p.reply("250 2.1.5 ok") == b"DATA\r\n"
    assert p.reply("354 go ahead") == b"Subject: hi\r\n\r\nline one\r\n..starts with a dot\r\nlast\r\n.\r\n"
    assert p.reply("250 2.0.0 queued as X") == b"QUIT\r\n"
    p.reply("221 bye")
    outcome = result(d)["ann@remote.example"]
    assert (outcome.state, outcome.reply) == (DELIVERED, "250 2.0.0 queued as X")
    assert p.transport.disconnecting


def test_dot_lines_at_chunk_boundaries() -> None:
    """``.`` lines at offsets 16384, 32768 and 65536 are all stuffed (no early end of data)."""
    body = bytearray(b"Subject: big\r\n\r\n")
    for offset in (16384, 32768, 65536):
        while len(body) < offset - 2:
            body += b"x" * min(70, offset - 2 - len(body)) + b"\r\n"
        body = body[:offset - 2] + b"\r\n"
        assert len(body) == offset
        body += b".\r\n"
    message = bytes(body) + b"end\r\n"
    p = Peer()
    p.start(opts(), ["ann@remote.example"], message)
    p.reply("220 hi")
    p.reply("250 mx")
    p.reply("250 ok")
    p.reply("250 ok")
    wire = p.reply("354 go")
    assert wire.count(b"\r\n..\r\n") == 3
    assert wire.endswith(b"end\r\n.\r\n") and wire.count(b"\r\n.\r\n") == 1


def test_ehlo_refused_falls_back_to_helo() -> None:
    """A server that refuses EHLO gets HELO, and no ESMTP parameters on MAIL FROM."""
    p = Peer()
    p.start(opts(), ["ann@remote.example"])
    p.reply("220 old")
    assert p.reply("502 5.5.1 what") == b"HELO mail.here.example\r\n"
    assert p.reply("250 old") == b"MAIL FROM:<joe@here.example>\r\n"


def test_message_over_peer_size_fails_without_sending() -> None:
    """A message bigger than the peer's SIZE fails permanently, before MAIL FROM."""
    p = Peer()
    d = p.start(opts(), ["ann@remote.example"])
    p.reply("220 hi")
    assert p.reply("250-mx\n250 SIZE 10") == b""
    with pytest.raises(SessionError) as e:
        result(d)
    assert e.value.permanent and not e.value.next_host and e.value.reply.startswith("552 5.3.4")


def test_each_recipient_answered_separately() -> None:
    """550 and 451 at RCPT fail and defer those recipients; the accepted one is delivered."""
    p = Peer()
    d = p.start(opts(), ["a@r.example", "b@r.example", "c@r.example"])
    p.reply("220 hi")
    p.reply("250 mx")
    p.reply("250 ok")
    assert p.reply("550 5.1.1 no such user") == b"RCPT TO:<b@r.example>\r\n"
    assert p.reply("451 4.3.0 try later") == b"RCPT TO:<c@r.example>\r\n"
    assert p.reply("250 ok") == b"DATA\r\n"
    p.reply("354 go")
    p.reply("250 ok")
    p.reply("221 bye")
    out = result(d)
    assert out["a@r.example"].state == FAILED and out["a@r.example"].reply == "550 5.1.1 no such user"
    assert out["b@r.example"].state == DEFERRED
    assert out["c@r.example"].state == DELIVERED


def test_mail_from_refused_is_session_error() -> None:
    """A 5xx to MAIL FROM fails the whole transaction permanently with the peer's reply."""
    p = Peer()
    d = p.start(opts(), ["a@r.example"])
    p.reply("220 hi")
    p.reply("250 mx")
    p.reply("553 5.7.1 sender rejected")
    with pytest.raises(SessionError) as e:
        result(d)
    assert e.value.permanent and e.value.reply == "553 5.7.1 sender rejected"


def test_command_timeout_defers() -> None:
    """No reply within command_timeout aborts the connection and defers the recipients."""
    p = Peer(timeout=60)
    d = p.start(opts(command_timeout=60), ["a@r.example"])
    p.reply("220 hi")
    p.reply("250 mx")
    p.reply("250 ok")
    p.reply("250 ok")
    p.reply("354 go")
    p.clock.advance(59)
    assert not d.called
    p.clock.advance(1)
    out = result(d)
    assert out["a@r.example"].state == DEFERRED and "no reply within 60 s" in out["a@r.example"].reply
    assert p.transport.disconnecting


def test_timeout_before_recipients_is_session_error() -> None:
    """A silent greeting is a temporary SessionError that lets the next MX host be tried."""
    p = Peer(timeout=5)
    d = p.start(opts(), ["a@r.example"])
    p.clock.advance(5)
    with pytest.raises(SessionError) as e:
        result(d)
    assert not e.value.permanent and e.value.next_host and "greeting" in e.value.reply


def test_starttls_response_injection_refused() -> None:
    """Data pipelined after the 220 to STARTTLS is refused: the connection is dropped."""
    p = Peer()
    d = p.start(opts(), ["a@r.example"])
    p.reply("220 hi")
    assert p.reply("250-mx\n250 STARTTLS") == b"STARTTLS\r\n"
    p.reply("220 go ahead\n250 injected")
    with pytest.raises(SessionError) as e:
        result(d)
    assert "injection" in e.value.reply
    assert p.transport.disconnecting


def test_required_starttls_missing() -> None:
    """smarthost_tls = starttls and a peer without STARTTLS: nothing is sent, retried later."""
    p = Peer()
    d = p.start(opts(tls="starttls"), ["a@r.example"])
    p.reply("220 hi")
    p.reply("250-mx\n250 AUTH PLAIN")
    with pytest.raises(SessionError) as e:
        result(d)
    assert not e.value.permanent and "4.7.4" in e.value.reply
    assert b"MAIL" not in p.transport.value()


def test_no_credentials_over_cleartext() -> None:
    """With credentials and opportunistic TLS, a peer without STARTTLS never sees AUTH."""
    p = Peer()
    d = p.start(opts(user="u", password="secret"), ["a@r.example"])
    p.reply("220 hi")
    written = p.reply("250-mx\n250 AUTH PLAIN LOGIN")
    with pytest.raises(SessionError):
        result(d)
    assert b"AUTH" not in written


def test_no_credentials_when_tls_none() -> None:
    """smarthost_tls = none with credentials: the password is never sent in cleartext."""
    p = Peer()
    d = p.start(opts(tls="none", user="u", password="secret"), ["a@r.example"])
    p.reply("220 hi")
    written = p.reply("250-mx\n250 AUTH PLAIN LOGIN")
    with pytest.raises(SessionError) as e:
        result(d)
    assert "4.7.4" in e.value.reply
    assert b"AUTH" not in written and b"secret" not in p.transport.value()


def test_auth_login_over_tls() -> None:
    """Over implicit TLS, AUTH LOGIN sends base64 user and password."""
    p = Peer()
    p.start(opts(tls="tls", user="u@isp.example", password="pw"), ["a@r.example"])
    p.reply("220 hi")
    assert p.reply("250-mx\n250 AUTH LOGIN") == b"AUTH LOGIN\r\n"
    assert p.reply("334 VXNlcm5hbWU6") == base64.b64encode(b"u@isp.example") + b"\r\n"
    assert p.reply("334 UGFzc3dvcmQ6") == base64.b64encode(b"pw") + b"\r\n"
    assert p.reply("235 2.7.0 ok") == b"MAIL FROM:<joe@here.example>\r\n"


def test_auth_plain_refused_is_temporary() -> None:
    """A 535 to AUTH PLAIN defers (a wrong password must not bounce the office's mail)."""
    p = Peer()
    d = p.start(opts(tls="tls", user="u", password="pw"), ["a@r.example"])
    p.reply("220 hi")
    assert p.reply("250-mx\n250 AUTH PLAIN LOGIN") == b"AUTH PLAIN " + base64.b64encode(b"\0u\0pw") + b"\r\n"
    p.reply("535 5.7.8 bad credentials")
    with pytest.raises(SessionError) as e:
        result(d)
    assert not e.value.permanent and "535 5.7.8" in e.value.reply


def test_garbage_reply_drops_connection() -> None:
    """A reply line that is not ``NNN text`` ends the session as a temporary failure."""
    p = Peer()
    d = p.start(opts(), ["a@r.example"])
    p.reply("hello there")
    with pytest.raises(SessionError):
        result(d)
    assert p.transport.disconnecting


def test_null_sender_and_reply_helpers() -> None:
    """MAIL FROM:<> for the null sender; EHLO keywords and enhanced codes are parsed."""
    p = Peer()
    p.start(opts(), ["a@r.example"], sender="")
    p.reply("220 hi")
    assert p.reply("250 mx") == b"MAIL FROM:<>\r\n"
    ehlo = ServerReply(250, ("mx", "size 1000", "AUTH PLAIN LOGIN"))
    assert capabilities(ehlo) == {"SIZE": "1000", "AUTH": "PLAIN LOGIN"}
    assert ServerReply(550, ("5.1.1 nope",)).status == "5.1.1"
    assert ServerReply(451, ("try later",)).status == "4.0.0"
    assert ServerReply(451, ("5.1.1 mismatched class",)).status == "4.0.0"


def test_pipelining_sends_the_envelope_in_one_write() -> None:
    """RFC 2920: with PIPELINING, MAIL, every RCPT and DATA leave together; replies are read in order."""
    p = Peer()
    d = p.start(opts(), ["ann@remote.example", "nobody@remote.example", "bob@remote.example"])
    p.reply("220 hi")
    assert p.reply("250-mx\n250 PIPELINING") == (
        b"MAIL FROM:<joe@here.example>\r\nRCPT TO:<ann@remote.example>\r\nRCPT TO:<nobody@remote.example>\r\n"
        b"RCPT TO:<bob@remote.example>\r\nDATA\r\n")
    wire = p.reply("250 2.1.0 ok\n250 2.1.5 ok\n550 5.1.1 no such user\n250 2.1.5 ok\n354 go")
    assert wire.endswith(b"last\r\n.\r\n")
    assert p.reply("250 2.0.0 queued") == b"QUIT\r\n"
    p.reply("221 bye")
    outcomes = result(d)
    assert {r: o.state for r, o in outcomes.items()} == {
        "ann@remote.example": DELIVERED, "nobody@remote.example": FAILED, "bob@remote.example": DELIVERED}
    assert outcomes["nobody@remote.example"].reply == "550 5.1.1 no such user"


def test_pipelining_every_recipient_refused() -> None:
    """All RCPTs refused and DATA answered 503: nothing is sent, each recipient has its own reply."""
    p = Peer()
    d = p.start(opts(), ["ann@remote.example"])
    p.reply("220 hi")
    p.reply("250-mx\n250 PIPELINING")
    assert p.reply("250 ok\n450 4.2.0 mailbox busy\n503 5.5.1 no valid recipients") == b"QUIT\r\n"
    p.reply("221 bye")
    assert result(d)["ann@remote.example"].state == DEFERRED


def test_pipelining_354_without_recipients_is_ended_empty() -> None:
    """A server that says 354 although no RCPT succeeded gets an empty message, never the real one."""
    p = Peer()
    d = p.start(opts(), ["ann@remote.example"])
    p.reply("220 hi")
    p.reply("250-mx\n250 PIPELINING")
    assert p.reply("250 ok\n550 5.1.1 no\n354 go") == b".\r\n"
    assert p.reply("554 5.5.1 no valid recipients") == b"QUIT\r\n"
    p.reply("221 bye")
    assert result(d)["ann@remote.example"].state == FAILED


def test_pipelining_mail_refused() -> None:
    """MAIL FROM refused in a pipelined group: the whole transaction fails with that reply."""
    p = Peer()
    d = p.start(opts(), ["ann@remote.example"])
    p.reply("220 hi")
    p.reply("250-mx\n250 PIPELINING")
    p.reply("451 4.3.0 try later\n503 5.5.1 MAIL first\n503 5.5.1 MAIL first")
    with pytest.raises(SessionError) as e:
        result(d)
    assert e.value.reply == "451 4.3.0 try later" and not e.value.permanent
