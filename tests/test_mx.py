"""Tests for mailguard.outbound.mx: MX routing against a loopback DNS server (twisted.names)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import pytest_twisted
from dns_doubles import MemoryAuthority
from twisted.internet import defer, protocol, reactor
from twisted.names import client, dns, server

from mailguard.outbound import mx
from mailguard.outbound.mx import Relay, RouteError

ZONE = {
    b"remote.test": [dns.Record_MX(20, b"backup.remote.test"), dns.Record_MX(10, b"mx1.remote.test")],
    b"mx1.remote.test": [dns.Record_A("127.0.0.2")],
    b"backup.remote.test": [dns.Record_A("127.0.0.3")],
    b"plain.test": [dns.Record_A("127.0.0.4"), dns.Record_AAAA("::1")],
    b"nullmx.test": [dns.Record_MX(0, b"")],
    b"dangling.test": [dns.Record_MX(10, b"nowhere.test")],
    b"smarthost.test": [dns.Record_A("127.0.0.9")],
}


def start_dns(records: dict[bytes, list[Any]]) -> tuple[Any, int]:
    """A DNS server for ``records`` on a free loopback UDP port; returns (port object, number)."""
    factory = server.DNSServerFactory(authorities=[MemoryAuthority(records)])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    return port, port.getHost().port


@pytest.fixture
def resolver() -> Iterator[client.Resolver]:
    """A twisted.names resolver pointed at the loopback zone."""
    port, number = start_dns(ZONE)
    yield mx.make_resolver([("127.0.0.1", number)], reactor)
    port.stopListening()


def route(resolver: Any, domain: str, smarthost: str = "") -> defer.Deferred[list[Relay]]:
    return defer.ensureDeferred(mx.route(resolver, domain, 2525, smarthost))


@pytest_twisted.inlineCallbacks
def test_mx_hosts_by_preference(resolver: Any) -> Any:
    """Every MX host is listed, lowest preference first, each with its address and the port."""
    relays = yield route(resolver, "remote.test")
    assert relays == [Relay("mx1.remote.test", "127.0.0.2", 2525), Relay("backup.remote.test", "127.0.0.3", 2525)]


@pytest_twisted.inlineCallbacks
def test_implicit_mx(resolver: Any) -> Any:
    """A domain without MX records is its own mail host (A then AAAA)."""
    relays = yield route(resolver, "plain.test")
    assert relays == [Relay("plain.test", "127.0.0.4", 2525), Relay("plain.test", "::1", 2525)]


@pytest_twisted.inlineCallbacks
def test_null_mx_is_permanent(resolver: Any) -> Any:
    """RFC 7505 null MX: a permanent failure with status 5.1.10."""
    with pytest.raises(RouteError) as e:
        yield route(resolver, "nullmx.test")
    assert e.value.permanent and e.value.reply().startswith("550 5.1.10")


@pytest_twisted.inlineCallbacks
def test_nxdomain_is_permanent(resolver: Any) -> Any:
    """A domain that does not exist fails permanently."""
    with pytest.raises(RouteError) as e:
        yield route(resolver, "no-such-domain.test")
    assert e.value.permanent


@pytest_twisted.inlineCallbacks
def test_mx_without_address_is_permanent(resolver: Any) -> Any:
    """An MX host name that does not resolve leaves no host: permanent."""
    with pytest.raises(RouteError) as e:
        yield route(resolver, "dangling.test")
    assert e.value.permanent


@pytest_twisted.inlineCallbacks
def test_dns_timeout_is_temporary() -> Any:
    """A DNS server that never answers gives a temporary failure (retry), not a bounce."""
    silent = reactor.listenUDP(0, protocol.DatagramProtocol(), interface="127.0.0.1")
    try:
        res = mx.make_resolver([("127.0.0.1", silent.getHost().port)], reactor, timeout=0.2)
        with pytest.raises(RouteError) as e:
            yield route(res, "remote.test")
        assert not e.value.permanent and e.value.reply().startswith("451 4.4.3")
    finally:
        yield silent.stopListening()


@pytest_twisted.inlineCallbacks
def test_smarthost_replaces_mx(resolver: Any) -> Any:
    """With a smarthost every domain goes to it; a name is looked up, an IP used as is."""
    relays = yield route(resolver, "remote.test", "smarthost.test:587")
    assert relays == [Relay("smarthost.test", "127.0.0.9", 587)]
    relays = yield route(resolver, "nullmx.test", "127.0.0.7:465")
    assert relays == [Relay("127.0.0.7", "127.0.0.7", 465)]


@pytest_twisted.inlineCallbacks
def test_unknown_smarthost_is_temporary(resolver: Any) -> Any:
    """A smarthost name that does not resolve is a local problem: retried, never bounced."""
    with pytest.raises(RouteError) as e:
        yield route(resolver, "remote.test", "gone.test:25")
    assert not e.value.permanent


@pytest_twisted.inlineCallbacks
def test_address_literal(resolver: Any) -> Any:
    """``user@[127.0.0.5]`` goes to that address without DNS."""
    relays = yield route(resolver, "[127.0.0.5]")
    assert relays == [Relay("127.0.0.5", "127.0.0.5", 2525)]


def test_split_host_port() -> None:
    """host:port, [v6]:port and a bare host with the default port."""
    assert mx.split_host_port("smtp.isp.example:587", 25) == ("smtp.isp.example", 587)
    assert mx.split_host_port("[::1]:465", 25) == ("::1", 465)
    assert mx.split_host_port("smtp.isp.example", 25) == ("smtp.isp.example", 25)
