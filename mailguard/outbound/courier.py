"""One delivery attempt to one domain: route, connect, speak SMTP; every failure classified.

:class:`SMTPCourier` is what the queue runner calls for each (entry, domain) group:
it finds the relays (the smarthost, or the domain's MX hosts, :mod:`mailguard.outbound.mx`),
applies the domain's MTA-STS policy (:mod:`mailguard.outbound.mtasts`), and runs one
transaction (:func:`mailguard.outbound.client.transact`) with the first host that
answers.  It never raises: every recipient comes back with an :class:`Outcome`,
delivered, deferred (temporary) or failed (permanent).
"""

from __future__ import annotations

import dataclasses

from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorTCP, IReactorTime, IStreamClientEndpoint
from twisted.logger import Logger

from mailguard.app import maillog
from mailguard.config import Config, host_port
from mailguard.dns.resolver import Lookup
from mailguard.outbound import mtasts, mx
from mailguard.outbound.client import ClientConnection, Outcome, SessionError, SessionOptions, transact
from mailguard.storage.queue import DEFERRED, FAILED

log = Logger(namespace="mailguard.outbound.runner")

MAX_HOSTS = 5  # MX hosts (addresses) tried in one attempt, like Postfix's smtp_mx_address_limit


class SMTPCourier:
    """Delivers one message to the recipients of one domain; never raises.

    ``cfg.outbound`` decides the route (smarthost or MX on ``port``), TLS, AUTH and
    the connect / command timeouts; ``cfg.server.hostname`` is the EHLO name.
    """

    def __init__(self, config: Config, reactor: IReactorTCP, resolver: Lookup) -> None:
        self.out = config.outbound
        self.reactor = reactor
        self.clock = IReactorTime(reactor)
        self.resolver = resolver
        smarthost = bool(self.out.smarthost)
        self.options = SessionOptions(
            hostname=config.server.hostname,
            tls=self.out.smarthost_tls if smarthost else "opportunistic",
            user=self.out.smarthost_user if smarthost else "",
            password=self.out.smarthost_password if smarthost else "",
            command_timeout=float(self.out.command_timeout),
            verify_name=host_port(self.out.smarthost, 25)[0] if smarthost and self.out.smarthost_tls_verify else "",
            ca_file=self.out.tls_ca_file,
        )
        self.mta_sts: mtasts.PolicyCache | None = None
        if not smarthost and self.out.mta_sts:
            fetch = mtasts.https_fetcher(reactor, resolver, self.out.tls_ca_file, float(self.out.connect_timeout))
            self.mta_sts = mtasts.PolicyCache(resolver, fetch, self.clock)

    def _connect(self, relay: mx.Relay, options: SessionOptions) -> defer.Deferred[ClientConnection]:
        kind = endpoints.TCP6ClientEndpoint if ":" in relay.address else endpoints.TCP4ClientEndpoint
        endpoint: IStreamClientEndpoint = kind(self.reactor, relay.address, relay.port,
                                               timeout=self.out.connect_timeout)
        if options.tls == "tls":
            endpoint = endpoints.wrapClientTLS(options.tls_creator(), endpoint)
        conn = ClientConnection(self.clock, options.command_timeout)
        connected: defer.Deferred[ClientConnection] = endpoints.connectProtocol(maillog.Quiet(endpoint), conn)
        return connected

    async def __call__(self, sender: str, domain: str, recipients: list[str],
                       message: bytes) -> dict[str, Outcome]:
        try:
            relays = await mx.route(self.resolver, domain, self.out.port, self.out.smarthost)
        except mx.RouteError as e:
            return {r: Outcome(FAILED if e.permanent else DEFERRED, e.reply()) for r in recipients}
        policy = await self.mta_sts.policy(domain) if self.mta_sts is not None else None
        last = SessionError("451 4.4.0 no host tried")
        if policy is not None and policy.mode == "enforce":
            allowed = [r for r in relays if policy.allows(r.host)]
            if len(allowed) < len(relays):
                log.warn("mailguard mta-sts: {domain}: MX {hosts} not in the enforced policy, not tried",
                         domain=domain, hosts=",".join(sorted({r.host for r in relays if r not in allowed})))
            relays = allowed
            last = SessionError(f"451 4.7.5 MTA-STS policy of {domain} (enforce) allows none of its MX hosts")
        relay_name = ""
        for relay in relays[:MAX_HOSTS]:
            relay_name = str(relay)
            options = self.options
            if policy is not None and policy.mode == "enforce":
                options = dataclasses.replace(options, tls="starttls", verify_name=relay.host)  # RFC 8461 4.2
            elif policy is not None and policy.mode == "testing" and not policy.allows(relay.host):
                log.warn("mailguard mta-sts: {domain}: testing policy would refuse MX {host}",
                         domain=domain, host=relay.host)
            try:
                conn = await self._connect(relay, options)
            except Exception as e:
                last = SessionError(f"451 4.4.1 connect to {relay} failed: {type(e).__name__}")
                log.info("mailguard outbound: connect to {relay} failed: {error}", relay=relay_name, error=repr(e))
                continue
            try:
                outcomes = await transact(conn, options, sender, recipients, message, relay_name)
                tls = "none" if not conn.tls else "verified" if options.verify_name else "unverified"
                log.info("mailguard outbound: {relay} tls={tls} mta_sts={mode}", relay=relay_name, tls=tls,
                         mode=policy.mode if policy is not None else "none")
                return outcomes
            except SessionError as e:
                last = e
                log.info("mailguard outbound: {relay}: {reply}", relay=relay_name, reply=e.reply)
                if not e.next_host:
                    break
        state = FAILED if last.permanent else DEFERRED
        return {r: Outcome(state, last.reply, relay_name) for r in recipients}
