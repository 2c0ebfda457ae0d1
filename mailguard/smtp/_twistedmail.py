"""Import ``twisted.mail.smtp`` without its import-time DNS lookup.

``twisted.mail.smtp`` computes ``DNSNAME = socket.getfqdn()`` when it is first
imported: a blocking resolver call that can hang start-up for seconds on a host
with slow DNS.  mailguard always uses its configured hostname instead, so the
lookup is replaced by ``socket.gethostname()`` for the duration of that import.
Import Twisted's mail modules through this one.
"""

from __future__ import annotations

import socket
import sys

if "twisted.mail.smtp" not in sys.modules:
    _getfqdn = socket.getfqdn
    socket.getfqdn = lambda name="": socket.gethostname()
    try:
        from twisted.mail import smtp  # noqa: F401
    finally:
        socket.getfqdn = _getfqdn

from twisted.mail import pop3, smtp  # noqa: E402

__all__ = ["smtp", "pop3"]
