"""A fake :class:`~mailguard.senderauth.lookup.Lookup`: DNS answers from a dict, no network.

``records`` maps a lower-case name to a list of ``(type, value)`` pairs; ``("TIMEOUT", None)``
makes every question about that name a temporary error, ``("CNAME", target)`` is followed.
A name that is absent does not exist (NXDOMAIN).  Every question is recorded in ``asked``.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Coroutine, TypeVar

from twisted.internet import defer

from mailguard.dns.names import reverse_name
from mailguard.dns.resolver import MX, NODATA, NXDOMAIN, RECORDS, Answer
from mailguard.dns.resolver import TemporaryDNSError as ResolverTemporaryError
from mailguard.senderauth.lookup import DomainNotFound, TemporaryDNSError

T = TypeVar("T")


class FakeLookup:
    """DNS from a dict; see the module documentation."""

    def __init__(self, records: dict[str, list[tuple[str, Any]]]) -> None:
        self.records = {name.lower().rstrip("."): list(rrs) for name, rrs in records.items()}
        self.asked: list[tuple[str, str]] = []

    def _answer(self, name: str, rtype: str, depth: int = 0) -> list[Any]:
        key = name.lower().rstrip(".")
        self.asked.append((rtype, key))
        if key.startswith("error.") and key not in self.records:
            raise TemporaryDNSError(key)
        if key not in self.records:
            raise DomainNotFound(key)
        found: list[Any] = []
        seen = False
        for kind, value in self.records[key]:
            if kind == "TIMEOUT" and not seen:
                raise TemporaryDNSError(key)
            if kind == rtype:
                seen = True
                if value == "TIMEOUT":
                    raise TemporaryDNSError(key)
                found.append(value)
            elif kind == "CNAME" and depth < 8:
                seen = True
                try:
                    found.extend(self._answer(value, rtype, depth + 1))
                except DomainNotFound:
                    pass
        return found

    async def txt(self, name: str) -> list[bytes]:
        return [v if isinstance(v, bytes) else "".join([v] if isinstance(v, str) else v).encode()
                for v in self._answer(name, "TXT")]

    async def a(self, name: str) -> list[str]:
        return [str(v) for v in self._answer(name, "A")]

    async def aaaa(self, name: str) -> list[str]:
        return [str(ipaddress.IPv6Address(v)) for v in self._answer(name, "AAAA")]

    async def mx(self, name: str) -> list[tuple[int, str]]:
        return [(int(p), str(h).rstrip(".")) for p, h in self._answer(name, "MX")]

    async def ptr(self, address: str) -> list[str]:
        return [str(v).rstrip(".") for v in self._answer(reverse_name(address), "PTR")]


def run(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that finishes without waiting (a fake lookup never waits)."""
    d = defer.ensureDeferred(coro)
    results: list[T] = []
    failures: list[Any] = []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "the coroutine is still waiting"
    return results[0]


class FakeResolver:
    """The shared resolver's interface (``lookup(name, type)`` -> ``Answer``) over a FakeLookup zone."""

    def __init__(self, records: dict[str, list[tuple[str, Any]]]) -> None:
        self.zone = FakeLookup(records)

    async def lookup(self, name: str, type: str) -> Answer:
        try:
            found = self.zone._answer(name, type)
        except DomainNotFound:
            return Answer(name, type, NXDOMAIN)
        except TemporaryDNSError as e:
            raise ResolverTemporaryError(name, type, "timeout") from e
        if type == "TXT":
            found = [v if isinstance(v, bytes) else "".join([v] if isinstance(v, str) else v).encode()
                     for v in found]
        elif type == "MX":
            found = [MX(int(p), str(h).rstrip(".")) for p, h in found]
        return Answer(name, type, RECORDS if found else NODATA, tuple(found), 60)
