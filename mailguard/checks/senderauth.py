"""SPF, DKIM and DMARC as inbound checks: ``[checks] spf``, ``dkim_verify``, ``dmarc``.

The evaluators are :mod:`mailguard.senderauth`; this module fits them into the checks'
stages.  :class:`SPF` is a MAIL-stage check: it evaluates SPF for MAIL FROM (the HELO
identity for ``<>``) once per connection, sender and HELO, and refuses only with
``spf = "reject"`` (``spf_fail``; DNS trouble ``451 4.4.3`` as ``spf_temperror``).
:class:`AfterData` runs at the final dot for untrusted clients: DKIM, DMARC, the
Authentication-Results header, and ``dmarc_reject`` with ``dmarc = "reject"``.  The rules
of which result refuses are in :mod:`mailguard.senderauth.inbound`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet import defer

from mailguard.checks.base import MAIL, Connection, Facts
from mailguard.core.checks import Refusal
from mailguard.core.replies import Reply
from mailguard.dns.resolver import Lookup as DNSLookup
from mailguard.senderauth import dkimverify, dmarc, inbound
from mailguard.senderauth.lookup import ResolverLookup
from mailguard.senderauth.spf import SPFResult

SPFOutcome = tuple[SPFResult | None, Refusal | None]


def _spf(conn: Connection, lookup: ResolverLookup, modes: inbound.Modes, sender: str, reply: Reply,
         hostname: str) -> "defer.Deferred[SPFOutcome]":
    """SPF for ``sender`` on this connection, evaluated at most once per (HELO, sender)."""
    helo = conn.helo or ""
    return conn.once(f"spf:{helo}:{sender.lower()}", lambda: inbound.spf_at_mail(
        modes, lookup, conn.client_ip, sender, helo, reply, hostname))


class SPF:
    """See the module docstring."""

    rule = "spf_fail"
    stage = MAIL
    for_trusted = False

    def __init__(self, lookup: DNSLookup, modes: inbound.Modes, reply: Reply, hostname: str) -> None:
        self.lookup = ResolverLookup(lookup)
        self.modes = modes
        self.reply = reply
        self.hostname = hostname

    def connected(self, conn: Connection) -> None:
        pass

    async def check(self, facts: Facts) -> Refusal | None:
        _, refusal = await _spf(facts.conn, self.lookup, self.modes, facts.sender, self.reply, self.hostname)
        return refusal


@dataclass(frozen=True)
class Outcome:
    """At the final dot: the header to add (b"" when none), the message to store, any refusal."""

    header: bytes
    message: bytes
    refusal: Refusal | None


class AfterData:
    """DKIM, DMARC and Authentication-Results at the final dot (untrusted clients only).

    With a ``reactor``, DKIM's hashing and RSA run in worker processes
    (:class:`~mailguard.senderauth.dkimverify.WorkerProcesses`); without, in threads.
    """

    def __init__(self, lookup: DNSLookup, modes: inbound.Modes, spf_fail: Reply, dmarc_reject: Reply,
                 hostname: str, reactor: Any = None, **options: Any) -> None:
        self.lookup = ResolverLookup(lookup)
        self.modes = modes
        self.spf_fail = spf_fail
        self.dmarc_reject = dmarc_reject
        self.hostname = hostname
        self.workers: dkimverify.WorkerProcesses | None = None
        if reactor is not None and modes.runs_dkim and "to_thread" not in options:
            self.workers = dkimverify.WorkerProcesses(reactor)
            options["to_thread"] = self.workers
        self.options = options
        if modes.dmarc != "off":
            dmarc.org_domain("example.com")      # load the public suffix list now, not on a message

    async def check(self, facts: Facts, message: bytes) -> Outcome:
        if facts.trusted or not self.modes.on:
            return Outcome(b"", message, None)
        spf_result: SPFResult | None = None
        if self.modes.runs_spf:
            spf_result, _ = await _spf(facts.conn, self.lookup, self.modes, facts.sender, self.spf_fail,
                                       self.hostname)
        verdict = await inbound.after_data(self.modes, self.lookup, self.hostname, spf_result, message,
                                           self.dmarc_reject, **self.options)
        return Outcome(verdict.header, verdict.message, verdict.refusal)

    def close(self) -> None:
        """Stop the worker processes, if any were started."""
        if self.workers is not None:
            self.workers.close()
