"""Tests for mailguard.outbound.mx: MX routing against a loopback DNS server (twisted.names)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
import pytest_twisted
from dns_doubles import MemoryAuthority
from twisted.internet import defer, protocol, reactor
from twisted.names import client, dns, server

from mailguard.dns.resolver import MX, RECORDS, Answer
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


class BuggyResolver:
    """A resolver with a programming error: ``broken`` lookups raise TypeError.

    With ``broken=("MX",)`` the MX lookup itself fails; with ``("A", "AAAA")`` the MX
    answer is good and the lookup of the MX host's addresses fails.
    """

    def __init__(self, broken: tuple[str, ...] = ("MX", "A", "AAAA")) -> None:
        self.broken = broken

    async def lookup(self, name: str, type: str) -> Answer:
        if type in self.broken:
            raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")
        if type == "MX":
            return Answer(name, type, RECORDS, (MX(10, "mx1.remote.test"),))
        return Answer(name, type, RECORDS, ("127.0.0.2",))


def _failures_logged() -> tuple[list[dict[str, Any]], Any]:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event and event.get("log_namespace", "").startswith("mailguard.outbound"):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    return events, lambda: globalLogPublisher.removeObserver(observe)


@pytest.mark.parametrize("broken, smarthost", [(("MX",), ""), (("A", "AAAA"), ""),
                                               (("A", "AAAA"), "smarthost.test:2525")])
@pytest_twisted.inlineCallbacks
def test_a_bug_in_mx_handling_is_a_logged_temporary_failure(broken: tuple[str, ...], smarthost: str) -> Any:
    """A programming error (not a DNS failure) is a temporary failure (the message stays queued),
    logged as an error with its traceback, not passed off as a DNS failure."""
    from twisted.logger import formatEvent

    events, stop = _failures_logged()
    try:
        with pytest.raises(RouteError) as e:
            yield route(BuggyResolver(broken), "remote.test", smarthost)
    finally:
        stop()
    assert not e.value.permanent
    assert e.value.reply() == "451 4.3.0 Local error routing mail for remote.test (logged)"
    (event,) = events
    assert event["log_failure"].check(TypeError)
    assert "Traceback" in event["log_failure"].getTraceback()
    assert formatEvent(event) == "mailguard outbound: routing mail for remote.test failed with an unexpected error"
