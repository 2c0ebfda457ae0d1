"""Tests for mailguard.senderauth.inbound: which results refuse, in which mode, with which reply."""

from __future__ import annotations

from typing import Any, Callable

import pytest
from dkim_doubles import MESSAGE, key_pair, sign_dkimpy
from senderauth_doubles import FakeLookup, run
from twisted.internet import defer

from mailguard.core import replies
from mailguard.senderauth import inbound
from mailguard.senderauth.dkimverify import DKIMResult
from mailguard.senderauth.inbound import Modes

SPF_FAIL = replies.parse("550 5.7.23 SPF validation failed")
DMARC_REJECT = replies.parse("550 5.7.1 Rejected by the sender domain's DMARC policy")
HOST = "mail.realdomain.example"


def zone() -> FakeLookup:
    _, record = key_pair()
    return FakeLookup({
        "example.org": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
        "sel._domainkey.example.org": [("TXT", record)],
        "_dmarc.example.org": [("TXT", "v=DMARC1; p=reject")],
        "broken.example": [("TXT", "v=spf1 bogus:x -all")],
        "slow.example": [("TIMEOUT", None)],
        "_dmarc.slow.example": [("TIMEOUT", None)],
    })


def at_once(work: Callable[..., list[DKIMResult]], *args: Any) -> "defer.Deferred[list[DKIMResult]]":
    return defer.succeed(work(*args))


def at_mail(mode: str, ip: str, sender: str) -> tuple[Any, Any]:
    return run(inbound.spf_at_mail(Modes(spf=mode), zone(), ip, sender, "client.example", SPF_FAIL))


def after(modes: Modes, message: bytes, ip: str = "198.51.100.1", sender: str = "joe@example.org") -> Any:
    lookup = zone()
    spf_result = run(inbound.spf_at_mail(modes, lookup, ip, sender, "client.example", SPF_FAIL))[0]
    return run(inbound.after_data(modes, lookup, HOST, spf_result, message, DMARC_REJECT, at_once))


def test_spf_reject_refuses_fail_with_spf_fail() -> None:
    """spf = "reject": a fail is refused with the spf_fail reply, naming the rule."""
    result, refusal = at_mail("reject", "198.51.100.1", "joe@example.org")
    assert result.result == "fail"
    assert (refusal.rule, refusal.reply) == ("spf_fail", SPF_FAIL)


def test_spf_reject_defers_temperror() -> None:
    """spf = "reject": DNS trouble is the 4xx DNS_TEMPFAIL, never a 5xx."""
    _, refusal = at_mail("reject", "198.51.100.1", "joe@slow.example")
    assert (refusal.rule, str(refusal.reply)) == (
        "spf_temperror", "451 4.4.3 Temporary DNS lookup failure, try again later")


@pytest.mark.parametrize("sender", ["joe@broken.example", "joe@nowhere.example"])
def test_spf_reject_accepts_permerror_and_none(sender: str) -> None:
    """permerror and none are recorded, not refused (policyd-spf's PermError_reject = False)."""
    result, refusal = at_mail("reject", "198.51.100.1", sender)
    assert result.result in ("permerror", "none") and refusal is None


def test_spf_check_never_refuses() -> None:
    """spf = "check": a fail is only recorded."""
    result, refusal = at_mail("check", "198.51.100.1", "joe@example.org")
    assert (result.result, refusal) == ("fail", None)


def test_dmarc_reject_refuses_unaligned_fail() -> None:
    """dmarc = "reject", p=reject, SPF fail and no signature: dmarc_reject, and the header says why."""
    v = after(Modes(dmarc="reject"), MESSAGE)
    assert (v.refusal.rule, v.refusal.reply) == ("dmarc_reject", DMARC_REJECT)
    assert b"dmarc=fail (p=reject) header.from=example.org" in v.header


def test_dmarc_check_only_records() -> None:
    """dmarc = "check": the same message is accepted, with dmarc=fail recorded."""
    v = after(Modes(dmarc="check"), MESSAGE)
    assert v.refusal is None
    assert b"dmarc=fail" in v.header


def test_aligned_dkim_passes_dmarc() -> None:
    """A good signature by the From: domain passes DMARC even from an address SPF fails."""
    v = after(Modes(spf="check", dkim_verify=True, dmarc="reject"), sign_dkimpy(MESSAGE))
    assert v.refusal is None
    assert v.header == (b"Authentication-Results: mail.realdomain.example;\r\n"
                        b"\tspf=fail (-all matched at example.org) smtp.mailfrom=joe@example.org;\r\n"
                        b"\tdkim=pass header.d=example.org header.s=sel header.i=@example.org header.a=rsa-sha256;\r\n"
                        b"\tdmarc=pass (p=reject) header.from=example.org\r\n")


def test_altered_signed_message_is_refused() -> None:
    """The signed message with its body changed: dkim=fail, and DMARC rejects it."""
    v = after(Modes(dkim_verify=True, dmarc="reject"), sign_dkimpy(MESSAGE).replace(b"attached", b"gone"))
    assert v.refusal is not None and v.refusal.rule == "dmarc_reject"
    assert b"dkim=fail" in v.header


def test_dmarc_dns_trouble_defers() -> None:
    """dmarc = "reject" and _dmarc times out: 451 4.4.3, not a refusal and not a pass."""
    v = after(Modes(dmarc="reject"), MESSAGE.replace(b"alice@example.org", b"alice@slow.example"))
    assert (v.refusal.rule, str(v.refusal.reply)) == (
        "dmarc_temperror", "451 4.4.3 Temporary DNS lookup failure, try again later")


def test_forged_results_naming_us_are_removed() -> None:
    """An incoming Authentication-Results naming this host is gone from the stored message."""
    forged = b"Authentication-Results: mail.realdomain.example; dmarc=pass\r\n" + MESSAGE
    v = after(Modes(spf="check"), forged)
    assert v.message == MESSAGE
    assert v.header.startswith(b"Authentication-Results: mail.realdomain.example;\r\n\tspf=fail")
    assert b"dkim=" not in v.header and b"dmarc=" not in v.header
