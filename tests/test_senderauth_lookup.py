"""Tests for mailguard.senderauth.lookup.ResolverLookup: the shared resolver against a loopback
DNS server, seen through the interface SPF, DKIM and DMARC use."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import pytest_twisted
from dns_doubles import MemoryAuthority
from senderauth_doubles import FakeResolver, run
from twisted.internet import defer, protocol, reactor
from twisted.names import dns, server

from mailguard.dns import resolver as dns_resolver
from mailguard.senderauth.lookup import DomainNotFound, ResolverLookup, TemporaryDNSError

ZONE = {
    b"host.test": [dns.Record_TXT(b"v=spf1 ", b"ip4:127.0.0.1 -all"), dns.Record_TXT(b"other"),
                   dns.Record_A("127.0.0.5"), dns.Record_AAAA("2001:db8::5"),
                   dns.Record_MX(10, b"mx.host.test")],
    b"5.0.0.127.in-addr.arpa": [dns.Record_PTR(b"host.test")],
}


@pytest.fixture
def lookup() -> Iterator[ResolverLookup]:
    """A ResolverLookup on the shared resolver, pointed at the loopback zone."""
    factory = server.DNSServerFactory(authorities=[MemoryAuthority(ZONE)])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    yield ResolverLookup(dns_resolver.from_config([("127.0.0.1", port.getHost().port)], 2, reactor))
    port.stopListening()


@pytest_twisted.inlineCallbacks
def test_answers(lookup: ResolverLookup) -> Any:
    """Each record type comes back as plain values; TXT strings are joined without separator."""
    assert sorted((yield defer.ensureDeferred(lookup.txt("host.test")))) == [
        b"other", b"v=spf1 ip4:127.0.0.1 -all"]
    assert (yield defer.ensureDeferred(lookup.a("host.test"))) == ["127.0.0.5"]
    assert (yield defer.ensureDeferred(lookup.aaaa("host.test"))) == ["2001:db8::5"]
    assert (yield defer.ensureDeferred(lookup.mx("host.test"))) == [(10, "mx.host.test")]
    assert (yield defer.ensureDeferred(lookup.ptr("127.0.0.5"))) == ["host.test"]


@pytest_twisted.inlineCallbacks
def test_nxdomain_and_nodata(lookup: ResolverLookup) -> Any:
    """A missing name raises DomainNotFound; a name without that type answers []."""
    with pytest.raises(DomainNotFound):
        yield defer.ensureDeferred(lookup.txt("missing.test"))
    assert (yield defer.ensureDeferred(lookup.txt("5.0.0.127.in-addr.arpa"))) == []


@pytest_twisted.inlineCallbacks
def test_timeout_is_temporary() -> Any:
    """A server that never answers gives TemporaryDNSError, not an empty answer."""
    silent = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
    try:
        lookup = ResolverLookup(dns_resolver.from_config([("127.0.0.1", silent.getHost().port)], 0.3, reactor))
        with pytest.raises(TemporaryDNSError):
            yield defer.ensureDeferred(lookup.txt("host.test"))
    finally:
        silent.stopListening()


def test_errors_translate() -> None:
    """NXDOMAIN -> DomainNotFound, NODATA -> [], the resolver's temporary error -> TemporaryDNSError."""
    lookup = ResolverLookup(FakeResolver({"a.test": [("A", "192.0.2.1"), ("MX", (5, "mx.a.test."))],
                                          "slow.test": [("TIMEOUT", None)]}))
    assert run(lookup.a("a.test")) == ["192.0.2.1"]
    assert run(lookup.mx("a.test")) == [(5, "mx.a.test")]
    assert run(lookup.txt("a.test")) == []
    with pytest.raises(DomainNotFound):
        run(lookup.txt("b.test"))
    with pytest.raises(TemporaryDNSError):
        run(lookup.txt("slow.test"))
