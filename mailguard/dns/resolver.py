"""The shared asynchronous resolver with its TTL-respecting cache (see :mod:`mailguard.dns`).

:class:`Resolver` wraps a ``twisted.names`` client resolver (any object with its
``query(dns.Query, timeout)`` method, so tests may pass an in-memory authority) and
answers :meth:`Resolver.lookup` with an :class:`Answer`:

- ``RECORDS``: at least one record of the asked type (CNAME chains are followed by the
  recursive server; only records of the asked type are kept);
- ``NXDOMAIN``: the name does not exist (RCODE 3);
- ``NODATA``: the name exists but has no record of that type.

Anything else (no answer within ``[dns] timeout``, SERVFAIL, REFUSED, FORMERR, a
network error) raises :class:`TemporaryDNSError`.  Temporary errors are never cached.

Record values in :attr:`Answer.records`, by type: ``A``/``AAAA`` the address as text
(``"192.0.2.1"``, ``"2001:db8::1"``); ``MX`` an :class:`MX` (preference, exchange; the
null MX of RFC 7505 has exchange ``""``); ``TXT`` one ``bytes`` per record, its strings
concatenated (RFC 7208 section 3.3, RFC 6376 section 3.6.2.2); ``PTR``/``CNAME``/``NS``
the target name.  Names are lower case without the trailing dot.

Cache: positive answers live for the smallest TTL of their records, negative ones for
the SOA's ``min(TTL, MINIMUM)`` (RFC 2308 section 5) or not at all without an SOA; both
are capped (:data:`MAX_TTL`, :data:`MAX_NEGATIVE_TTL`) and the cache holds at most
``max_entries`` answers (the oldest go first).  Concurrent lookups of one (name, type)
share one query.

With no servers configured the system's ``/etc/resolv.conf`` is used (re-read when it
changes) and ``/etc/hosts`` (read once, at the first lookup) answers A/AAAA and the
PTR of its addresses first, as the C library would.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol, Sequence

from twisted.internet import defer
from twisted.names import dns, error
from twisted.python.failure import Failure

RECORDS = "records"
NXDOMAIN = "nxdomain"
NODATA = "nodata"

TYPES = ("A", "AAAA", "MX", "TXT", "PTR", "CNAME", "NS")
MAX_TTL = 86400
MAX_NEGATIVE_TTL = 3600
HOSTS_FILE = "/etc/hosts"
RESOLV_CONF = "/etc/resolv.conf"


class MX(NamedTuple):
    """One MX record: lower preference first; ``exchange`` "" for the null MX."""

    preference: int
    exchange: str


@dataclass(frozen=True)
class Answer:
    """What the DNS said about (name, type): ``status`` and, for ``RECORDS``, the values."""

    name: str
    type: str
    status: str
    records: tuple[Any, ...] = ()
    ttl: int = 0

    @property
    def exists(self) -> bool:
        """True when there is at least one record of the asked type."""
        return self.status == RECORDS

    @property
    def nxdomain(self) -> bool:
        """True when the name does not exist at all."""
        return self.status == NXDOMAIN


class TemporaryDNSError(Exception):
    """No usable answer now (timeout, SERVFAIL, REFUSED, network): answer 4xx or retry."""

    def __init__(self, name: str, type: str, reason: str) -> None:
        super().__init__(f"{type} {name}: {reason}")
        self.name = name
        self.type = type
        self.reason = reason


class Lookup(Protocol):
    """The interface every DNS user depends on (the resolver, or a test double)."""

    async def lookup(self, name: str, type: str) -> Answer: ...


def retransmits(total: float) -> tuple[float, ...]:
    """Per-try timeouts (1, 2, 4 … s) adding up to ``total``: the query is resent after each."""
    out: list[float] = []
    step, left = 1.0, float(total)
    while left > 1e-9:
        out.append(min(step, left))
        left -= out[-1]
        step *= 2
    return tuple(out) or (1.0,)


def _name(value: Any) -> str:
    return str(value).rstrip(".").lower()


def _value(rr: Any) -> Any:
    payload = rr.payload
    if rr.type == dns.A:
        return payload.dottedQuad()
    if rr.type == dns.AAAA:
        return str(ipaddress.IPv6Address(payload.address))
    if rr.type == dns.MX:
        return MX(int(payload.preference), _name(payload.name))
    if rr.type == dns.TXT:
        return b"".join(payload.data)
    return _name(payload.name)


def _negative_ttl(authority: Sequence[Any]) -> int:
    for rr in authority:
        if rr.type == dns.SOA:
            return min(int(rr.ttl), int(rr.payload.minimum), MAX_NEGATIVE_TTL)
    return 0


def _hosts(path: str) -> dict[str, tuple[list[str], list[str]]]:
    """``/etc/hosts`` as {name: ([IPv4], [IPv6])}; an unreadable file is empty."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            addr = ipaddress.ip_address(fields[0].split("%")[0])
        except ValueError:
            continue
        for host in fields[1:]:
            v4, v6 = out.setdefault(_name(host), ([], []))
            (v4 if addr.version == 4 else v6).append(str(addr))
    return out


