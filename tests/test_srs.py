"""Tests for mailguard.core.srs: forwarding rewrites that verify, and forgeries that do not."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailguard.core.srs import MAX_AGE_DAYS, SRS, SRSError, is_srs

NOW = 1796100000.0
srs = SRS(b"the server's secret")


def test_forward_and_reverse() -> None:
    """The rewritten sender lives in the forwarding domain and reverses to the original."""
    rewritten = srs.forward("Alice@Example.org", "office.example", NOW)
    local, _, domain = rewritten.rpartition("@")
    assert domain == "office.example" and local.startswith("SRS0=")
    assert local.endswith("=Example.org=Alice")
    assert srs.reverse(local, NOW) == "Alice@Example.org"
    assert srs.reverse(local.lower(), NOW).lower() == "alice@example.org"   # case-folding relays


def test_expires() -> None:
    """A bounce older than the limit is refused (a replayed address)."""
    local = srs.forward("alice@example.org", "office.example", NOW).rpartition("@")[0]
    assert srs.reverse(local, NOW + MAX_AGE_DAYS * 86400) == "alice@example.org"
    with pytest.raises(SRSError, match="expired"):
        srs.reverse(local, NOW + (MAX_AGE_DAYS + 1) * 86400)


@pytest.mark.parametrize("forged", [
    "SRS0=AAAA=JU=example.org=alice",                   # made up hash
    "SRS0=Lma3=JU=example.org",                         # too few parts
    "SRS0==JU=example.org=alice",
    "SRS1=AAAA=office.example==Lma3=JU=example.org=alice",
])
def test_forgeries_refused(forged: str) -> None:
    """Addresses not made with our secret do not verify."""
    with pytest.raises(SRSError):
        srs.reverse(forged, NOW)


def test_another_secret_cannot_forge() -> None:
    """A rewrite made by a server with another secret does not verify here."""
    other = SRS(b"someone else").forward("alice@example.org", "office.example", NOW).rpartition("@")[0]
    with pytest.raises(SRSError, match="hash"):
        srs.reverse(other, NOW)


def test_srs1_for_an_already_rewritten_sender() -> None:
    """Forwarding an SRS0 address again wraps it as SRS1, which reverses to the SRS0 address."""
    first = SRS(b"first hop").forward("alice@example.org", "hop1.example", NOW)
    second = srs.forward(first, "office.example", NOW)
    assert second.startswith("SRS1=") and second.endswith("@office.example")
    assert srs.reverse(second.rpartition("@")[0], NOW) == first


def test_is_srs() -> None:
    assert is_srs("SRS0=x=y=z=w") and is_srs("srs1+abc") and not is_srs("srs0") and not is_srs("alice")


@given(st.from_regex(r"[A-Za-z0-9._%+-]{1,30}", fullmatch=True), st.from_regex(r"[a-z0-9-]{1,20}\.[a-z]{2,6}",
                                                                                fullmatch=True))
def test_round_trip(local: str, domain: str) -> None:
    """Any ordinary address survives forward then reverse unchanged."""
    rewritten = srs.forward(f"{local}@{domain}", "office.example", NOW)
    if is_srs(local):
        return
    assert srs.reverse(rewritten.rpartition("@")[0], NOW) == f"{local}@{domain}"
