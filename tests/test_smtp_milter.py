"""The SMTP server's final dot with [filters]: what is stored, held or answered, over a
StringTransport, with a scripted milter behind the chain."""

from __future__ import annotations

from typing import Any

from mailguard.milter import codec
from mailguard.milter.chain import MilterChain
from mailguard.milter.client import MilterConnection

from conftest import FakeContext, Session, office_config
from test_milter_session import FakeMilter, Script, at_eom, continue_all, z

from twisted.internet import defer

OUTSIDER = "203.0.113.9"
ALLOWED = "192.168.10.5"
MESSAGE = "Subject: hello\r\n\r\nbody\r\n"


def context(script: Script, **changes: Any) -> tuple[FakeContext, list[FakeMilter]]:
    """A context whose one milter plays ``script``."""
    changes.setdefault("filters", {})
    changes["filters"] = {"milters": ["inet:127.0.0.1:11332"], **changes["filters"]}
    host = FakeContext(office_config(**changes))
    host.directory.add_mailbox("alice@office.example")
    fakes: list[FakeMilter] = []

    def connect(address: str) -> defer.Deferred[MilterConnection]:
        fake = FakeMilter(script)
        fakes.append(fake)
        return defer.succeed(fake.conn)
    host.milters = MilterChain(host.clock, host.cfg.filters.milters, host.cfg.filters.milter_default_action,
                               float(host.cfg.filters.milter_timeout), connect=connect)
    return host, fakes


def deliver(host: FakeContext, fakes: list[FakeMilter], client_ip: str = OUTSIDER) -> list[str]:
    """One transaction to alice; the reply lines to the final dot."""
    s = Session(host, client_ip=client_ip)
    s.cmd("EHLO client.example")
    assert s.cmd("MAIL FROM:<joe@sender.example>")[0].startswith("250 ")
    assert s.cmd("RCPT TO:<alice@office.example>")[0].startswith("250 ")
    assert s.cmd("DATA")[0].startswith("354 ")
    s.new_lines()
    s.send(MESSAGE + ".\r\n")
    for _ in range(3):
        for fake in list(fakes):
            fake.pump()
    return s.new_lines()


def test_filtered_copy_is_stored_held() -> None:
    """The milter's header and quarantine: stored once, the Received: header first, held."""
    host, fakes = context(at_eom(codec.packet(codec.ADDHEADER, z("X-Spam-Score", "2.0")),
                                 codec.packet(codec.QUARANTINE, z("looks odd"))))
    lines = deliver(host, fakes)
    assert len(lines) == 1 and lines[0].startswith("250 2.0.0 Ok: queued as "), lines
    (call,) = host.store.calls
    assert call.held == "looks odd" and call.received == b""
    assert call.message.startswith(b"Received: from client.example ([203.0.113.9])\r\n")
    assert call.message.endswith(b"\r\nSubject: hello\r\nX-Spam-Score: 2.0\r\n\r\nbody\r\n")
    assert [d.recipient for d in call.decisions] == ["alice@office.example"]


def test_milter_reject_is_the_reply_and_nothing_is_stored() -> None:
    """The milter's own reply reaches the client; the store is never called."""
    host, fakes = context(at_eom(final=codec.packet(codec.REPLYCODE, b"554 5.7.1 Spam\0")))
    assert deliver(host, fakes) == ["554 5.7.1 Spam"]
    assert host.store.calls == []


def test_soft_bounce_softens_a_milter_reject() -> None:
    """soft_bounce turns the milter's 5xx into its 4xx twin, like every policy refusal."""
    host, fakes = context(at_eom(final=codec.packet(codec.REPLYCODE, b"554 5.7.1 Spam\0")),
                          replies={"soft_bounce": True})
    assert deliver(host, fakes) == ["454 4.7.1 Spam"]


def test_discard_answers_250_and_stores_nothing() -> None:
    """SMFIR_DISCARD: the client is told the message was queued; nothing is stored."""
    host, fakes = context(at_eom(final=codec.packet(codec.DISCARD)))
    (line,) = deliver(host, fakes)
    assert line.startswith("250 2.0.0 Ok: queued as ")
    assert host.store.calls == []


def test_trusted_client_is_not_filtered() -> None:
    """for_trusted = false: a relay-allowed client's mail is stored without asking the milter."""
    host, fakes = context(continue_all)
    (line,) = deliver(host, fakes, client_ip=ALLOWED)
    assert line.startswith("250 ")
    assert fakes == [] and len(host.store.calls) == 1 and host.store.calls[0].held == ""


def test_for_trusted_filters_them_too() -> None:
    """for_trusted = true: the trusted client's mail goes through the milter as well."""
    host, fakes = context(at_eom(final=codec.packet(codec.REJECT)), filters={"for_trusted": True})
    assert deliver(host, fakes, client_ip=ALLOWED) == ["550 5.7.1 Command rejected"]
    assert len(fakes) == 1
