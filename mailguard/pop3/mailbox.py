"""POP3 transaction state (RFC 1939 section 5): STAT, LIST, UIDL, RETR, TOP, DELE, RSET, NOOP, QUIT.

Deletions and seen flags are applied at ``QUIT`` only; ``RETR``/``TOP`` stream the
file through the stateful dot-stuffer (:mod:`mailguard.pop3.stream`).
"""

from __future__ import annotations

from typing import BinaryIO

from twisted.python.failure import Failure

from mailguard.app import maillog
from mailguard.app.connection import send
from mailguard.core.dotstuff import DotStuffer
from mailguard.pop3 import stream as stream_mod
from mailguard.pop3.stream import MessageStream
from mailguard.pop3.session import (ERR_COMMIT, ERR_NO_SUCH, ERR_SYNTAX, ERR_VANISHED, TRANSACTION, UPDATE)
from mailguard.pop3.session import POP3Session, _number, log
from mailguard.storage.maildir import CommitResult


class MailboxCommands(POP3Session):
    """The commands of an opened mailbox, and QUIT in every state."""

    def _message_arg(self, rest: bytes) -> int | None:
        """The one message-number argument; answers -ERR itself when there is none."""
        args = rest.split(b" ")
        n = _number(args[0]) if len(args) == 1 else None
        if n is None:
            self._send(ERR_SYNTAX)
            return None
        assert self.mailbox is not None
        try:
            self.mailbox.message(n)
        except KeyError:
            self._send(ERR_NO_SUCH)
            return None
        return n

    def do_STAT(self, rest: bytes) -> None:
        if rest:
            self._send(ERR_SYNTAX)
            return
        assert self.mailbox is not None
        self._send(b"+OK %d %d" % self.mailbox.stat())

    def do_LIST(self, rest: bytes) -> None:
        assert self.mailbox is not None
        if rest:
            n = self._message_arg(rest)
            if n is not None:
                self._send(b"+OK %d %d" % (n, self.mailbox.message(n).size))
            return
        count, octets = self.mailbox.stat()
        self._multiline(b"+OK %d messages (%d octets)" % (count, octets),
                        [b"%d %d" % (i, m.size) for i, m in self.mailbox.live()])

    def do_UIDL(self, rest: bytes) -> None:
        assert self.mailbox is not None
        if rest:
            n = self._message_arg(rest)
            if n is not None:
                self._send(b"+OK %d %s" % (n, self.mailbox.message(n).uid.encode("ascii")))
            return
        self._multiline(b"+OK Unique-ID listing follows",
                        [b"%d %s" % (i, m.uid.encode("ascii")) for i, m in self.mailbox.live()])

    def _open_message(self, n: int) -> BinaryIO | None:
        """Message ``n``'s file, or None after telling the client it vanished."""
        assert self.mailbox is not None
        try:
            return self.mailbox.open_message(n)
        except OSError:
            self._send(ERR_VANISHED)
            return None

    def do_RETR(self, rest: bytes) -> None:
        n = self._message_arg(rest)
        if n is None:
            return
        fh = self._open_message(n)
        if fh is None:
            return
        assert self.mailbox is not None
        size = self.mailbox.message(n).size
        if size <= stream_mod.CHUNK:
            # Most mail: one read, one write (the +OK line with it), no streaming round trips.
            with fh:
                data = fh.read()
            stuffer = DotStuffer()
            send(self.transport, b"+OK %d octets\r\n" % size + stuffer.feed(data) + stuffer.finish())
            self.mailbox.mark_retrieved(n)
            return
        self._send(b"+OK %d octets" % size)
        mailbox = self.mailbox
        self._stream_message(MessageStream(fh)).addCallback(lambda _: mailbox.mark_retrieved(n))

    def do_TOP(self, rest: bytes) -> None:
        args = rest.split(b" ")
        lines = _number(args[1]) if len(args) == 2 else None
        if lines is None:
            self._send(ERR_SYNTAX)
            return
        n = self._message_arg(args[0])
        if n is None:
            return
        fh = self._open_message(n)
        if fh is None:
            return
        self._send(b"+OK Top of message follows")
        self._stream_message(MessageStream(fh, lines))

    def do_DELE(self, rest: bytes) -> None:
        n = self._message_arg(rest)
        if n is None:
            return
        assert self.mailbox is not None
        self.mailbox.delete(n)
        self._send(b"+OK Message %d deleted" % n)

    def do_RSET(self, rest: bytes) -> None:
        if rest:
            self._send(ERR_SYNTAX)
            return
        assert self.mailbox is not None
        self.mailbox.reset()
        count, octets = self.mailbox.stat()
        self._send(b"+OK %d messages (%d octets)" % (count, octets))

    def do_NOOP(self, rest: bytes) -> None:
        self._send(ERR_SYNTAX if rest else b"+OK")

    def do_QUIT(self, rest: bytes) -> None:
        if self.state != TRANSACTION or self.mailbox is None:
            self._send(b"+OK Bye")
            self._close()
            return
        self.state = UPDATE
        mailbox, address = self.mailbox, self.mailbox_address
        d = self.factory.run_in_thread(mailbox.commit)

        def committed(result: CommitResult) -> None:
            maillog.event("pop3", "commit", self.peer, user=address, deleted=result.deleted,
                          failed=result.failed)
            self._release()
            if self._gone:
                return
            if result.failed:
                self._send(ERR_COMMIT)
            else:
                self._send(b"+OK Bye, %d messages deleted" % result.deleted)
            self._close()

        def failed(failure: Failure) -> None:
            log.failure("mailguard pop3: commit failed", failure)
            self._release()
            if not self._gone:
                self._send(ERR_COMMIT)
                self._close()

        self._wait(d.addCallbacks(committed, failed))

