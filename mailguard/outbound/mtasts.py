"""MTA-STS for MX delivery (RFC 8461): discover, fetch and cache a domain's policy.

:class:`PolicyCache` answers "which policy applies to mail for this domain now":
the ``_mta-sts`` TXT record is asked through the shared resolver at every delivery
attempt (it is cached by its TTL there); when it names an ``id`` that is not the
cached policy's, the policy file is fetched over HTTPS (verified against the system
trust store plus ``[outbound] tls_ca_file``, no redirects, at most 64 KiB, within
the connect timeout) and cached for its ``max_age`` (section 5.1).  A lookup or
fetch that fails leaves the cached policy in force until it expires; without one,
mail goes as if the domain had none (section 5.2).

The courier then applies the policy (:mod:`mailguard.outbound.runner`): ``enforce``
means only MX hosts matching the policy, over STARTTLS with a certificate verified
for the MX host name, or the mail waits; ``testing`` means delivery as usual, with
what enforcement would have said in the log.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable

from twisted.internet import defer, endpoints, protocol
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from mailguard.app import maillog
from mailguard.core.mtasts import MAX_POLICY_SIZE, Policy, PolicyError, parse_policy, record_id
from mailguard.dns.resolver import Lookup, TemporaryDNSError
from mailguard.outbound.client import tls_options

log = Logger(namespace="mailguard.outbound.mtasts")

Fetch = Callable[[str], Awaitable[bytes]]


class FetchError(Exception):
    """The policy file could not be fetched (connection, TLS, status, size, time)."""


class _Body(protocol.Protocol):
    """Collects a response body up to :data:`MAX_POLICY_SIZE` octets."""

    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > MAX_POLICY_SIZE:
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            if not self.done.called:
                self.done.errback(FetchError(f"policy larger than {MAX_POLICY_SIZE} octets"))
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(FetchError(f"policy body cut short: {reason.getErrorMessage()}"))


@implementer(IAgentEndpointFactory)
class _Pinned:
    """Connects the web client to one address resolved beforehand, TLS verified for the URL's host."""

    def __init__(self, reactor: Any, address: str, host: str, ca_file: Path | None, timeout: float) -> None:
        self.reactor, self.address, self.host, self.ca_file, self.timeout = reactor, address, host, ca_file, timeout

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:  # noqa: N802 - Twisted's name
        kind = endpoints.TCP6ClientEndpoint if ":" in self.address else endpoints.TCP4ClientEndpoint
        tcp = kind(self.reactor, self.address, uri.port, timeout=self.timeout)
        return maillog.Quiet(endpoints.wrapClientTLS(tls_options(self.host, self.ca_file), tcp))


def https_fetcher(reactor: Any, resolver: Lookup, ca_file: Path | None, timeout: float) -> Fetch:
    """A :data:`Fetch` over Twisted's web client: the host found through ``resolver`` (the
    one every other lookup uses), its certificate verified, no redirects followed."""

    async def fetch(url: str) -> bytes:
        host = url.split("/")[2]
        try:
            addresses = [a for t in ("A", "AAAA") for a in (await resolver.lookup(host, t)).records]
        except TemporaryDNSError as e:
            raise FetchError(str(e)) from None
        if not addresses:
            raise FetchError(f"no address for {host}")
        agent = Agent.usingEndpointFactory(reactor, _Pinned(reactor, addresses[0], host, ca_file, timeout))  # type: ignore[no-untyped-call]
        request = agent.request(b"GET", url.encode("ascii"), Headers({b"User-Agent": [b"mailguard"]}))
        timer = reactor.callLater(timeout, request.cancel)
        try:
            response = await request
            if response.code != 200:
                raise FetchError(f"HTTP status {response.code}")
            done: defer.Deferred[bytes] = defer.Deferred()
            response.deliverBody(_Body(done))
            return await done
        except defer.CancelledError:
            raise FetchError(f"no answer within {timeout:g} s") from None
        except FetchError:
            raise
        except Exception as e:
            raise FetchError(f"{type(e).__name__}: {e}") from None
        finally:
            if timer.active():
                timer.cancel()

    return fetch


class PolicyCache:
    """Each domain's current MTA-STS policy; see the module docstring."""

    def __init__(self, resolver: Lookup, fetch: Fetch, clock: IReactorTime) -> None:
        self.resolver = resolver
        self.fetch = fetch
        self.clock = clock
        self._policies: dict[str, tuple[Policy, float]] = {}

    def _cached(self, domain: str) -> Policy | None:
        entry = self._policies.get(domain)
        if entry is None:
            return None
        if entry[1] <= self.clock.seconds():
            del self._policies[domain]
            return None
        return entry[0]

    async def policy(self, domain: str) -> Policy | None:
        """The policy in force for mail to ``domain``, or None."""
        domain = domain.lower().rstrip(".")
        cached = self._cached(domain)
        try:
            answer = await self.resolver.lookup(f"_mta-sts.{domain}", "TXT")
        except TemporaryDNSError as e:
            log.info("mailguard mta-sts: {domain}: policy record lookup failed ({error}); "
                     "cached policy: {cached}", domain=domain, error=str(e), cached=cached.mode if cached else "none")
            return cached
        ident = record_id(list(answer.records)) if answer.exists else None
        if ident is None or (cached is not None and cached.id == ident):
            return cached
        url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
        try:
            policy = parse_policy((await self.fetch(url)).decode("utf-8"), ident)
        except (FetchError, PolicyError, UnicodeError) as e:
            log.warn("mailguard mta-sts: {domain}: cannot use {url}: {error}", domain=domain, url=url, error=str(e))
            return cached
        self._policies[domain] = (policy, self.clock.seconds() + policy.max_age)
        log.info("mailguard mta-sts: {domain}: policy id={id} mode={mode} mx={mx} max_age={age}",
                 domain=domain, id=ident, mode=policy.mode, mx=",".join(policy.mx), age=policy.max_age)
        return policy
