"""An in-memory DNS zone for loopback tests (twisted.names, no files, no network)."""

from __future__ import annotations

from typing import Any

from twisted.names import authority, common, dns

SOA = dns.Record_SOA(mname=b"ns.test", rname=b"root.test", serial=1, refresh=60, retry=60,
                     expire=60, minimum=1, ttl=1)


class MemoryAuthority(authority.FileAuthority):
    """An in-memory zone for ``test.``."""

    def __init__(self, records: dict[bytes, list[Any]]) -> None:
        common.ResolverBase.__init__(self)
        self.soa = (b"test", SOA)
        self.records = {b"test": [SOA], **records}
        self._cache: dict[Any, Any] = {}


class FakeDNS:
    """A :class:`mailguard.dns.resolver.Lookup` answering from a table, for unit tests.

    ``table`` maps (name, type) to a tuple of record values, ``"NXDOMAIN"``,
    ``"SERVFAIL"`` or ``"hold"`` (a Deferred the test fires; see :attr:`held`).  A
    missing entry is NXDOMAIN for names ending ``.invalid`` and NODATA otherwise.
    """

    def __init__(self, table: dict[tuple[str, str], Any]) -> None:
        self.table = table
        self.asked: list[tuple[str, str]] = []
        self.held: dict[tuple[str, str], Any] = {}

    async def lookup(self, name: str, type: str) -> Any:
        from twisted.internet import defer

        from mailguard.dns.resolver import NODATA, NXDOMAIN, RECORDS, Answer, TemporaryDNSError

        name = name.lower().rstrip(".")
        self.asked.append((name, type))
        found = self.table.get((name, type))
        if found == "hold":
            d: defer.Deferred[Any] = defer.Deferred()
            self.held[(name, type)] = d
            found = await d
        if found == "SERVFAIL":
            raise TemporaryDNSError(name, type, "SERVFAIL")
        if found == "NXDOMAIN" or (found is None and name.endswith(".invalid")):
            return Answer(name, type, NXDOMAIN)
        if not found:
            return Answer(name, type, NODATA)
        return Answer(name, type, RECORDS, tuple(found), 300)
