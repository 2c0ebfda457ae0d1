"""A stored message as POP3 sends it for ``RETR`` and ``TOP``, one bounded chunk at a time.

:class:`MessageStream` reads the LF-stored file in :data:`CHUNK`-octet pieces and
returns each as dot-stuffed CRLF (:class:`~mailguard.core.dotstuff.DotStuffer`), then
the terminating ``.CRLF``.  For ``TOP`` (RFC 1939 section 7) a :class:`TopCut` stops
the file after the header, the blank line and the first ``n`` body lines, so
``TOP 1 999999999`` of a 25 MB message is streamed like ``RETR`` instead of read
into memory.  The session decides when to ask for the next chunk (it stops while
the client does not read).

This module imports nothing from Twisted.
"""

from __future__ import annotations

from typing import BinaryIO

from mailguard.core.dotstuff import DotStuffer

CHUNK = 1 << 16


class TopCut:
    """Passes the header, the blank line and the first ``lines`` body lines of LF text."""

    def __init__(self, lines: int) -> None:
        self.remaining = lines
        self.in_header = True
        self._last = b"\n"          # the start of the file counts as a line start

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """The part of ``data`` to send, and True once nothing after it may be sent."""
        if not data:
            return b"", False
        out = b""
        if self.in_header:
            joined = self._last + data
            blank = joined.find(b"\n\n")
            if blank < 0:
                self._last = data[-1:]
                return data, False
            end = blank + 1                  # index in ``data`` just past the blank line
            out, data = data[:end], data[end:]
            self.in_header = False
        if self.remaining <= 0:
            return out, True
        if data.count(b"\n") < self.remaining:
            self.remaining -= data.count(b"\n")
            return out + data, False
        pos = 0
        while self.remaining > 0:
            pos = data.index(b"\n", pos) + 1
            self.remaining -= 1
        return out + data[:pos], True


class MessageStream:
    """Dot-stuffed CRLF chunks of one stored message; closes the file when done.

    :param lines: for ``TOP``, the body lines to send; None sends the whole message.
    """

    def __init__(self, fh: BinaryIO, lines: int | None = None) -> None:
        self.fh = fh
        self.stuffer = DotStuffer()
        self.cut = TopCut(lines) if lines is not None else None
        self.finished = False

    def next_chunk(self) -> bytes | None:
        """The next piece to write, the terminator last; None after it.

        :raises OSError: reading the file failed (the file is closed).
        """
        if self.finished:
            return None
        try:
            data = self.fh.read(CHUNK)
        except OSError:
            self.close()
            raise
        last = not data
        if self.cut is not None and data:
            data, last = self.cut.feed(data)
        out = self.stuffer.feed(data)
        if last:
            self.close()
            out += self.stuffer.finish()
        return out

    def close(self) -> None:
        """Stop: close the file (idempotent)."""
        self.finished = True
        if not self.fh.closed:
            self.fh.close()
