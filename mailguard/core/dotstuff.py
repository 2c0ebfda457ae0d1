"""Stateful dot-stuffing for SMTP DATA (RFC 5321 section 4.5.2) and POP3 (RFC 1939 section 3).

Twisted's SMTP client and POP3 server stuff each 16 KiB chunk on its own, so a line
that is just ``.`` starting exactly at a chunk boundary goes out unstuffed and ends
the message early.  :class:`DotStuffer` remembers whether the previous chunk ended a
line, so chunk boundaries make no difference.

This module imports nothing from Twisted.
"""

from __future__ import annotations

import re

_BARE_CR = re.compile(rb"\r(?!\n)")


def has_bare_cr(data: bytes) -> bool:
    """Does ``data`` hold a CR that does not start a CRLF?

    A search that starts at a literal CR: on a large message several times faster
    than counting its CRLF pairs.
    """
    return _BARE_CR.search(data) is not None


class DotStuffer:
    """Turn a message, fed in chunks of any size, into its wire form.

    Input lines may end in LF or CRLF; output lines always end in CRLF, and every
    line beginning with ``.`` gets one more ``.`` in front.  :meth:`finish`
    returns the tail: a CRLF if the message did not end with one, then ``.\\r\\n``.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        """Stuff one chunk; the result may be sent at once."""
        if not chunk:
            return b""
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            # A CR at the very end may be the first half of a CRLF split across chunks.
            chunk = chunk[:-1]
            self._pending_cr = True
        data = chunk.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        data = data.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and data.startswith(b"."):
            data = b"." + data
        if data:
            self._at_line_start = data.endswith(b"\r\n")
        return data

    def finish(self) -> bytes:
        """The end of the message: any held CR, a final CRLF when missing, and ``.CRLF``."""
        tail = b""
        if self._pending_cr:
            self._pending_cr = False
            tail = b"\r"
            self._at_line_start = False
        if not self._at_line_start:
            tail += b"\r\n"
        self._at_line_start = True
        return tail + b".\r\n"


def stuff(message: bytes) -> bytes:
    """The whole wire form of a message, terminator included."""
    s = DotStuffer()
    return s.feed(message) + s.finish()
