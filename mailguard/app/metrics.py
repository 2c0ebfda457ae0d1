"""Prometheus metrics at ``/metrics`` on the ``[metrics] listen`` endpoints (text format).

Series (all prefixed ``mailguard_``):

``connections_total{service}``
    Connections accepted by a listener (``smtp``, ``submission``, ``submissions``,
    ``pop3``, ``pop3s``); ``pop3`` and ``pop3s`` count POP3 sessions.
``smtp_decisions_total{rule, result}``
    Every decision line of the mail log (:func:`mailguard.app.maillog.decision`):
    ``result`` is ``accepted`` (a 2xx reply) or ``refused``, ``rule`` the rule that decided.
``outbound_total{state}``
    Every ``mailguard outbound:`` line of the queue runner: ``delivered``, ``deferred``,
    ``failed`` (bounced), ``expired``, ``dropped``, and the notices it logs.
``auth_failures_total{service}``
    Failed or refused logins (:func:`mailguard.app.maillog.auth_failure`).
``queue_messages`` / ``queue_oldest_age_seconds``
    Messages in the outbound queue and the age of the oldest (0 when empty), read
    from the queue folder at each scrape.
``store_seconds``
    Histogram of the time from the final dot to the message being durable.

The counters are fed from the places that already log, so a decision is counted
exactly when it is logged.  Scrapes are answered from Twisted's thread pool (the
queue folder is listed there, not on the reactor thread).

With ``[server] workers`` above 1 every process counts into its own file under
``data_dir/metrics`` (prometheus_client's multi-process mode, :func:`share`), and
the first process, which alone serves ``/metrics``, adds them all up: the counters
are those of the whole server.  A worker that dies leaves its file, so what it
counted stays in the totals; the first process empties the folder when it starts.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence, cast

from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.twisted import MetricsResource
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocolFactory
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from mailguard.app import maillog
from mailguard.core.policy import Decision

REGISTRY = CollectorRegistry()
CONNECTIONS = Counter("mailguard_connections", "Connections accepted, per listener kind", ["service"],
                      registry=REGISTRY)
DECISIONS = Counter("mailguard_smtp_decisions", "SMTP decisions logged, by rule and result", ["rule", "result"],
                    registry=REGISTRY)
OUTBOUND = Counter("mailguard_outbound", "Queue runner outcomes per recipient", ["state"], registry=REGISTRY)
AUTH_FAILURES = Counter("mailguard_auth_failures", "Failed or refused logins", ["service"], registry=REGISTRY)


def _store_seconds() -> Histogram:
    return Histogram("mailguard_store_seconds", "Time from the final dot until the message is durable",
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0), registry=REGISTRY)


STORE_SECONDS = _store_seconds()


def _decision(rule: str, reply: object) -> None:
    DECISIONS.labels(rule, "accepted" if str(reply).startswith("2") else "refused").inc()


def _auth_failure(service: str) -> None:
    AUTH_FAILURES.labels(service).inc()


#: The runner's per-recipient line (mailguard.outbound.runner), as its format string begins.
_OUTBOUND_LINE = "mailguard outbound: id={queue_id} msg={msg} to="


def _outbound(event: LogEvent) -> None:
    if str(event.get("log_format", "")).startswith(_OUTBOUND_LINE) and "state" in event:
        OUTBOUND.labels(str(event["state"])).inc()


class QueueCollector:
    """Queue size and oldest age, from the names of the envelopes in the queue folder."""

    def __init__(self, queue_dir: Path) -> None:
        self.queue_dir = queue_dir

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ids = [p.name[:-4] for p in self.queue_dir.glob("*.env")] if self.queue_dir.is_dir() else []
        oldest = min((int(i[:13], 16) / 1e6 for i in ids if len(i) == 21), default=None)
        yield GaugeMetricFamily("mailguard_queue_messages", "Messages in the outbound queue", value=len(ids))
        age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        yield GaugeMetricFamily("mailguard_queue_oldest_age_seconds", "Age of the oldest queued message",
                                value=age)


@implementer(IProtocolFactory)
class Counted:
    """A listener's factory that counts the connections it accepts."""

    def __init__(self, inner: Any, service: str) -> None:
        self.inner = inner
        self.counter = CONNECTIONS.labels(service)

    def buildProtocol(self, addr: IAddress) -> protocol.Protocol | None:
        self.counter.inc()
        built: protocol.Protocol | None = self.inner.buildProtocol(addr)
        return built

    def doStart(self) -> None:
        self.inner.doStart()

    def doStop(self) -> None:
        self.inner.doStop()


class TimedStore:
    """The SMTP sessions' message store, timed into :data:`STORE_SECONDS`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def store(self, msg_id: str, sender: str, decisions: Sequence[Decision], received: bytes,
              message: bytes, held: str = "") -> Deferred[Any]:
        started = time.perf_counter()
        d: Deferred[Any] = self.inner.store(msg_id, sender, decisions, received, message, held=held)

        def timed(result: Any) -> Any:
            STORE_SECONDS.observe(time.perf_counter() - started)
            return result

        return d.addBoth(timed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


_queue_collector: QueueCollector | None = None
_shared: Path | None = None


def share(folder: Path, first: bool) -> None:
    """Count into a file of this process under ``folder``, for the first process to add up.

    Called before anything is counted (a labelled counter makes its value, and so its
    file, when a label is first used).  ``first``: this is the process that serves
    ``/metrics`` and starts the others; it empties the folder of a previous run.
    """
    global _shared, STORE_SECONDS
    if first:
        folder.mkdir(mode=0o700, exist_ok=True)
        for old in folder.glob("*.db"):
            old.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)       # inherited by the workers
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _shared = folder
    # A metric without labels made its value when it was defined, in memory: make it again.
    REGISTRY.unregister(STORE_SECONDS)
    STORE_SECONDS = _store_seconds()


def install(queue_dir: Path) -> None:
    """Feed the counters from the mail log and the outbound log lines (once per process)."""
    global _queue_collector
    if _queue_collector is not None:
        _queue_collector.queue_dir = queue_dir
        return
    _queue_collector = QueueCollector(queue_dir)
    REGISTRY.register(_queue_collector)
    maillog.DECISION_HOOKS.append(_decision)
    maillog.AUTH_FAILURE_HOOKS.append(_auth_failure)
    globalLogPublisher.addObserver(cast(ILogObserver, _outbound))


def site() -> Site:
    """The web site with ``/metrics``."""
    registry = REGISTRY
    if _shared is not None:                # every process's counts, added up
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(_shared))  # type: ignore[no-untyped-call]
        if _queue_collector is not None:
            registry.register(_queue_collector)
    root = Resource()  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", MetricsResource(registry=registry))  # type: ignore[no-untyped-call]
    web = Site(root)  # type: ignore[no-untyped-call]
    web.noisy = False
    web.log = lambda request: None       # type: ignore[method-assign]   # no access line per scrape
    return web
