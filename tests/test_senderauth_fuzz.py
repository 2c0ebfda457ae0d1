"""Property tests: whatever DNS and the message hold, sender authentication answers a result
and never raises (a crash here would be a lost or refused message)."""

from __future__ import annotations

from typing import Any, Callable

from dkim_doubles import MESSAGE
from hypothesis import given
from hypothesis import strategies as st
from senderauth_doubles import FakeLookup, run
from twisted.internet import defer

from mailguard.senderauth import authresults, dkimverify, dmarc, spf
from mailguard.senderauth.dkimverify import DKIMResult

TERMS = st.sampled_from(["a", "mx", "ptr", "all", "-all", "~all", "?all", "include:", "exists:", "ip4:",
                         "ip6:", "redirect=", "exp=", "a:", "mx:", "/24", "//64", "%{d}", "%{i}", "%{l1r-}",
                         "%{p}", "%%", "example.org", "sub.example.org", "192.0.2.1", "::1", "=", ":", "/",
                         " ", "\x00", "é", "x" * 70, "."])
RECORD = st.lists(TERMS, max_size=12).map(lambda parts: "v=spf1 " + "".join(parts))


@given(RECORD, RECORD, st.sampled_from(["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1"]))
def test_spf_never_raises(record: str, other: str, ip: str) -> None:
    """Any record (and any included or redirected one) gives one of the seven results."""
    lookup = FakeLookup({"example.org": [("TXT", record), ("A", "192.0.2.1"), ("MX", (10, "sub.example.org"))],
                         "sub.example.org": [("TXT", other), ("A", "192.0.2.2"), ("AAAA", "::1")],
                         "1.2.0.192.in-addr.arpa": [("PTR", "sub.example.org")]})
    result = run(spf.evaluate(lookup, ip, "joe@example.org", "helo.example"))
    assert result.result in spf.RESULTS


def at_once(work: Callable[..., list[DKIMResult]], *args: Any) -> "defer.Deferred[list[DKIMResult]]":
    return defer.succeed(work(*args))


@given(st.binary(max_size=300), st.binary(max_size=200))
def test_dkim_never_raises(signature: bytes, key: bytes) -> None:
    """Any DKIM-Signature value against any key record gives a result per signature."""
    message = b"DKIM-Signature: v=1; d=example.org; s=sel; " + signature.replace(b"\r", b"").replace(
        b"\n", b"") + b"\r\n" + MESSAGE
    lookup = FakeLookup({"sel._domainkey.example.org": [("TXT", key)]})
    results = run(dkimverify.verify(lookup, message, to_thread=at_once))
    assert len(results) == 1 and results[0].result in ("pass", "fail", "neutral", "temperror", "permerror")


@given(st.text(max_size=120))
def test_dmarc_record_parse_never_raises(text: str) -> None:
    """Any TXT text parses to a record or to None."""
    record: Any = dmarc.parse(text)
    assert record is None or record.p in dmarc.POLICIES


@given(st.binary(max_size=400))
def test_remove_ours_keeps_the_body(head: bytes) -> None:
    """Removing our Authentication-Results never touches the body or other header bytes' order."""
    head = head.replace(b"\r\n\r\n", b"\r\n")
    message = head + b"\r\n\r\nbody line\r\n"
    cleaned, removed = authresults.remove_ours(message, "mx.test")
    assert cleaned.endswith(b"\r\n\r\nbody line\r\n") or (removed == 0 and cleaned == message)
