"""Where accepted mail goes: local copies into maildirs, remote recipients into the queue.

:class:`Store` is the delivery transaction behind the SMTP server's final dot: every
local mailbox gets one copy (``Return-Path:`` and ``Received:`` first), the remote
recipients get one queue entry (``Received:`` first; ``Return-Path:`` is added only
at final delivery, RFC 5321 section 4.4).  All disk work, fsyncs included, runs in a
thread; the returned Deferred fires only when everything is durable, so the ``250``
that follows it is a promise kept.  Any failure is transient (451 to the client).
Local copies go through a :class:`~mailguard.storage.groupcommit.GroupCommit` when one is
given (the running server), which batches the syncs of concurrent deliveries.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, ParamSpec, Protocol, Sequence, TypeVar

from twisted.internet import defer, threads

from mailguard.storage import maildir
from mailguard.core import policy
from mailguard.config import Config
from mailguard.core.entries import Expansion
from mailguard.directory.base import Directory
from mailguard.directory.facts import gather
from mailguard.storage.groupcommit import GroupCommit
from mailguard.storage.queue import Queue

_P = ParamSpec("_P")
_R = TypeVar("_R")


class RunInThread(Protocol):
    """Runs a blocking call in a thread (``threads.deferToThread``; tests run it inline)."""

    def __call__(self, f: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> defer.Deferred[_R]: ...


class Store:
    """Stores accepted messages durably; see the module docstring."""

    def __init__(self, cfg: Config, directory: Directory, queue: Queue,
                 wake: Callable[[], None] = lambda: None,
                 run_in_thread: RunInThread = threads.deferToThread,
                 commit: GroupCommit | None = None) -> None:
        self.cfg = cfg
        self.directory = directory
        self.queue = queue
        self.wake = wake
        self.run_in_thread = run_in_thread
        self.commit = commit
        self._maildirs: dict[str, str] = {}

    def store(self, msg_id: str, sender: str, decisions: Sequence[policy.Decision],
              received: bytes, message: bytes, held: str = "") -> defer.Deferred[str | None]:
        """Store one message for the accepted recipients' decisions.

        :param message: the message as received, CRLF line endings, dot-stuffing removed.
        :param held: a quarantine reason: the message, local mailboxes included, waits in
            the queue (held) until ``mailguard queue release``.
        :returns: a Deferred firing with the queue id (or None) once all is on disk.
        """
        mailboxes = list(dict.fromkeys(m for d in decisions for m in d.mailboxes))
        remote = list(dict.fromkeys(r for d in decisions for r in d.remote))
        if held:
            held_id: defer.Deferred[str | None] = self.run_in_thread(
                self.queue.enqueue, sender, remote, received + message, held=held, local=mailboxes)
            return held_id
        return self._write(sender, mailboxes, remote, received, message)

    def deliver_local(self, sender: str, mailboxes: list[str], message: bytes) -> defer.Deferred[list[str]]:
        """Store a released held message (``Received:`` included) into local mailboxes."""
        return_path = f"Return-Path: <{sender}>\r\n".encode("utf-8", "replace")
        return self._local([self._maildir(m) for m in mailboxes], return_path + message)

    def inject(self, sender: str, recipients: Iterable[str], message: bytes) -> defer.Deferred[str | None]:
        """Deliver a message made here (a bounce) to addresses routed like local mail.

        Inbound recipients are expanded through the directory (unknown ones dropped);
        every other one is queued.  ``message`` is complete, CRLF line endings.  A
        directory that cannot answer fails the Deferred (DirectoryError): nothing written.
        """
        found = Expansion(others=tuple(r.lower() for r in recipients))
        d = gather(lambda facts: policy.resolve_targets(self.cfg, facts, found), self.directory)
        return d.addCallback(lambda targets: self._write(sender, list(targets[0]), list(targets[1]), b"",
                                                         message))

    def _write(self, sender: str, mailboxes: list[str], remote: list[str],
               received: bytes, message: bytes) -> defer.Deferred[str | None]:
        d: defer.Deferred[str | None] = defer.succeed(None)
        if remote:
            d = self.run_in_thread(self.queue.enqueue, sender, remote, received + message)
            d.addCallback(self._woke)
        if mailboxes:
            paths = [self._maildir(m) for m in mailboxes]
            return_path = f"Return-Path: <{sender}>\r\n".encode("utf-8", "replace")
            local = return_path + received + message
            d.addCallback(lambda queue_id: self._local(paths, local).addCallback(lambda _: queue_id))
        return d

    def _maildir(self, mailbox: str) -> str:
        """The maildir of a mailbox, as a string (remembered: this is the hot path)."""
        path = self._maildirs.get(mailbox)
        if path is None:
            path = os.fspath(maildir.maildir_path(self.cfg.mail_dir, mailbox))
            if len(self._maildirs) < 10_000:
                self._maildirs[mailbox] = path
        return path

    def _local(self, paths: list[str], message: bytes) -> defer.Deferred[list[str]]:
        if self.commit is not None:
            return self.commit.deliver(paths, message)
        return self.run_in_thread(maildir.deliver_many, [Path(p) for p in paths], message)

    def _woke(self, queue_id: str | None) -> str | None:
        self.wake()
        return queue_id
