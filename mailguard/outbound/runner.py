"""The queue runner: takes queued mail to the next hop, retries, and bounces.

:class:`QueueRunner` is a ``twisted.application`` service.  On start, and whenever
:meth:`QueueRunner.wake` is called (after every enqueue), it scans the queue:

- recipients that are ``pending``, or ``deferred`` with their time come, are grouped
  by destination domain; each group of one entry goes over one SMTP connection
  (:class:`mailguard.outbound.courier.SMTPCourier`: MX lookup or the smarthost, then
  :func:`mailguard.outbound.client.transact`);
- after every attempt the entry's envelope is rewritten (in a thread) with each
  recipient's new state: a crash repeats at most that one attempt, never loses a
  recipient;
- a 5xx fails the recipient at once; a 4xx, a refused connection or a timeout defers
  it by :func:`next_attempt` of ``[outbound] retry_schedule``; once ``max_queue_time``
  has passed since the message was queued, a waiting recipient fails;
- failed recipients get one RFC 3464 bounce per entry (:mod:`mailguard.core.dsn`),
  handed to ``inject("", [sender], dsn)``; a message from ``<>`` is never bounced;
- an entry with nothing left to do is deleted.

A flush request from another process (``mailguard queue flush``:
:meth:`mailguard.storage.queue.Queue.request_flush`) is noticed within :attr:`FLUSH_POLL`
seconds.  Every decision is logged as one line::

    mailguard outbound: id=<queue id> to=<rcpt> state=<delivered|deferred|failed|bounced|dropped> relay=<host> reply=<reply>
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Coroutine, Sequence

from twisted.application.service import Service
from twisted.internet import defer, task, threads
from twisted.internet.interfaces import (IDelayedCall, IReactorTCP, IReactorTime)
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailguard.config import Config
from mailguard.dns.resolver import Lookup

from mailguard.outbound import mx
from mailguard.core.dsn import FailedRecipient, build_dsn
from mailguard.storage.queue import DELIVERED, DEFERRED, FAILED, Damaged, Queue, QueueEntry, QueueError, RecipientState
from mailguard.outbound.client import Outcome
from mailguard.outbound.courier import SMTPCourier

log = Logger(namespace="mailguard.outbound.runner")

LOCAL = "\0local"  # the delivery group of a queue entry's local mailboxes (a held message)


def next_attempt(schedule: Sequence[int], attempt_number: int) -> int:
    """Seconds to wait after failed attempt number ``attempt_number`` (1 = the first).

    The schedule's last entry repeats: ``next_attempt([300, 900], 5) == 900``.
    """
    if not schedule:
        raise ValueError("empty retry schedule")
    return int(schedule[min(max(attempt_number, 1), len(schedule)) - 1])


def domain_of(address: str) -> str:
    """The (lower-cased) domain part of ``local@domain``."""
    return address.rpartition("@")[2].lower()


Courier = Callable[[str, str, list[str], bytes], Coroutine[Any, Any, dict[str, Outcome]]]


class QueueRunner(Service):
    """Delivers the queue in ``queue``; see the module docstring.

    :param config: uses ``config.server.hostname`` and ``config.outbound``.
    :param reactor: ``IReactorTime`` (+ ``IReactorTCP`` for the default courier).
    :param inject: ``inject(sender, recipients, message, msg_id) -> Deferred``; takes bounces
        (``msg_id``: the bounced message's, so that the bounce's own log lines carry it).
    :param resolver: the shared :class:`mailguard.dns.Resolver`; default: one of its own from ``[dns]``.
    :param courier: replaces SMTP delivery (tests): ``await courier(sender, domain,
        recipients, message) -> {recipient: Outcome}``.
    :param blocking: runs blocking queue I/O; default ``deferToThread``.
    :param local: ``local(sender, mailboxes, message) -> Deferred``: stores a released
        held message into local maildirs (recipients marked ``local`` in the queue).
    """

    FLUSH_POLL = 2.0
    MAX_PARALLEL = 10

    def __init__(self, config: Config, queue: Queue, reactor: IReactorTime,
                 inject: Callable[[str, list[str], bytes, str], defer.Deferred[Any]],
                 resolver: Lookup | None = None, *, courier: Courier | None = None,
                 blocking: Callable[..., defer.Deferred[Any]] = threads.deferToThread,
                 local: Callable[[str, list[str], bytes], defer.Deferred[Any]] | None = None) -> None:
        self.config = config
        self.local = local
        self.queue = queue
        self.reactor = reactor
        self.inject = inject
        self.blocking = blocking
        if courier is None:
            if resolver is None:
                resolver = mx.make_resolver(config.dns.servers, reactor, config.dns.timeout)
            courier = SMTPCourier(config, IReactorTCP(reactor), resolver)
        self.courier = courier
        self._busy: set[tuple[str, str]] = set()
        self._bouncing: set[str] = set()
        self._warning: set[str] = set()
        self._damaged: set[str] = set()
        self._bounce_after: dict[str, float] = {}
        self._tasks: set[defer.Deferred[Any]] = set()
        self._scanning = False
        self._rescan = False
        self._flush = False
        self._timer: IDelayedCall | None = None
        self._poll: task.LoopingCall | None = None
        self._limit = defer.DeferredSemaphore(self.MAX_PARALLEL)

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded configuration from the next delivery on (same resolver, same queue)."""
        self.config = config
        old = self.courier
        if isinstance(old, SMTPCourier):
            self.courier = new = SMTPCourier(config, old.reactor, old.resolver)
            if new.mta_sts is not None and old.mta_sts is not None:
                new.mta_sts = old.mta_sts          # the policies fetched so far stay good

    # -- service ------------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        self._poll = task.LoopingCall(self._check_flush)
        self._poll.clock = self.reactor
        self._poll.start(self.FLUSH_POLL, now=False).addErrback(
            lambda f: log.failure("mailguard outbound: flush poll failed", f))
        self._spawn(self.blocking(self.queue.cleanup))
        self.wake()

    def stopService(self) -> None:
        """Stop starting deliveries; those in flight finish or are retried after restart."""
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        Service.stopService(self)

    def wake(self) -> None:
        """Look at the queue again soon (after an enqueue, a flush, a finished attempt)."""
        if not self.running:
            return
        if self._scanning:
            self._rescan = True
            return
        self._schedule(self.reactor.seconds())

    def flush(self) -> None:
        """Try every waiting recipient now, whatever its retry time."""
        self._flush = True
        self.wake()

    def idle(self) -> bool:
        """True when no scan, delivery or bounce is under way (tests wait for this)."""
        return not (self._scanning or self._tasks or self._busy or self._bouncing or self._warning)

    # -- scheduling ---------------------------------------------------------

    def _spawn(self, d: defer.Deferred[Any]) -> None:
        self._tasks.add(d)

        def done(result: Any) -> None:
            self._tasks.discard(d)
            if isinstance(result, Failure):
                log.failure("mailguard outbound: unexpected error", result)

        d.addBoth(done)

    def _schedule(self, when: float) -> None:
        delay = max(0.0, when - self.reactor.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.reactor.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.reactor.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._spawn(defer.ensureDeferred(self._scan()))

    def _check_flush(self) -> defer.Deferred[None]:
        def taken(requested: bool) -> None:
            if requested:
                log.info("mailguard outbound: flush requested")
                self.flush()
        return self.blocking(self.queue.take_flush_request).addCallback(taken)

    async def _scan(self) -> None:
        self._scanning = True
        try:
            entries: list[QueueEntry]
            damaged: list[Damaged]
            entries, damaged = await self.blocking(self.queue.scan)
            self._report_damaged(damaged)
            flush, self._flush = self._flush, False
            now = self.reactor.seconds()
            soonest: float | None = None
            for entry in entries:
                when = await self._consider(entry, now, flush)
                if when is not None and (soonest is None or when < soonest):
                    soonest = when
        finally:
            self._scanning = False
        if self._rescan:
            self._rescan = False
            self.wake()
        elif soonest is not None and self.running:
            self._schedule(soonest)

    def _report_damaged(self, damaged: list[Damaged]) -> None:
        """Log each entry that cannot be delivered once (``queue list`` shows it too)."""
        for d in damaged:
            if d.id not in self._damaged:
                self._damaged.add(d.id)
                log.error("mailguard outbound: id={queue_id} is damaged and stays queued undelivered: "
                          "{reason}", queue_id=d.id, reason=d.reason)

    async def _consider(self, entry: QueueEntry, now: float, flush: bool) -> float | None:
        """Start what is due for one entry; the next time it needs a look, if any."""
        if entry.held:
            return None             # quarantined: waits for `mailguard queue release`
        deadline = entry.queued_at + self.config.outbound.max_queue_time
        free = [r for r in entry.recipients if (entry.id, r.address) not in self._busy]
        expired = [r.address for r in free if r.waiting and now >= deadline]
        if expired:
            updated = await self._record(entry.id, {
                a: Outcome(FAILED, _expired_reply(entry, a), "") for a in expired}, now, expired=True)
            if updated is None:
                return None
            entry = updated
            free = [r for r in entry.recipients if (entry.id, r.address) not in self._busy]
        soonest: float | None = None
        warn_at = self._warn_at(entry)
        if warn_at is not None:
            if warn_at <= now:
                self._spawn(defer.ensureDeferred(self._warn(entry.id)))
            else:
                soonest = warn_at
        if any(r.state == FAILED and not r.notified for r in entry.recipients):
            retry_at = self._bounce_after.get(entry.id, now)
            if retry_at <= now:
                self._spawn(defer.ensureDeferred(self._bounce(entry.id)))
            else:
                soonest = retry_at
        due: dict[str, list[str]] = defaultdict(list)
        for r in free:
            if r.due(now) or (flush and r.waiting):
                due[LOCAL if r.local else domain_of(r.address)].append(r.address)
            elif r.waiting and r.next_attempt is not None:
                when = min(r.next_attempt, deadline)
                soonest = when if soonest is None else min(soonest, when)
        for domain, rcpts in due.items():
            self._busy.update((entry.id, a) for a in rcpts)
            self._spawn(defer.ensureDeferred(self._deliver(entry, domain, rcpts)))
        return soonest

    # -- one attempt --------------------------------------------------------

    async def _deliver(self, entry: QueueEntry, domain: str, rcpts: list[str]) -> None:
        try:
            try:
                message = await self.blocking(self.queue.read_message, entry.id)
            except QueueError:
                return  # deleted meanwhile (queue delete)
            try:
                if domain == LOCAL:
                    outcomes = await self._deliver_local(entry.sender, rcpts, message)
                else:
                    outcomes = await self._limit.run(
                        lambda: defer.ensureDeferred(self.courier(entry.sender, domain, rcpts, message)))
            except Exception as e:
                log.failure("mailguard outbound: id={queue_id} delivery to {domain} crashed",
                            queue_id=entry.id, domain=domain)
                outcomes = {a: Outcome(DEFERRED, f"451 4.3.0 local error: {type(e).__name__}") for a in rcpts}
            updated = await self._record(entry.id, outcomes, self.reactor.seconds())
        finally:
            self._busy.difference_update((entry.id, a) for a in rcpts)
        if updated is not None and any(r.state == FAILED and not r.notified for r in updated.recipients):
            if self._bounce_after.get(entry.id, 0.0) <= self.reactor.seconds():
                await self._bounce(entry.id)
        self.wake()

    async def _deliver_local(self, sender: str, mailboxes: list[str], message: bytes) -> dict[str, Outcome]:
        """Store a released message into this host's maildirs."""
        if self.local is None:
            return {m: Outcome(DEFERRED, "451 4.3.0 local delivery not available") for m in mailboxes}
        try:
            await self.local(sender, mailboxes, message)
        except Exception as e:
            return {m: Outcome(DEFERRED, f"451 4.3.0 local delivery failed: {type(e).__name__}") for m in mailboxes}
        return {m: Outcome(DELIVERED, "250 2.0.0 stored in the mailbox", "local") for m in mailboxes}

    async def _record(self, entry_id: str, outcomes: dict[str, Outcome], now: float,
                      expired: bool = False) -> QueueEntry | None:
        """Write the outcome of one attempt into the envelope (in a thread), and log it."""
        schedule = self.config.outbound.retry_schedule
        max_age = self.config.outbound.max_queue_time

        lines: list[dict[str, str]] = []

        def change(entry: QueueEntry) -> None:
            for r in entry.recipients:
                outcome = outcomes.get(r.address)
                if outcome is None or not r.waiting:
                    continue
                if not expired:
                    r.attempts += 1
                r.last_reply = outcome.reply
                r.relay = outcome.relay or r.relay
                r.state = outcome.state
                r.next_attempt = None
                if r.state == DEFERRED:
                    r.next_attempt = now + next_attempt(schedule, r.attempts)
                    if now >= entry.queued_at + max_age:
                        r.state = FAILED
                state = "expired" if expired else r.state
                if r.state == FAILED and entry.sender == "":
                    r.notified = True  # never bounce a bounce (RFC 5321 section 4.5.5)
                    state = "dropped"
                lines.append({"recipient": r.address, "state": state, "relay": r.relay or "-",
                              "reply": r.last_reply})

        updated = await self.blocking(self.queue.update, entry_id, change)
        msg = _msg(updated)
        for line in lines:
            log.info("mailguard outbound: id={queue_id} msg={msg} to=<{recipient}> state={state} relay={relay} "
                     "reply={reply}", queue_id=entry_id, msg=msg, **line)
        return updated  # type: ignore[no-any-return]

    async def _entry_and_message(self, entry_id: str) -> tuple[QueueEntry, bytes] | None:
        """The envelope and message of an entry, or None when it is gone (deleted meanwhile)."""
        try:
            entry = await self.blocking(self.queue.load, entry_id)
            message = await self.blocking(self.queue.read_message, entry_id)
        except QueueError:
            return None
        return entry, message

    async def _mark(self, entry_id: str, addresses: set[str], flag: str) -> None:
        """Set a recipient flag (``notified``, ``warned``) in the envelope, durably."""
        def change(e: QueueEntry) -> None:
            for r in e.recipients:
                if r.address in addresses:
                    setattr(r, flag, True)

        await self.blocking(self.queue.update, entry_id, change)

    def _log_notice(self, entry: QueueEntry, recipients: list[RecipientState], state: str) -> None:
        for r in recipients:
            log.info("mailguard outbound: id={queue_id} msg={msg} to=<{recipient}> state={state} relay={relay} "
                     "reply={reply}", queue_id=entry.id, msg=_msg(entry), recipient=r.address, state=state,
                     relay=f"<{entry.sender}>", reply=r.last_reply)

    def _warn_at(self, entry: QueueEntry) -> float | None:
        """When the entry's delay warning is due, or None (off, sent, nothing late, or ``<>``)."""
        after = self.config.outbound.delay_warning
        if not after or not entry.sender or entry.id in self._warning:
            return None
        if not any(r.state == DEFERRED and not r.warned for r in entry.recipients):
            return None
        return entry.queued_at + after

    async def _warn(self, entry_id: str) -> None:
        """Send one delay warning (RFC 3464 ``Action: delayed``) for the late recipients."""
        self._warning.add(entry_id)
        try:
            found = await self._entry_and_message(entry_id)
            if found is None:
                return
            entry, message = found
            late = [r for r in entry.recipients if r.state == DEFERRED and not r.warned]
            if not late or not entry.sender:
                return
            now = self.reactor.seconds()
            until = entry.queued_at + self.config.outbound.max_queue_time
            dsn = build_dsn(self.config.server.hostname, entry.sender, entry.id, entry.queued_at,
                            [FailedRecipient(r.address, r.last_reply, r.relay) for r in late],
                            message, now, delayed_until=until,
                            size_limit=self.config.outbound.bounce_size_limit)
            try:
                await self.inject("", [entry.sender], dsn, entry.msg_id or entry.id)
            except Exception as e:
                log.warn("mailguard outbound: id={queue_id} delay warning to <{sender}> failed: {error}",
                         queue_id=entry_id, sender=entry.sender, error=repr(e))
                return
            await self._mark(entry_id, {r.address for r in late}, "warned")
            self._log_notice(entry, late, "delay-warned")
        finally:
            self._warning.discard(entry_id)

    async def _bounce(self, entry_id: str) -> None:
        """Send one DSN for the entry's failed, not yet reported recipients."""
        if entry_id in self._bouncing:
            return
        self._bouncing.add(entry_id)
        try:
            found = await self._entry_and_message(entry_id)
            if found is None:
                self._bounce_after.pop(entry_id, None)
                return
            entry, message = found
            failed = [r for r in entry.recipients if r.state == FAILED and not r.notified]
            if not failed:
                return
            if any(r.state == FAILED and r.notified for r in entry.recipients):
                # One bounce per message: later failures of it are logged, not sent again.
                await self._mark(entry_id, {r.address for r in failed}, "notified")
                self._log_notice(entry, failed, "bounce-suppressed")
                return
            now = self.reactor.seconds()
            dsn = build_dsn(self.config.server.hostname, entry.sender, entry.id, entry.queued_at,
                            [FailedRecipient(r.address, r.last_reply, r.relay) for r in failed],
                            message, now, size_limit=self.config.outbound.bounce_size_limit)
            try:
                await self.inject("", [entry.sender], dsn, entry.msg_id or entry.id)
            except Exception as e:
                log.warn("mailguard outbound: id={queue_id} bounce to <{sender}> failed, will retry: {error}",
                         queue_id=entry_id, sender=entry.sender, error=repr(e))
                retry_at = now + next_attempt(self.config.outbound.retry_schedule, 1)
                self._bounce_after[entry_id] = retry_at
                self._schedule(retry_at)
                return
            self._bounce_after.pop(entry_id, None)
            await self._mark(entry_id, {r.address for r in failed}, "notified")
            self._log_notice(entry, failed, "bounced")
        finally:
            self._bouncing.discard(entry_id)


def _msg(entry: QueueEntry | None) -> str:
    """The SMTP message id for the log lines of an entry (``-`` when unknown)."""
    return (entry.msg_id if entry is not None else "") or "-"


def _expired_reply(entry: QueueEntry, address: str) -> str:
    for r in entry.recipients:
        if r.address == address and r.last_reply:
            return f"{r.last_reply} (gave up: message too long in the queue)"
    return "451 4.4.7 Delivery time expired: message too long in the queue"
