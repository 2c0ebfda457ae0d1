"""Trace information: message ids, the ``Received:`` header, and the hop count.

The header follows RFC 5321 section 4.4 with the RFC 3848 protocol names
(``ESMTP``, ``ESMTPS``, ``ESMTPSA``...); the hop count is the loop test of
RFC 5321 section 6.3.
"""

from __future__ import annotations

import itertools
import os
from email.utils import formatdate

from twisted.internet.interfaces import IReactorTime

from mailguard.app import maillog
from mailguard.core.checks import sanitize_helo

MAX_HOPS = 50                # Received: headers before a message is taken for a mail loop

_ids = itertools.count()
_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


#: every two-digit base-36 numeral, "00" to "ZZ": an id is written two digits at a time
_PAIRS = [a + b for a in _DIGITS for b in _DIGITS]


def make_id(clock: IReactorTime) -> str:
    """A short unique message id: time, process id and a counter, base 36."""
    n = (int(clock.seconds() * 1000) << 20) ^ (os.getpid() << 8) ^ next(_ids)
    if n < 36:
        return _DIGITS[n]
    parts = []
    while n >= 1296:
        n, r = divmod(n, 1296)
        parts.append(_PAIRS[r])
    parts.append(_DIGITS[n] if n < 36 else _PAIRS[n])   # the leading digits, never a leading 0
    parts.reverse()
    return "".join(parts)


def received(*, msg_id: str, helo: str | None, client_ip: str, hostname: str, esmtp: bool,
             encrypted: bool, authenticated: bool, recipient: str | None, now: float,
             client_name: str | None = None) -> bytes:
    """The ``Received:`` header for one message; ``recipient`` only when there is one.

    ``client_name`` (mail from untrusted clients): the forward-confirmed reverse name of
    the client or ``unknown``, shown as ``from HELO (NAME [IP])`` (RFC 2505 section 2.2).
    The HELO is shown as given, without control characters, spaces or parentheses.
    """
    proto = "ESMTP" if esmtp else "SMTP"
    if encrypted:
        proto += "S"
    if authenticated:
        proto += "A"
    rcpt = f"\r\n\tfor <{recipient}>" if recipient is not None else ""
    literal = f"IPv6:{client_ip}" if ":" in client_ip else client_ip
    auth = " (authenticated sender)" if authenticated else ""
    name = f"{maillog.clean(client_name)} " if client_name else ""
    return (f"Received: from {sanitize_helo(helo)} ({name}[{literal}]){auth}\r\n\tby {hostname} "
            f"(mailguard) with {proto} id {msg_id}{rcpt};\r\n\t{_date(now)}\r\n").encode("utf-8", "replace")


def hops(message: bytes) -> int:
    """How many Received: headers the message carries (RFC 5321 section 6.3, loop detection)."""
    end = message.find(b"\r\n\r\n")
    head = b"\r\n" + (message if end < 0 else message[:end]).lower()
    return head.count(b"\r\nreceived:")


_last_date: tuple[int, str] = (-1, "")


def _date(now: float) -> str:
    """RFC 5322 date for the Received: header, computed once per second."""
    global _last_date
    second = int(now)
    if _last_date[0] != second:
        _last_date = (second, formatdate(second, localtime=True))
    return _last_date[1]
