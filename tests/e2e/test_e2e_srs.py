"""SRS round trip end to end: a forward passes SPF at the next hop, its bounce finds the sender.

An outsider writes to a contact of the office (which forwards to a remote address):
the sink (the remote MX) receives it from an ``SRS0=…@realdomain.example`` sender.
The sink's bounce to that address is accepted for anyone and reaches the original
sender; a forged SRS address is refused at RCPT.
"""

from __future__ import annotations

import smtplib
from typing import Iterator

import pytest

from mailguard import config

from .conftest import DOMAIN, OUTSIDER, ServerFactory
from .harness import MailguardServer, make_message
from .sinks import DNSServer, Received, SMTPSink, wait_until
from .test_e2e_outbound import DELIVERY_TIMEOUT, marker, outbound_config

CONTACT = f"carol@{DOMAIN}"
CONTACT_TARGET = "carol.external@remote.example"
SENDER = "alice@sender.example"


def arrived(sink: SMTPSink, rcpt: str, tag: str) -> Received:
    """The one message for ``rcpt`` carrying ``tag``, once the sink has it."""
    def found() -> list[Received]:
        return [m for m in sink.messages_for(rcpt) if tag.encode() in m.data]
    wait_until(lambda: bool(found()), DELIVERY_TIMEOUT, f"a message {tag} for {rcpt}")
    (message,) = found()
    return message


@pytest.fixture(scope="module")
def zone() -> Iterator[DNSServer]:
    dns = DNSServer({"remote.example": [("MX", (10, "mx.remote.example"))],
                     "sender.example": [("MX", (10, "mx.remote.example"))],
                     "mx.remote.example": [("A", "127.0.0.1")]})
    yield dns
    dns.close()


@pytest.fixture(scope="module")
def sink() -> Iterator[SMTPSink]:
    s = SMTPSink(name="mx.remote.example")
    yield s
    s.close()


@pytest.fixture(scope="module")
def forwarder(server_factory: ServerFactory, zone: DNSServer, sink: SMTPSink) -> MailguardServer:
    server = server_factory("srs", outbound_config(zone, sink))
    server.cli_ok("contact", "add", CONTACT, CONTACT_TARGET)
    return server


def test_forward_and_bounce_back(forwarder: MailguardServer, sink: SMTPSink) -> None:
    """The forward carries an SRS sender in our domain; a bounce to it reaches the original sender."""
    tag = marker()
    with smtplib.SMTP(forwarder.host, forwarder.smtp_port, source_address=(OUTSIDER, 0), timeout=30) as c:
        assert c.sendmail(SENDER, [CONTACT], make_message(SENDER, CONTACT, tag)) == {}
    forwarded = arrived(sink, CONTACT_TARGET, tag)
    srs_sender = forwarded.sender
    assert srs_sender.startswith("SRS0=") and srs_sender.endswith(f"=sender.example=alice@{DOMAIN}"), srs_sender

    bounce = (f"From: MAILER-DAEMON@remote.example\r\nTo: {srs_sender}\r\nSubject: Undelivered {tag}\r\n\r\n"
              "mailbox full\r\n").encode()
    with smtplib.SMTP(forwarder.host, forwarder.smtp_port, source_address=(OUTSIDER, 0), timeout=30) as c:
        assert c.sendmail("", [srs_sender], bounce) == {}
    back = arrived(sink, SENDER, tag)
    assert back.sender == "" and back.recipients == [SENDER]
    forwarder.wait_for_log(rf"rcpt=<{srs_sender.lower()}> rule=srs ")


def test_forged_srs_address_refused(forwarder: MailguardServer) -> None:
    """An SRS address not made with this server's secret is an unknown recipient at RCPT."""
    forged = f"SRS0=AbCd=JU=victim.example=bob@{DOMAIN}"
    with smtplib.SMTP(forwarder.host, forwarder.smtp_port, source_address=(OUTSIDER, 0), timeout=30) as c:
        c.ehlo("spammer.example")
        c.mail("")
        code, text = c.rcpt(forged)
    assert f"{code} {text.decode()}" == str(config.defaults().replies.unknown_recipient)
    forwarder.wait_for_log(r"rule=srs_invalid ")


def test_local_senders_are_not_rewritten(forwarder: MailguardServer, sink: SMTPSink) -> None:
    """A sender in one of our own domains already passes SPF here: it is kept as is."""
    tag = marker()
    local_sender = f"boss@{DOMAIN}"
    with smtplib.SMTP(forwarder.host, forwarder.smtp_port, source_address=(OUTSIDER, 0), timeout=30) as c:
        assert c.sendmail(local_sender, [CONTACT], make_message(local_sender, CONTACT, tag)) == {}
    got = arrived(sink, CONTACT_TARGET, tag)
    assert got.sender == local_sender
