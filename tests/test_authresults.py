"""Tests for mailguard.senderauth.authresults: the header we write and the ones we remove."""

from __future__ import annotations

from mailguard.senderauth import authresults
from mailguard.senderauth.dkimverify import DKIMResult
from mailguard.senderauth.dmarc import DMARCResult
from mailguard.senderauth.spf import SPFResult


def test_header_names_each_result() -> None:
    """One field: our host, then spf, each dkim signature and dmarc (RFC 8601 section 2.2)."""
    text = authresults.header(
        "mail.realdomain.example",
        SPFResult("pass", "mailfrom", "joe@example.org", "example.org", reason="+ip4 matched at example.org"),
        [DKIMResult("pass", "example.org", "sel", "@example.org", "rsa-sha256")],
        DMARCResult("pass", "example.org", "reject", "reject"))
    assert text == (b"Authentication-Results: mail.realdomain.example;\r\n"
                    b"\tspf=pass (+ip4 matched at example.org) smtp.mailfrom=joe@example.org;\r\n"
                    b"\tdkim=pass header.d=example.org header.s=sel header.i=@example.org header.a=rsa-sha256;\r\n"
                    b"\tdmarc=pass (p=reject) header.from=example.org\r\n")


def test_header_helo_unsigned_and_sampled() -> None:
    """HELO identity, an unsigned message, and a pct-softened policy are all spelled out."""
    text = authresults.header("mx.test", SPFResult("none", "helo", "postmaster@h.test", "h.test"), [],
                              DMARCResult("fail", "x.test", "quarantine", "reject"))
    assert b"spf=none smtp.helo=h.test;" in text
    assert b"dkim=none (no signature);" in text
    assert b"dmarc=fail (p=reject applied=quarantine) header.from=x.test" in text


def test_odd_values_are_quoted() -> None:
    """A sender with spaces or quotes becomes a quoted-string; comments lose their parentheses."""
    text = authresults.header("mx.test", SPFResult("fail", "mailfrom", 'a "b"@x.test', "x.test", reason="(x)"))
    assert b'spf=fail (x) smtp.mailfrom="a \\"b\\"@x.test"' in text


def test_remove_ours_only() -> None:
    """Fields naming our host (any case, folded, with comments) go; other hosts' stay."""
    message = (b"Authentication-Results: MAIL.realdomain.example;\r\n\tspf=pass smtp.mailfrom=a@b\r\n"
               b"Subject: hi\r\n"
               b"Authentication-Results: (forged) mail.realdomain.example; dkim=pass\r\n"
               b"Authentication-Results: mx.other.example; spf=fail\r\n"
               b"\r\nAuthentication-Results: mail.realdomain.example; in the body\r\n")
    cleaned, removed = authresults.remove_ours(message, "mail.realdomain.example")
    assert removed == 2
    assert cleaned == (b"Subject: hi\r\nAuthentication-Results: mx.other.example; spf=fail\r\n"
                       b"\r\nAuthentication-Results: mail.realdomain.example; in the body\r\n")
    assert authresults.remove_ours(b"Subject: x\r\n\r\nbody\r\n", "mx.test") == (b"Subject: x\r\n\r\nbody\r\n", 0)
