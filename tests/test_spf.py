"""Tests for mailguard.senderauth.spf beyond the RFC 7208 suite: identities and DNS trouble."""

from __future__ import annotations

from senderauth_doubles import FakeLookup, run

from mailguard.senderauth import spf

ZONE = {
    "example.org": [("TXT", "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 -all")],
    "helo.example.org": [("TXT", "v=spf1 a ~all"), ("A", "192.0.2.9")],
    "slow.example.org": [("TIMEOUT", None)],
    "inc.example.org": [("TXT", "v=spf1 include:slow.example.org -all")],
}


def evaluate(ip: str, mail_from: str, helo: str = "helo.example.org") -> spf.SPFResult:
    return run(spf.evaluate(FakeLookup(ZONE), ip, mail_from, helo))


def test_mail_from_identity() -> None:
    """MAIL FROM's domain decides: inside the network passes, outside fails with an explanation."""
    ok = evaluate("192.0.2.7", "joe@example.org")
    assert (ok.result, ok.identity, ok.domain) == ("pass", "mailfrom", "example.org")
    bad = evaluate("198.51.100.1", "joe@example.org")
    assert bad.result == "fail"
    assert bad.explanation == "See https://www.open-spf.org/Why for why SPF failed for example.org"


def test_null_sender_checks_helo() -> None:
    """For <> the HELO name is checked, as postmaster@HELO (RFC 7208 section 2.4)."""
    r = evaluate("192.0.2.9", "")
    assert (r.result, r.identity, r.sender) == ("pass", "helo", "postmaster@helo.example.org")
    assert evaluate("192.0.2.10", "").result == "softfail"


def test_ipv4_mapped_client_is_ipv4() -> None:
    """An IPv4-mapped IPv6 client is matched against ip4: (RFC 7208 section 5)."""
    assert evaluate("::ffff:192.0.2.7", "joe@example.org").result == "pass"
    assert evaluate("2001:db8::1", "joe@example.org").result == "pass"


def test_dns_trouble_is_temperror_never_pass() -> None:
    """A timeout, directly or inside an include, is temperror."""
    assert evaluate("192.0.2.7", "joe@slow.example.org").result == "temperror"
    assert evaluate("192.0.2.7", "joe@inc.example.org").result == "temperror"


def test_no_record_is_none() -> None:
    """A domain without an SPF record (or without any DNS name) is none."""
    assert evaluate("192.0.2.7", "joe@nowhere.example.org").result == "none"
    assert evaluate("192.0.2.7", "joe@localhost").result == "none"