class Resolver:
    """The cached resolver; see the module docstring.

    :param backend: a ``twisted.names`` resolver, or a callable returning one (built at
        the first lookup, so that making a :class:`Resolver` starts nothing).
    :param clock: the reactor's clock, for TTLs and the lookup deadline.
    :param timeout: seconds one lookup may take in all.
    :param hosts: a hosts file consulted first for A/AAAA ("" = none).
    """

    def __init__(self, backend: Any, clock: Any, timeout: float = 5.0, *,
                 hosts: str = "", max_entries: int = 10000) -> None:
        self._backend = backend
        self.clock = clock
        self.timeout = float(timeout)
        self._hosts_file = hosts
        self._hosts: dict[str, tuple[list[str], list[str]]] | None = None
        self._hosts_reverse: dict[str, str] = {}
        self.max_entries = max_entries
        self._cache: dict[tuple[str, str], tuple[float, Answer]] = {}
        self._pending: dict[tuple[str, str], list[defer.Deferred[Answer]]] = {}
        self.queries = 0
        self.hits = 0

    def _resolver(self) -> Any:
        if callable(self._backend) and not hasattr(self._backend, "query"):
            self._backend = self._backend()
        return self._backend

    async def lookup(self, name: str, type: str) -> Answer:
        """The answer for ``name`` / ``type`` (one of :data:`TYPES`).

        :raises TemporaryDNSError: no usable answer now.
        """
        if type not in TYPES:
            raise ValueError(f"unsupported record type {type!r}")
        name = _name(name)
        key = (name, type)
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > self.clock.seconds():
                self.hits += 1
                return hit[1]
            del self._cache[key]
        local = self._from_hosts(name, type)
        if local is not None:
            return local
        d: defer.Deferred[Answer] = defer.Deferred()
        waiters = self._pending.get(key)
        if waiters is None:
            self._pending[key] = [d]
            self._query(key)
        else:
            waiters.append(d)
        return await d

    def _from_hosts(self, name: str, type: str) -> Answer | None:
        if not self._hosts_file or type not in ("A", "AAAA", "PTR"):
            return None
        if self._hosts is None:
            self._hosts = _hosts(self._hosts_file)
            # Reverse names too, as the C library answers them: an address's first name.
            for host, (v4, v6) in self._hosts.items():
                for addr in v4 + v6:
                    self._hosts_reverse.setdefault(ipaddress.ip_address(addr).reverse_pointer, host)
        if type == "PTR":
            named = self._hosts_reverse.get(name)
            return Answer(name, type, RECORDS, (named,), 0) if named is not None else None
        found = self._hosts.get(name)
        if found is None:
            return None
        values = found[0] if type == "A" else found[1]
        return Answer(name, type, RECORDS if values else NODATA, tuple(values), 0)

    def _query(self, key: tuple[str, str]) -> None:
        name, type = key
        self.queries += 1
        try:
            query = dns.Query(name.encode("idna") if not name.isascii() else name.encode("ascii"),
                              dns.REV_TYPES[type], dns.IN)
        except (UnicodeError, ValueError):
            # A name that cannot be written on the wire cannot exist.
            self._finish(key, Answer(name, type, NXDOMAIN))
            return
        try:
            d = defer.maybeDeferred(self._resolver().query, query, retransmits(self.timeout))
        except Exception as e:                               # a broken resolv.conf, say
            self._finish(key, TemporaryDNSError(name, type, f"resolver unavailable: {e}"))
            return
        # A last-resort deadline: TCP fallback or a stuck socket must not hold a session.
        d.addTimeout(self.timeout + 1.0, self.clock)
        d.addCallbacks(lambda result: self._answered(key, result), lambda f: self._failed(key, f))
        d.addErrback(lambda f: self._finish(key, TemporaryDNSError(name, type, f.getErrorMessage())))

    def _answered(self, key: tuple[str, str], result: Any) -> None:
        name, type = key
        answers, authority, _additional = result
        wanted = dns.REV_TYPES[type]
        records = [rr for rr in answers if rr.type == wanted]
        if records:
            ttl = min([int(rr.ttl) for rr in answers if rr.type in (wanted, dns.CNAME)] + [MAX_TTL])
            answer = Answer(name, type, RECORDS, tuple(_value(rr) for rr in records), ttl)
        else:
            answer = Answer(name, type, NODATA, (), _negative_ttl(authority))
        self._finish(key, answer)

    def _failed(self, key: tuple[str, str], f: Failure) -> None:
        name, type = key
        e = f.value
        if isinstance(e, (error.DNSNameError, error.AuthoritativeDomainError)):
            message = e.args[0] if e.args else None
            authority = getattr(message, "authority", ())
            self._finish(key, Answer(name, type, NXDOMAIN, (), _negative_ttl(authority)))
            return
        if isinstance(e, error.DNSServerError):
            reason = "SERVFAIL"
        elif isinstance(e, error.DNSQueryRefusedError):
            reason = "REFUSED"
        elif isinstance(e, (defer.TimeoutError, error.DNSQueryTimeoutError, defer.CancelledError)):
            reason = "timeout"
        else:
            reason = f.getErrorMessage() or type_name(f)
        self._finish(key, TemporaryDNSError(name, type, reason))

    def _finish(self, key: tuple[str, str], result: Answer | TemporaryDNSError) -> None:
        if isinstance(result, Answer) and result.ttl > 0:
            if len(self._cache) >= self.max_entries:
                self._evict()
            self._cache[key] = (self.clock.seconds() + result.ttl, result)
        for d in self._pending.pop(key, []):
            if isinstance(result, Answer):
                d.callback(result)
            else:
                d.errback(result)

    def _evict(self) -> None:
        now = self.clock.seconds()
        for k in [k for k, (expires, _) in self._cache.items() if expires <= now]:
            del self._cache[k]
        while len(self._cache) >= self.max_entries:
            del self._cache[next(iter(self._cache))]


def type_name(f: Failure) -> str:
    return f.type.__name__ if f.type is not None else "error"


def from_config(servers: Sequence[tuple[str, int]], timeout: float, reactor: Any,
                *, make_client: Callable[..., Any] | None = None) -> Resolver:
    """The resolver for ``[dns]``: these servers, or /etc/resolv.conf and /etc/hosts when empty."""
    from mailguard.dns.quiet import QuietResolver

    build = make_client or QuietResolver
    if servers:
        return Resolver(lambda: build(servers=list(servers), reactor=reactor), reactor, timeout)
    return Resolver(lambda: build(resolv=RESOLV_CONF, reactor=reactor), reactor, timeout, hosts=HOSTS_FILE)
