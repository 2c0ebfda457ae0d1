"""Tests for mailguard.dns.resolver: answers, negative answers, temporary errors and the TTL cache."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.names import dns, error

from mailguard.dns.names import dnsbl_name, reverse_name
from mailguard.dns.resolver import MX, NODATA, NXDOMAIN, RECORDS, Resolver, TemporaryDNSError, retransmits

SOA = dns.RRHeader(b"example.test", dns.SOA, ttl=600,
                   payload=dns.Record_SOA(mname=b"ns.example.test", rname=b"root.example.test", minimum=30))


def rr(name: str, kind: int, payload: Any, ttl: int = 300) -> dns.RRHeader:
    return dns.RRHeader(name.encode(), kind, ttl=ttl, payload=payload)


class Backend:
    """A twisted.names-shaped resolver answering from a table; counts the queries it gets."""

    def __init__(self, table: dict[tuple[str, int], Any]) -> None:
        self.table = table
        self.asked: list[tuple[str, int]] = []
        self.held: list[defer.Deferred[Any]] = []

    def query(self, query: dns.Query, timeout: Any) -> defer.Deferred[Any]:
        key = (query.name.name.decode(), query.type)
        self.asked.append(key)
        found = self.table.get(key, ([], [SOA], []))
        if found == "hold":
            d: defer.Deferred[Any] = defer.Deferred()
            self.held.append(d)
            return d
        if isinstance(found, Exception):
            return defer.fail(found)
        return defer.succeed(found)


TABLE: dict[tuple[str, int], Any] = {
    ("mail.example.test", dns.A): ([rr("mail.example.test", dns.A, dns.Record_A("192.0.2.1"), 120),
                                    rr("mail.example.test", dns.A, dns.Record_A("192.0.2.2"), 60)], [], []),
    ("mail.example.test", dns.AAAA): ([rr("mail.example.test", dns.AAAA, dns.Record_AAAA("2001:db8::1"))], [], []),
    ("example.test", dns.MX): ([rr("example.test", dns.MX, dns.Record_MX(10, b"Mail.Example.Test."))], [], []),
    ("nullmx.test", dns.MX): ([rr("nullmx.test", dns.MX, dns.Record_MX(0, b""))], [], []),
    ("example.test", dns.TXT): ([rr("example.test", dns.TXT, dns.Record_TXT(b"v=spf1 ", b"-all"))], [], []),
    ("1.2.0.192.in-addr.arpa", dns.PTR): ([rr("x", dns.PTR, dns.Record_PTR(b"mail.example.test"))], [], []),
    ("gone.test", dns.A): error.DNSNameError(dns.Message(rCode=dns.ENAME)),
    ("broken.test", dns.MX): error.DNSServerError(dns.Message(rCode=dns.ESERVER)),
    ("refused.test", dns.MX): error.DNSQueryRefusedError(dns.Message(rCode=dns.EREFUSED)),
    ("slow.test", dns.A): "hold",
}


def lookup(res: Resolver, name: str, kind: str) -> Any:
    """Run a lookup that completes synchronously and return its answer (or raise its error)."""
    d = defer.ensureDeferred(res.lookup(name, kind))
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "lookup did not complete"
    if isinstance(results[0], Exception) or hasattr(results[0], "raiseException"):
        results[0].raiseException()
    return results[0]


@pytest.fixture
def clock() -> task.Clock:
    return task.Clock()


def test_records_by_type(clock: task.Clock) -> None:
    """A, AAAA, MX, TXT and PTR answers come back as plain values, names lower case without the dot."""
    res = Resolver(Backend(TABLE), clock)
    assert lookup(res, "mail.example.test", "A").records == ("192.0.2.1", "192.0.2.2")
    assert lookup(res, "MAIL.example.test.", "AAAA").records == ("2001:db8::1",)
    assert lookup(res, "example.test", "MX").records == (MX(10, "mail.example.test"),)
    assert lookup(res, "nullmx.test", "MX").records == (MX(0, ""),)
    assert lookup(res, "example.test", "TXT").records == (b"v=spf1 -all",)
    answer = lookup(res, reverse_name("192.0.2.1"), "PTR")
    assert answer.status == RECORDS and answer.records == ("mail.example.test",)


def test_nxdomain_and_nodata(clock: task.Clock) -> None:
    """A missing name is NXDOMAIN; an existing name without the type is NODATA (cached by SOA minimum)."""
    backend = Backend(TABLE)
    res = Resolver(backend, clock)
    gone = lookup(res, "gone.test", "A")
    assert gone.status == NXDOMAIN and gone.nxdomain and not gone.exists
    nodata = lookup(res, "example.test", "A")
    assert nodata.status == NODATA and nodata.ttl == 30
    lookup(res, "example.test", "A")
    assert backend.asked.count(("example.test", dns.A)) == 1
    clock.advance(31)
    lookup(res, "example.test", "A")
    assert backend.asked.count(("example.test", dns.A)) == 2


@pytest.mark.parametrize("name,reason", [("broken.test", "SERVFAIL"), ("refused.test", "REFUSED")])
def test_server_failure_is_temporary_and_not_cached(clock: task.Clock, name: str, reason: str) -> None:
    """SERVFAIL and REFUSED raise TemporaryDNSError, and the next lookup asks again."""
    backend = Backend(TABLE)
    res = Resolver(backend, clock)
    for _ in range(2):
        with pytest.raises(TemporaryDNSError) as e:
            lookup(res, name, "MX")
        assert e.value.reason == reason
    assert backend.asked.count((name, dns.MX)) == 2


def test_timeout_is_temporary(clock: task.Clock) -> None:
    """A server that never answers: TemporaryDNSError once the lookup's deadline passes."""
    res = Resolver(Backend(TABLE), clock, timeout=2)
    d = defer.ensureDeferred(res.lookup("slow.test", "A"))
    failures: list[Any] = []
    d.addErrback(failures.append)
    clock.advance(2.9)
    assert not failures
    clock.advance(0.2)
    assert failures and failures[0].check(TemporaryDNSError)
    assert failures[0].value.reason == "timeout"


