"""The mail log: one stable line per decision (RFC 2505 section 2, items 3-4).

Lines go to the twistd log (standard output under ``twistd -n``).  Their text is
stable, ``key=value`` separated by spaces, so that grep and fail2ban can read them::

    mailguard smtp decision: client=192.0.2.7 local=127.0.0.1 helo=me from=<a@b> rcpt=<c@d> rule=relay_denied reply="550 5.7.1 Relaying prohibited"
    mailguard smtp decision: client=192.0.2.9 local=127.0.0.1 helo=x from=<a@b> rcpt=<> rule=dnsbl_listed reply="554 5.7.1 Client host blocked by a DNS block list" detail="zone=bl.example code=127.0.0.2"
    mailguard auth failure: service=smtp client=192.0.2.7 user=alice@example.com

One message has one id from its MAIL command on: the ``id=`` that ends its RCPT
decision lines, the ``id=`` of its ``stored`` line (which names the local
``mailboxes=`` it went into) and the ``msg=`` of the queue's lines (queued,
deferred, delivered, failed, bounced, and those of the bounce itself), so that
``grep 2K7F3Q1X9B`` on the log follows it from RCPT to delivery or bounce::

    mailguard smtp decision: client=192.0.2.7 ... rcpt=<ann@remote.example> rule=allow reply="250 2.1.5 Recipient ok" id=2K7F3Q1X9B
    mailguard outbound: id=66190428394dccdf61af0 msg=2K7F3Q1X9B state=queued from=<joe@example.com> to=<ann@remote.example>
    mailguard smtp stored: client=192.0.2.7 id=2K7F3Q1X9B sender=joe@example.com rcpts=2 size=1290 mailboxes=bob@example.com
    mailguard outbound: id=66190428394dccdf61af0 msg=2K7F3Q1X9B to=<ann@remote.example> state=failed relay=... reply=550 ...

Passwords and AUTH payloads are never logged.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.logger import Logger
from zope.interface import implementer

log = Logger(namespace="mailguard")

#: Called with (rule, reply) for every decision line, and with the service for every failed
#: login: how :mod:`mailguard.app.metrics` counts exactly what is logged.
DECISION_HOOKS: list[Callable[[str, object], None]] = []
AUTH_FAILURE_HOOKS: list[Callable[[str], None]] = []


def clean(value: object) -> str:
    """Make a client-supplied value safe for one log line (no control characters, bounded)."""
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:200]


def decision(client: str, local: str, helo: str, sender: str, rcpt: str, rule: str, reply: object,
             detail: str = "", msg_id: str = "") -> None:
    """Log one decision (a RCPT, or a check's refusal; ``detail`` says what decided it).

    ``msg_id``: the message's id, made at MAIL (the one of the ``250`` reply, the
    ``stored`` line and the queue's lines), ending the line as ``id=...``.
    """
    for hook in DECISION_HOOKS:
        hook(rule, reply)
    # Formatted here once: the observers then only copy one field.
    extra = (f' detail="{clean(detail)}"' if detail else "") + (f" id={msg_id}" if msg_id else "")
    log.info("{line}", line=(
        f"mailguard smtp decision: client={client} local={local} helo={clean(helo)} from=<{clean(sender)}> "
        f"rcpt=<{clean(rcpt)}> rule={rule} reply=\"{clean(reply)}\"{extra}"))


def event(service: str, what: str, client: str, **fields: object) -> None:
    """Log one event line: ``mailguard <service> <what>: client=<ip> k=v ...``."""
    extra = "".join(f" {k}={clean(v)}" for k, v in fields.items())
    log.info("{line}", line=f"mailguard {service} {what}: client={client}{extra}")


class RepeatLimiter:
    """Lets the first ``burst`` lines per key through in each ``span`` seconds, counts the rest.

    ``allow(key)`` is True for a line to write; once the key's window has passed,
    ``take_suppressed(key)`` gives how many lines were held back (then 0 again).
    """

    def __init__(self, burst: int = 10, span: float = 60.0, now: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.span = span
        self.now = now
        self._windows: dict[str, tuple[float, int, int]] = {}   # key -> (start, written, held back)

    def allow(self, key: str) -> tuple[bool, int]:
        """(write this line?, lines held back in the window that just ended)."""
        t = self.now()
        start, written, held = self._windows.get(key, (t, 0, 0))
        ended = 0
        if t - start >= self.span:
            ended, start, written, held = held, t, 0, 0
        if written < self.burst:
            self._windows[key] = (start, written + 1, held)
            ok = True
        else:
            self._windows[key] = (start, written, held + 1)
            ok = False
        if len(self._windows) > 10_000:
            self._windows = {k: v for k, v in self._windows.items() if t - v[0] < self.span}
        return ok, ended


#: Failed-login lines per (service, client): the first 10 a minute, then a count.
AUTH_LINES = RepeatLimiter()


def auth_failure(service: str, client: str, user: str, throttled: bool = False) -> None:
    """Log a failed (or refused, ``throttled``) login in the line the fail2ban filter matches.

    A client that keeps failing gets its first lines each minute in full (enough for
    fail2ban), then one ``mailguard auth suppressed`` line with the count of the rest.
    """
    for hook in AUTH_FAILURE_HOOKS:
        hook(service)
    ok, held = AUTH_LINES.allow(f"{service} {client}")
    if held:
        log.warn("{line}", line=f"mailguard auth suppressed: service={service} client={client} count={held}")
    if ok:
        extra = " throttled=yes" if throttled else ""
        log.warn("{line}", line=f"mailguard auth failure: service={service} client={client} "
                               f"user={clean(user)}{extra}")


def directory_entry(what: str, **fields: object) -> None:
    """Log a directory entry that cannot be used: ``mailguard directory <what>: k=v ...``."""
    extra = " ".join(f"{k}={clean(v)}" for k, v in fields.items())
    log.warn("{line}", line=f"mailguard directory {what}: {extra}")


@implementer(IStreamClientEndpoint)
class Quiet:
    """An endpoint whose connections do not log ``Starting factory``/``Stopping factory``.

    Twisted logs both lines for every connection of a factory left ``noisy`` (such
    as the one ``endpoints.connectProtocol`` and the web client make): two lines per
    outbound delivery, MTA-STS fetch or directory connection, none of them news.
    ``Quiet(endpoint)`` turns that off for each factory it connects.
    """

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def connect(self, protocolFactory: IProtocolFactory) -> Any:  # noqa: N803 - Twisted's name
        setattr(protocolFactory, "noisy", False)
        return self.endpoint.connect(protocolFactory)
