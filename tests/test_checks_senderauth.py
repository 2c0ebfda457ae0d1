"""Tests for mailguard.checks.senderauth through the InboundChecks pipeline: SPF at MAIL,
DKIM/DMARC and Authentication-Results at the final dot, as the configuration says."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from dkim_doubles import MESSAGE, key_pair, sign_dkimpy
from senderauth_doubles import FakeResolver, run
from twisted.internet import defer, task

from mailguard import config
from mailguard.checks.pipeline import InboundChecks
from mailguard.checks.senderauth import Outcome
from mailguard.senderauth.dkimverify import DKIMResult

GOOD = "192.0.2.10"
BAD = "198.51.100.1"


def zone() -> FakeResolver:
    _, record = key_pair()
    return FakeResolver({
        "example.org": [("TXT", f"v=spf1 ip4:{GOOD} -all")],
        "sel._domainkey.example.org": [("TXT", record)],
        "_dmarc.example.org": [("TXT", "v=DMARC1; p=reject")],
    })


def at_once(work: Callable[..., list[DKIMResult]], *args: Any) -> "defer.Deferred[list[DKIMResult]]":
    return defer.succeed(work(*args))


def build(tmp_path: Path, resolver: FakeResolver | None = None, soft_bounce: bool = False,
          **checks: Any) -> InboundChecks:
    cfg = config.parse({"server": {"data_dir": str(tmp_path), "hostname": "mx.local.test"},
                        "domains": {"local.test": {"route": "inbound"}}, "checks": checks,
                        "replies": {"soft_bounce": soft_bounce}}, "test", tmp_path)
    clock = task.Clock()
    pipeline = InboundChecks(cfg, resolver or zone(), clock)
    pipeline.after_data.options = {"to_thread": at_once}
    return pipeline


def mail(checks: InboundChecks, client: str, sender: str = "joe@example.org", trusted: bool = False) -> str:
    conn = checks.connected(client)
    conn.helo = "client.example"
    refusal = run(checks.at_mail(checks.facts(conn, trusted, None, sender)))
    return f"{refusal.reply} ({refusal.rule})" if refusal else "pass"


def data(checks: InboundChecks, client: str, message: bytes, trusted: bool = False,
         sender: str = "joe@example.org") -> Outcome:
    conn = checks.connected(client)
    conn.helo = "client.example"
    facts = checks.facts(conn, trusted, None, sender)
    run(checks.at_mail(facts))          # the MAIL stage runs first, as in a session
    return run(checks.at_data(facts, message))


def test_spf_reject_at_mail(tmp_path: Path) -> None:
    """spf = "reject": the SPF fail gets spf_fail at MAIL; the allowed host passes."""
    checks = build(tmp_path, spf="reject")
    assert checks.rules[-1] == "spf_fail"
    assert mail(checks, BAD) == "550 5.7.23 SPF validation failed (spf_fail)"
    assert mail(checks, GOOD) == "pass"


def test_spf_soft_bounce(tmp_path: Path) -> None:
    """soft_bounce turns the spf_fail 550 into a 450."""
    assert mail(build(tmp_path, spf="reject", soft_bounce=True), BAD) == "450 4.7.23 SPF validation failed (spf_fail)"


def test_spf_check_and_trusted_never_refused(tmp_path: Path) -> None:
    """spf = "check" never refuses; a trusted client is not checked at all."""
    assert mail(build(tmp_path, spf="check"), BAD) == "pass"
    resolver = zone()
    checks = build(tmp_path, resolver, spf="reject")
    assert mail(checks, BAD, trusted=True) == "pass"
    assert [q for q in resolver.zone.asked if q[0] == "TXT"] == []


def test_spf_once_per_connection_and_sender(tmp_path: Path) -> None:
    """The MAIL check and the header at the final dot share one SPF evaluation."""
    resolver = zone()
    out = data(build(tmp_path, resolver, spf="check"), GOOD, MESSAGE)
    assert b"spf=pass" in out.header
    assert resolver.zone.asked.count(("TXT", "example.org")) == 1


def test_off_adds_nothing(tmp_path: Path) -> None:
    """All three off: no header, the message untouched, no DNS."""
    resolver = zone()
    out = data(build(tmp_path, resolver), BAD, MESSAGE)
    assert out == Outcome(b"", MESSAGE, None)
    assert [q for q in resolver.zone.asked if q[0] == "TXT"] == []


def test_dmarc_reject_at_data(tmp_path: Path) -> None:
    """dmarc = "reject": unaligned mail claiming a p=reject domain gets dmarc_reject; signed mail passes;
    a trusted client's mail is neither checked nor marked."""
    checks = build(tmp_path, dmarc="reject")
    out = data(checks, BAD, MESSAGE)
    assert out.refusal is not None
    assert (str(out.refusal.reply), out.refusal.rule) == (
        "550 5.7.1 Rejected by the sender domain's DMARC policy", "dmarc_reject")
    signed = data(checks, BAD, sign_dkimpy(MESSAGE))
    assert signed.refusal is None and b"dmarc=pass" in signed.header
    assert data(checks, BAD, MESSAGE, trusted=True) == Outcome(b"", MESSAGE, None)


def test_dmarc_reject_soft_bounce(tmp_path: Path) -> None:
    """soft_bounce applies to dmarc_reject too."""
    out = data(build(tmp_path, dmarc="reject", soft_bounce=True), BAD, MESSAGE)
    assert out.refusal is not None and str(out.refusal.reply).startswith("450 4.7.1 ")


def test_check_mode_only_records(tmp_path: Path) -> None:
    """spf/dkim_verify/dmarc in check mode: the header names each result, nothing is refused."""
    out = data(build(tmp_path, spf="check", dkim_verify=True, dmarc="check"), BAD, MESSAGE)
    assert out.refusal is None
    assert out.header == (b"Authentication-Results: mx.local.test;\r\n"
                          b"\tspf=fail (-all matched at example.org) smtp.mailfrom=joe@example.org;\r\n"
                          b"\tdkim=none (no signature);\r\n"
                          b"\tdmarc=fail (p=reject) header.from=example.org\r\n")
