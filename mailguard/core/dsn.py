"""Delivery status notifications for failed recipients (RFC 3464, RFC 3462/6522, RFC 3834).

:func:`build_dsn` makes one ``multipart/report; report-type=delivery-status`` message
for all the failed recipients of one queued message:

1. ``text/plain``: what happened, for a person;
2. ``message/delivery-status``: ``Reporting-MTA: dns; <hostname>``, ``Arrival-Date``,
   then per recipient ``Final-Recipient: rfc822; <address>``, ``Action: failed``,
   ``Status: x.y.z``, ``Remote-MTA: dns; <host>`` (when a host answered),
   ``Diagnostic-Code: smtp; <the reply>`` and ``Last-Attempt-Date``;
3. ``text/rfc822-headers``: the original message's header section.

It goes to the envelope sender with ``MAIL FROM:<>``; the caller never sends one for a
message whose own sender was ``<>`` (RFC 5321 section 4.5.5, RFC 3464 section 2).
Built with the ``email`` package; the result is in CRLF form.

This module imports nothing from Twisted.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from email import policy
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import formatdate

_STATUS = re.compile(r"^[245][0-9][0-9][ -]([245]\.[0-9]{1,3}\.[0-9]{1,3})\b")
_WIRE = policy.compat32.clone(linesep="\r\n", max_line_length=998)


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient that will not get the message, and why."""

    address: str
    reply: str
    relay: str = ""  # "host" or "host[address]:port"


def status_of(reply: str) -> str:
    """The RFC 3463 status for a DSN: the reply's enhanced code, else 5.0.0 / 4.0.0."""
    m = _STATUS.match(reply)
    if m and m.group(1)[0] == reply[0]:
        return m.group(1)
    return "4.0.0" if reply[:1] == "4" else "5.0.0"


def _clean(text: str) -> str:
    """One line of printable ASCII (remote replies end up in header fields)."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text).strip()


def original_headers(message: bytes) -> bytes:
    """The header section of a message (up to, not including, the first empty line)."""
    normal = message.replace(b"\r\n", b"\n")
    head, sep, _ = normal.partition(b"\n\n")
    if not sep and not head.endswith(b"\n"):
        head += b"\n"
    elif sep:
        head += b"\n"
    return head


def capped(head: bytes, limit: int) -> bytes:
    """``head`` cut to at most ``limit`` octets at a line end (Postfix's ``bounce_size_limit``)."""
    if len(head) <= limit:
        return head
    cut = head.rfind(b"\n", 0, limit)
    return head[:cut + 1] if cut >= 0 else b""


def build_dsn(hostname: str, sender: str, queue_id: str, queued_at: float,
              failures: list[FailedRecipient], message: bytes, now: float,
              delayed_until: float | None = None, size_limit: int = 50000) -> bytes:
    """The bounce for ``failures`` of queued message ``queue_id``, as CRLF bytes.

    With ``delayed_until`` it is a delay warning instead (``Action: delayed``, a 4.x.x
    ``Status``, ``Will-Retry-Until``; RFC 3464 section 2.3.3): the message is still
    queued and will be tried until then.
    """
    if not failures:
        raise ValueError("a bounce needs at least one failed recipient")
    delayed = delayed_until is not None
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = sender
    report["Subject"] = ("Delayed Mail (still being retried)" if delayed
                         else "Undelivered Mail Returned to Sender")
    report["Date"] = formatdate(now, usegmt=True)
    report["Message-ID"] = f"<{queue_id}.{secrets.token_hex(4)}.dsn@{hostname}>"
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834 section 5

    if delayed:
        assert delayed_until is not None
        lines = [
            f"This is the mail system at host {hostname}.",
            "",
            "Your message has not been delivered yet to the recipients below.",
            f"It will be retried until {formatdate(delayed_until, usegmt=True)};",
            "you do not need to send it again.  Its headers are attached below.",
            "",
        ]
    else:
        lines = [
            f"This is the mail system at host {hostname}.",
            "",
            "Your message could not be delivered to one or more recipients.",
            "It is attached below (headers only).",
            "",
        ]
    for f in failures:
        lines.append(f"<{f.address}>: {_clean(f.reply)}" + (f" (host {f.relay})" if f.relay else ""))
    report.attach(MIMEText("\n".join(lines) + "\n", "plain", "us-ascii"))

    status = MIMEBase("message", "delivery-status")
    per_message = Message()
    per_message["Reporting-MTA"] = f"dns; {hostname}"
    per_message["X-Mailguard-Queue-ID"] = queue_id
    per_message["Arrival-Date"] = formatdate(queued_at, usegmt=True)
    blocks = [per_message]
    for f in failures:
        block = Message()
        block["Final-Recipient"] = f"rfc822; {f.address}"
        block["Action"] = "delayed" if delayed else "failed"
        status_code = status_of(f.reply)
        block["Status"] = "4" + status_code[1:] if delayed else status_code
        if f.relay:
            block["Remote-MTA"] = f"dns; {_clean(f.relay.split('[')[0])}"
        block["Diagnostic-Code"] = f"smtp; {_clean(f.reply)}"
        block["Last-Attempt-Date"] = formatdate(now, usegmt=True)
        if delayed:
            assert delayed_until is not None
            block["Will-Retry-Until"] = formatdate(delayed_until, usegmt=True)
        blocks.append(block)
    status.set_payload(blocks)  # type: ignore[arg-type]
    report.attach(status)

    # A message that is all header must not come back whole to a (forged) sender.
    head = capped(original_headers(message), size_limit)
    headers = MIMEBase("text", "rfc822-headers")
    try:
        headers.set_payload(head.decode("ascii"))
        headers["Content-Transfer-Encoding"] = "7bit"
    except UnicodeDecodeError:
        headers.set_payload(head.decode("latin-1"), "latin-1")
    report.attach(headers)
    return report.as_bytes(policy=_WIRE)
