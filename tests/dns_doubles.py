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