def test_positive_answers_live_for_their_smallest_ttl(clock: task.Clock) -> None:
    """An answer is reused for its smallest TTL (60 s here), then asked for again."""
    backend = Backend(TABLE)
    res = Resolver(backend, clock)
    assert lookup(res, "mail.example.test", "A").ttl == 60
    clock.advance(59)
    lookup(res, "mail.example.test", "A")
    assert backend.asked.count(("mail.example.test", dns.A)) == 1 and res.hits == 1
    clock.advance(2)
    lookup(res, "mail.example.test", "A")
    assert backend.asked.count(("mail.example.test", dns.A)) == 2


def test_concurrent_lookups_share_one_query(clock: task.Clock) -> None:
    """Two lookups of the same name while the first is in flight make one query."""
    backend = Backend({("slow.test", dns.A): "hold"})
    res = Resolver(backend, clock)
    got: list[Any] = []
    for _ in range(2):
        defer.ensureDeferred(res.lookup("slow.test", "A")).addCallback(got.append)
    assert len(backend.asked) == 1
    backend.held[0].callback(([rr("slow.test", dns.A, dns.Record_A("192.0.2.9"))], [], []))
    assert [a.records for a in got] == [("192.0.2.9",), ("192.0.2.9",)]


def test_cache_is_bounded(clock: task.Clock) -> None:
    """The cache never holds more than max_entries answers."""
    res = Resolver(Backend({}), clock, max_entries=3)
    for i in range(10):
        lookup(res, f"n{i}.example.test", "A")
    assert len(res._cache) <= 3


def test_hosts_file_answers_addresses_first(clock: task.Clock, tmp_path: Any) -> None:
    """With the system resolver, /etc/hosts answers A/AAAA before DNS is asked."""
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost ip6-localhost # comment\n")
    backend = Backend({})
    res = Resolver(backend, clock, hosts=str(hosts))
    assert lookup(res, "localhost", "A").records == ("127.0.0.1",)
    assert lookup(res, "LocalHost", "AAAA").records == ("::1",)
    # The reverse names of its addresses too, as the C library answers them (a loopback
    # client's verified name does not wait for a DNS server).
    assert lookup(res, "1.0.0.127.in-addr.arpa", "PTR").records == ("localhost",)
    assert lookup(res, "1" + ".0" * 31 + ".ip6.arpa", "PTR").records == ("localhost",)
    assert backend.asked == []


def test_retransmits_add_up_to_the_timeout() -> None:
    """Per-try timeouts grow 1, 2, 4 … and add up to the configured total."""
    assert retransmits(5) == (1.0, 2.0, 2.0)
    assert retransmits(0.2) == (0.2,)
    assert sum(retransmits(17)) == 17


def test_reverse_and_dnsbl_names() -> None:
    """PTR and DNSBL names for IPv4, IPv4-mapped IPv6 and IPv6 (RFC 5782 sections 2.1 and 2.4)."""
    assert reverse_name("192.0.2.1") == "1.2.0.192.in-addr.arpa"
    assert reverse_name("::ffff:192.0.2.1") == "1.2.0.192.in-addr.arpa"
    assert dnsbl_name("192.0.2.99", "bl.example.") == "99.2.0.192.bl.example"
    assert dnsbl_name("2001:db8::1", "bl.example") == "1.0.0.0" + ".0" * 20 + ".8.b.d.0.1.0.0.2.bl.example"


@pytest_twisted.inlineCallbacks
def test_lookups_over_udp_log_nothing() -> Any:
    """The real resolver's per-query UDP ports open and close without log lines (a line per lookup
    would be most of a busy server's log)."""
    from dns_doubles import MemoryAuthority
    from twisted.internet import reactor
    from twisted.logger import capturedLogs
    from twisted.names import server

    from mailguard.dns.resolver import from_config

    factory = server.DNSServerFactory(authorities=[MemoryAuthority({b"a.test": [dns.Record_A("192.0.2.5")]})])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    try:
        res = from_config([("127.0.0.1", port.getHost().port)], 2, reactor)
        with capturedLogs() as events:
            answer = yield defer.ensureDeferred(res.lookup("a.test", "A"))
            gone = yield defer.ensureDeferred(res.lookup("b.a.test", "A"))
        assert answer.records == ("192.0.2.5",) and gone.nxdomain
        assert [e for e in events if "UDP" in str(e.get("log_format", "")) or "starting on" in str(e)] == []
    finally:
        yield port.stopListening()
