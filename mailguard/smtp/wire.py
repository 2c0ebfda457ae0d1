"""The SMTP wire: framing, line limits, DATA end detection and reply order.

:class:`SMTPWire` reads the byte stream itself (Twisted's ``LineReceiver`` and
``ESMTP`` line handling is where their faults live) and hands complete units to
the session above it:

- Commands and DATA are parsed from one buffer.  A command line past
  :data:`MAX_COMMAND` (an AUTH response or initial response past :data:`MAX_AUTH_LINE`) is answered
  500; a line with no end past it, or a DATA line past :data:`MAX_DATA_LINE`, is
  answered 500 and the connection closed: the rest is never read as commands.
- Only ``CRLF.CRLF`` ends DATA.  The message goes up with its dot-stuffing and any
  bare CR/LF untouched (the session judges them); past the size limit the body is
  no longer kept, only its end looked for.  Past :data:`SPOOL_THRESHOLD` an
  unfinished message waits in an unlinked file under ``data_dir/spool`` instead of
  memory, so clients that never finish their DATA cost disk, not RAM.
- All sessions together hold at most ``[limits] memory_budget`` octets of unfinished
  messages in memory (a :class:`~mailguard.app.limits.MemoryBudget`): a message that
  would pass it goes to the spool file at once, however small.  When the spool cannot
  take it (a full or broken disk), the rest of the message is read and dropped and the
  final dot is answered ``NO_ROOM`` (452 4.3.1): the client keeps its mail and
  tries again later.  A session's share is returned when its message ends and when
  the connection is lost.
- Replies go out strictly in order: while the session waits (:meth:`pause`, for a
  password check, a directory lookup, a store), later pipelined input waits in the
  buffer, and past :data:`MAX_PENDING_INPUT` the transport stops reading (RFC 2920).
- A client that does not read its replies is not answered without bound: the wire
  is the transport's streaming producer, and while the transport's write buffer is
  full no command runs (input then waits, and reading stops, as above).
- More than :data:`MAX_ERRORS` error replies close the session with 421.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import BinaryIO

from twisted.internet import interfaces, protocol
from zope.interface import implementer

from mailguard.app import maillog
from mailguard.app.connection import connection, hang_up, hold_reading, send
from mailguard.app.limits import MemoryBudget
from mailguard.core import replies

MAX_COMMAND = 2048           # octets in a command line (RFC 5321 says 512; Postfix allows 2048)
MAX_AUTH_LINE = 12288        # RFC 4954 section 4
MAX_DATA_LINE = 65536        # a DATA line longer than this closes the connection
MAX_ERRORS = 50              # error replies in one session before 421
MAX_PENDING_INPUT = 1 << 20  # pipelined input held while a reply is pending
SPOOL_THRESHOLD = 256 * 1024 # DATA past this goes to a file under data_dir/spool until the final dot

TOO_MANY_ERRORS = replies.Reply(421, "4.7.0", "Too many errors, closing connection")

COMMAND, DATA, AUTH, CLOSED = "command", "data", "auth", "closed"


#: reply -> its line as sent; the same few dozen replies answer nearly every command
_WIRE_FORMS: dict[replies.Reply, bytes] = {}
_MAX_WIRE_FORMS = 512        # milter and DNS replies vary: past this, lines are not remembered


def _wire_form(r: replies.Reply) -> bytes:
    """``r`` as one CRLF-ended line, remembered while the table has room."""
    data = f"{r}\r\n".encode("utf-8", "replace")
    if len(_WIRE_FORMS) < _MAX_WIRE_FORMS:
        _WIRE_FORMS[r] = data
    return data


@implementer(interfaces.IPushProducer)
class SMTPWire(protocol.Protocol):
    """Framing and limits for one connection; the session overrides the ``*_received`` hooks."""

    max_message_size = 0                        # set by the session from [limits]
    spool_dir: Path | None = None               # where DATA past SPOOL_THRESHOLD goes; None: memory
    memory: MemoryBudget | None = None          # [limits] memory_budget, shared; None: no budget
    client_ip = ""                              # for the log line

    def __init__(self) -> None:
        self.mode = COMMAND                     # command | data | auth | closed
        self._buf = bytearray()
        self._paused = False
        self._out_paused = False                # the client is not reading its replies
        self._reading_paused = False
        self._processing = False
        self._errors = 0
        self._body: bytearray | None = None
        self._refusal: replies.Reply | None = None   # the answer to the final dot, when not the session's
        self._line_len = 0
        self._in_memory = 0                     # this session's share of the memory budget
        self._spool: BinaryIO | None = None
        self._spooled = 0
        self._spool_broken = False

    # -- hooks ---------------------------------------------------------------------

    def input_seen(self) -> None:
        """Bytes arrived (the idle timer restarts)."""

    def command_received(self, line: bytes) -> None:
        """One command line, without its CRLF."""
        raise NotImplementedError

    def auth_response_received(self, line: bytes) -> None:
        """One line of a SASL exchange (mode ``auth``), without its CRLF."""
        raise NotImplementedError

    def auth_aborted(self) -> None:
        """A SASL response line was too long: the exchange cannot go on in step."""

    def message_received(self, message: bytes, refusal: replies.Reply | None) -> None:
        """The DATA between the 354 and the final dot, CRLF line ends, dot-stuffing kept.

        ``refusal`` is the answer when the message was not kept whole (``TOO_BIG``, ``NO_ROOM``).
        """
        raise NotImplementedError

    # -- output ----------------------------------------------------------------------

    def send_raw(self, text: str) -> None:
        """Write ``text`` unless the session is closed."""
        if self.mode != CLOSED:
            send(self.transport, text.encode("utf-8", "replace"))

    def reply(self, r: replies.Reply, suffix: str = "") -> None:
        """Send one reply line; 5xx and 421 replies count towards the error limit."""
        if self.mode != CLOSED:
            data = (f"{r} {suffix}\r\n".encode("utf-8", "replace") if suffix
                    else _WIRE_FORMS.get(r) or _wire_form(r))
            send(self.transport, data)
        if r.code >= 500 or r.code == 421:
            self._errors += 1
            if self._errors > MAX_ERRORS and self.mode != CLOSED:
                self.close(TOO_MANY_ERRORS)

    def close(self, r: replies.Reply) -> None:
        """Send a last reply and close; nothing more is read."""
        self.send_raw(f"{r}\r\n")
        self.mode = CLOSED
        self._buf.clear()
        self.forget_message()
        hang_up(self.transport, client_reads=not self._out_paused)

    # -- IPushProducer: the transport's write buffer -------------------------------------

    def start_flow_control(self) -> None:
        """Become the transport's producer: :meth:`pauseProducing` when its buffer fills."""
        connection(self.transport).registerProducer(self, True)

    def pauseProducing(self) -> None:
        """The client is not reading: run no more commands until it does."""
        self._out_paused = True

    def resumeProducing(self) -> None:
        """The write buffer drained: go on with the pipelined input."""
        self._out_paused = False
        if self.mode != CLOSED and not self._paused and self._buf:
            self._process()
        self._flow()

    def stopProducing(self) -> None:
        """The connection is going away."""
        self._out_paused = True

    def _flow(self) -> None:
        """Stop reading while blocked (a pending reply, an unread client) with a large backlog."""
        if self.mode == CLOSED:
            return
        backlog = (self._paused or self._out_paused) and len(self._buf) > MAX_PENDING_INPUT
        self._reading_paused = hold_reading(self.transport, self._reading_paused, backlog)

    # -- input -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.mode == CLOSED:
            return
        self.input_seen()
        self._buf += data
        if not self._paused and not self._out_paused:
            self._process()
        self._flow()

    def discard_input(self) -> None:
        """Forget buffered input (what a client pipelined after STARTTLS, RFC 3207 section 4.2)."""
        self._buf.clear()

    def start_data(self) -> None:
        """Read a message from here on, up to ``CRLF.CRLF``."""
        self.mode = DATA
        self._body = bytearray(b"\r\n")     # a virtual CRLF: the first line can be "."
        self.drop_spool()
        self._spool_broken = False
        self._refusal = None
        self._line_len = 0

    def pause(self) -> None:
        """Hold further input until :meth:`resume` (a reply is pending)."""
        self._paused = True

    def resume(self) -> None:
        """Go on with buffered input."""
        self._paused = False
        if self.mode == CLOSED:
            return
        if self._buf and not self._out_paused:
            self._process()
        self._flow()

    def _process(self) -> None:
        if self._processing:                    # resumed from inside the loop: it goes on
            return
        self._processing = True
        try:
            self._process_buffer()
        finally:
            self._processing = False

    def _process_buffer(self) -> None:
        while not self._paused and not self._out_paused and self.mode != CLOSED and self._buf:
            if self.mode == DATA:
                if not self._data_input():
                    return
                continue
            nl = self._buf.find(b"\n")
            limit = self._line_limit()
            if nl < 0:
                if len(self._buf) > limit:
                    self.close(replies.LINE_TOO_LONG)
                return
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > limit:
                if self.mode == AUTH:
                    self.mode = COMMAND
                    self.auth_aborted()
                self.reply(replies.LINE_TOO_LONG)
            elif self.mode == AUTH:
                self.auth_response_received(line)
            else:
                self.command_received(line)

    def _line_limit(self) -> int:
        """Octets allowed in the next line: an AUTH initial response may be 12,288 (RFC 4954)."""
        if self.mode == AUTH:
            return MAX_AUTH_LINE
        if self._buf[:5].upper() == b"AUTH ":
            return MAX_AUTH_LINE + len(b"AUTH XOAUTH2 ")
        return MAX_COMMAND

    def _data_input(self) -> bool:
        """Consume buffered DATA; True when the message ended and commands follow."""
        assert self._body is not None
        data = bytes(self._buf)
        self._buf.clear()
        if self._long_line(data):
            self.close(replies.LINE_TOO_LONG)
            return False
        body = self._body
        start = max(0, len(body) - 4)
        body += data
        end = body.find(b"\r\n.\r\n", start)
        if end < 0:
            if self._refusal is None and self._spooled + len(body) > self.max_message_size + 2:
                self._refusal = replies.TOO_BIG
            if self._refusal is None and (len(body) > SPOOL_THRESHOLD or not self._fits(len(body))) \
                    and not self._to_disk(body) and not self._fits(len(body)):
                maillog.event("smtp", "memory-budget-full", self.client_ip, size=len(body))
                self._refusal = replies.NO_ROOM
            if self._refusal is not None:
                self.drop_spool()
                del body[:-4]
            self._hold(len(body))
            return False
        self._buf += body[end + 5:]
        tail = bytes(body[(0 if self._spool is not None else 2): end + 2])
        message = self._unspool() + tail if self._spool is not None else tail
        self.forget_message()
        self.mode = COMMAND
        self.message_received(message, self._refusal)
        return True

    def _fits(self, size: int) -> bool:
        """May this session hold ``size`` octets of its message in memory?"""
        return self.memory is None or self.memory.fits(self._in_memory, size)

    def _hold(self, size: int) -> None:
        """This session now holds ``size`` octets of an unfinished message in memory."""
        if self.memory is not None:
            self._in_memory = self.memory.hold(self._in_memory, size)

    def _to_disk(self, body: bytearray) -> bool:
        """Spill ``body`` to the spool file; False when there is none or the disk refused.

        A full or broken disk keeps this message in memory (within the budget and the
        size limit); the store then answers for the disk (451).
        """
        if self.spool_dir is None or self._spool_broken:
            return False
        try:
            self._spill(body)
        except OSError:
            self._spool_broken = True
            return False
        return True

    def _spill(self, body: bytearray) -> None:
        """Move all but the last 4 octets of ``body`` (an end may straddle them) to the spool file.

        :raises OSError: the disk refused; ``body`` then holds the whole message again.
        """
        assert self.spool_dir is not None
        first = self._spool is None
        before = self._spooled
        try:
            if self._spool is None:
                self.spool_dir.mkdir(parents=True, exist_ok=True)
                self._spool = tempfile.TemporaryFile(dir=self.spool_dir, buffering=0)   # unlinked at once
            view = memoryview(bytes(body[(2 if first else 0):-4]))   # without the virtual CRLF
            while view:
                written = self._spool.write(view) or 0
                self._spooled += written
                view = view[written:]
        except OSError:
            self._spooled = before
            if first:
                self.drop_spool()
            else:                               # give the message back its start and its virtual CRLF
                body[:0] = b"\r\n" + self._unspool()
            raise
        del body[:-4]

    def _unspool(self) -> bytes:
        """What was spooled (only the writes that succeeded); the file is dropped."""
        if self._spool is None:
            return b""
        self._spool.seek(0)
        head = self._spool.read(self._spooled)
        self.drop_spool()
        return head

    def forget_message(self) -> None:
        """Drop the unfinished message: its memory goes back to the budget, its file away."""
        self._body = None
        self._hold(0)
        self.drop_spool()

    def drop_spool(self) -> None:
        """Forget a spooled message (closing the file deletes it)."""
        if self._spool is not None:
            self._spool.close()
            self._spool = None
        self._spooled = 0

    def _long_line(self, data: bytes) -> bool:
        first = data.find(b"\n")
        if first < 0:
            self._line_len += len(data)
            return self._line_len > MAX_DATA_LINE
        if self._line_len + first > MAX_DATA_LINE:
            return True
        if len(data) > MAX_DATA_LINE and max(map(len, data.split(b"\n"))) > MAX_DATA_LINE:
            return True
        self._line_len = len(data) - data.rfind(b"\n") - 1
        return False
