"""Tests for mailguard.senderauth.dmarc: record discovery, alignment, p=/sp=/pct=."""

from __future__ import annotations

from typing import Any

import pytest
from senderauth_doubles import FakeLookup, run

from mailguard.senderauth import dmarc
from mailguard.senderauth.dkimverify import DKIMResult
from mailguard.senderauth.spf import SPFResult

ZONE: dict[str, list[tuple[str, Any]]] = {
    "_dmarc.example.org": [("TXT", "v=DMARC1; p=reject; sp=quarantine; adkim=r; aspf=r")],
    "_dmarc.strict.example": [("TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")],
    "_dmarc.half.example": [("TXT", "v=DMARC1; p=reject; pct=50")],
    "_dmarc.slow.example": [("TIMEOUT", None)],
    "_dmarc.two.example": [("TXT", "v=DMARC1; p=reject"), ("TXT", "v=DMARC1; p=none")],
    "_dmarc.bad.example": [("TXT", "v=DMARC1; p=bogus")],
    "_dmarc.example.co.uk": [("TXT", "v=DMARC1; p=reject")],
}


def spf(result: str, domain: str) -> SPFResult:
    return SPFResult(result, "mailfrom", f"joe@{domain}", domain)


def dkim(result: str, domain: str) -> DKIMResult:
    return DKIMResult(result, domain, "sel")


def evaluate(from_domain: str, spf_result: SPFResult | None = None, dkim_results: tuple[DKIMResult, ...] = (),
             sample: float = 0.0) -> dmarc.DMARCResult:
    return run(dmarc.evaluate(FakeLookup(ZONE), from_domain, spf_result, list(dkim_results), lambda: sample))


def test_aligned_dkim_pass() -> None:
    """A DKIM pass by the From: domain, or relaxed by a subdomain of it, is a DMARC pass."""
    assert evaluate("example.org", dkim_results=(dkim("pass", "example.org"),)).result == "pass"
    r = evaluate("example.org", dkim_results=(dkim("pass", "mail.example.org"),))
    assert (r.result, r.policy) == ("pass", "reject")


def test_aligned_spf_pass() -> None:
    """An SPF pass for a MAIL FROM in the same organisational domain is a DMARC pass."""
    assert evaluate("example.org", spf("pass", "bounces.example.org")).result == "pass"


def test_nothing_aligned_is_fail_with_the_policy() -> None:
    """Passes by other domains do not count: fail, p=reject applies, the message is to be refused."""
    r = evaluate("example.org", spf("pass", "mailer.example"), (dkim("pass", "mailer.example"),
                                                               dkim("fail", "example.org")))
    assert (r.result, r.policy, r.reject) == ("fail", "reject", True)


def test_strict_alignment() -> None:
    """adkim=s / aspf=s: a subdomain is not aligned."""
    r = evaluate("strict.example", spf("pass", "mail.strict.example"), (dkim("pass", "mail.strict.example"),))
    assert (r.result, r.reject) == ("fail", True)
    assert evaluate("strict.example", dkim_results=(dkim("pass", "strict.example"),)).result == "pass"


def test_subdomain_uses_sp_from_the_organisational_record() -> None:
    """news.example.org has no record: example.org's applies, with its sp= (quarantine)."""
    r = evaluate("news.example.org")
    assert (r.result, r.policy, r.reject) == ("fail", "quarantine", False)


def test_public_suffix_list_finds_the_organisational_domain() -> None:
    """a.b.example.co.uk falls back to example.co.uk (co.uk is a public suffix)."""
    assert dmarc.org_domain("a.b.example.co.uk") == "example.co.uk"
    assert evaluate("a.b.example.co.uk").policy == "reject"


@pytest.mark.parametrize("sample,policy", [(0.49, "reject"), (0.5, "quarantine")])
def test_pct_samples(sample: float, policy: str) -> None:
    """pct=50: half the failing mail gets p=reject, the other half the next softer policy."""
    r = evaluate("half.example", sample=sample)
    assert (r.result, r.policy, r.requested) == ("fail", policy, "reject")


def test_no_record_none() -> None:
    """No record, several records or a record without a valid p=: none, nothing to enforce."""
    for domain in ("nowhere.example", "two.example", "bad.example"):
        r = evaluate(domain)
        assert (r.result, r.reject) == ("none", False), domain


def test_dns_trouble_is_temperror_never_fail() -> None:
    """A timeout on _dmarc, or on an aligned check, is temperror: never refused for it."""
    assert evaluate("slow.example").result == "temperror"
    r = evaluate("example.org", spf("temperror", "example.org"))
    assert (r.result, r.reject) == ("temperror", False)


def test_from_domain() -> None:
    """The From: domain; none, several domains or no domain raise FromError."""
    assert dmarc.from_domain(b"To: x@y\r\nFrom: \"A, B\" <a@Example.ORG>\r\n\r\n") == "example.org"
    assert dmarc.from_domain(b"From: a@example.org,\r\n b@example.org\r\n\r\n") == "example.org"
    for bad in (b"To: x@y\r\n\r\n", b"From: a@one.example, b@two.example\r\n\r\n",
                b"From: a@one.example\r\nFrom: b@two.example\r\n\r\n", b"From: nobody\r\n\r\n"):
        with pytest.raises(dmarc.FromError):
            dmarc.from_domain(bad)
