"""The SMTP adapter runs the inbound checks: StringTransport sessions, DNS from a table, task.Clock time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dns_doubles import FakeDNS
from twisted.internet import defer

from mailguard.checks.pipeline import InboundChecks
from mailguard.core import checks as core_checks
from mailguard.core import replies
from mailguard.dns.resolver import MX

from conftest import FakeContext, LogCapture, Session, office_config

CLIENT = "203.0.113.9"
DNS: dict[tuple[str, str], Any] = {
    ("9.113.0.203.in-addr.arpa", "PTR"): ("mail.sender.example",),
    ("mail.sender.example", "A"): (CLIENT,),
    ("9.113.0.203.bl.example", "A"): ("127.0.0.2",),
    ("sender.example", "MX"): (MX(10, "mx.sender.example"),),
    ("broken.example", "MX"): "SERVFAIL",
}


def checked_host(tmp_path: Path, dns: FakeDNS | None = None, **sections: dict[str, Any]
                 ) -> tuple[FakeContext, FakeDNS]:
    """A FakeContext whose InboundChecks ask ``dns`` and keep greylist state in ``tmp_path``."""
    cfg = office_config(**sections)
    ctx = FakeContext(cfg)
    ctx.directory.add_mailbox("alice@office.example")
    ctx.authenticator.users["alice@office.example"] = ("secret", "alice@office.example")
    dns = dns or FakeDNS(dict(DNS))
    ctx.checks = InboundChecks(cfg, dns, ctx.clock, run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a),
                               greylist_path=tmp_path / "greylist.sqlite")
    return ctx, dns


def test_dnsbl_refusal_at_mail_is_answered_and_logged(tmp_path: Path, logs: LogCapture) -> None:
    """A listed client: MAIL gets dnsbl_listed, one decision line names the zone and code; RSET, MAIL again: same."""
    ctx, dns = checked_host(tmp_path, checks={"dnsbl": ["bl.example"]})
    s = Session(ctx, client_ip=CLIENT)
    assert ("9.113.0.203.bl.example", "A") in dns.asked          # asked when the client connected
    s.cmd("EHLO client.example")
    listed = str(ctx.cfg.checks.replies.dnsbl_listed)
    assert s.cmd("MAIL FROM:<joe@sender.example>") == [listed]
    assert s.cmd("RCPT TO:<alice@office.example>") == [str(replies.MAIL_FIRST)]
    (line,) = logs.matching("rule=dnsbl_listed")
    assert f'client={CLIENT} ' in line and 'detail="zone=bl.example code=127.0.0.2"' in line
    assert dns.asked.count(("9.113.0.203.bl.example", "A")) == 1


def test_sender_domain_servfail_is_451(tmp_path: Path) -> None:
    """DNS trouble for the sender's domain: 451 4.4.3 at MAIL, never a pass."""
    ctx, _ = checked_host(tmp_path, checks={"sender_domain": True})
    s = Session(ctx, client_ip=CLIENT)
    s.cmd("EHLO client.example")
    assert s.cmd("MAIL FROM:<joe@broken.example>") == [str(core_checks.DNS_TEMPFAIL)]
    assert s.cmd("MAIL FROM:<joe@sender.example>") == [str(replies.SENDER_OK)]


def test_greylisting_at_rcpt_keeps_the_transaction(tmp_path: Path) -> None:
    """greylisted at RCPT; the transaction stays open, and after the delay the recipient is accepted."""
    ctx, _ = checked_host(tmp_path, checks={"greylist": 60})
    s = Session(ctx, client_ip=CLIENT)
    s.cmd("EHLO client.example")
    assert s.cmd("MAIL FROM:<joe@sender.example>") == [str(replies.SENDER_OK)]
    assert s.cmd("RCPT TO:<alice@office.example>") == [str(ctx.cfg.checks.replies.greylisted)]
    ctx.clock.advance(61)
    assert s.cmd("RCPT TO:<alice@office.example>") == [str(replies.RECIPIENT_OK)]


def test_received_names_the_verified_client_and_trusted_skip(tmp_path: Path) -> None:
    """Received: from HELO (NAME [IP]) for an untrusted client; an authenticated one skips the DNSBL."""
    ctx, _ = checked_host(tmp_path, checks={"dnsbl": ["bl.example"]}, tls={"auth_requires_tls": False})
    s = Session(ctx, client_ip=CLIENT)
    s.cmd("EHLO odd\x01name")
    assert s.cmd("AUTH PLAIN AGFsaWNlQG9mZmljZS5leGFtcGxlAHNlY3JldA==")[0].startswith("235 ")
    assert s.cmd("MAIL FROM:<alice@office.example>") == [str(replies.SENDER_OK)]
    ctx2, _ = checked_host(tmp_path)
    t = Session(ctx2, client_ip=CLIENT)
    t.cmd("EHLO odd\x01name")
    t.cmd("MAIL FROM:<joe@sender.example>")
    t.cmd("RCPT TO:<alice@office.example>")
    t.cmd("DATA")
    t.cmd("Subject: hi\r\n\r\nbody\r\n.")
    (call,) = ctx2.store.calls
    assert call.received.startswith(b"Received: from odd?name (mail.sender.example [203.0.113.9])\r\n")
