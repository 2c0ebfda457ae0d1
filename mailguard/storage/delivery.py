"""Where accepted mail goes: local copies into maildirs, remote recipients into the queue.

:class:`Store` is the delivery transaction behind the SMTP server's final dot: every
local mailbox gets one copy (``Return-Path:`` and ``Received:`` first), the remote
recipients get one queue entry (``Received:`` first; ``Return-Path:`` is added only
at final delivery, RFC 5321 section 4.4).  Both are parts of one transaction run by
the :class:`~mailguard.storage.groupcommit.GroupCommit` (in its threads, batching the
syncs of concurrent deliveries): nothing of the message is in sight of a POP3 reader
or the queue runner before all of it is durable, the returned Deferred fires only
after that, so the ``250`` that follows it is a promise kept, and the runner is woken
only then.  Any failure leaves nothing behind and is transient (451 to the client,
whose retry cannot duplicate anything).

Forwarded mail (a contact, a remote list member or alias target, a reroute to a
remote domain: decisions of rule ``inbound`` or ``reroute``) from a sender outside
the local domains is queued with its envelope sender rewritten by SRS
(:mod:`mailguard.core.srs`) into the forwarding domain, so SPF at the next hop
checks mailguard's address against mailguard's domain; remote copies the client
may send itself (relay permission, relay domains) keep the sender as given.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, ParamSpec, Protocol, Sequence, TypeVar

from twisted.internet import defer, threads
from twisted.logger import Logger

from mailguard.storage import maildir
from mailguard.core import policy
from mailguard.config import Config
from mailguard.core.entries import Expansion
from mailguard.core.srs import SRS, SRSError
from mailguard.directory.base import Directory
from mailguard.directory.facts import gather
from mailguard.storage.groupcommit import GroupCommit, Part
from mailguard.storage.queue import Queue, StagedEntry
from mailguard.storage.usage import CountedCopies, Sizes

log = Logger(namespace="mailguard.storage.delivery")

#: Decision rules whose remote addresses are forwards made here (SRS applies).
FORWARDING_RULES = frozenset({"inbound", "reroute"})

_P = ParamSpec("_P")
_R = TypeVar("_R")


class RunInThread(Protocol):
    """Runs a blocking call in a thread (``threads.deferToThread``; tests run it inline)."""

    def __call__(self, f: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs) -> defer.Deferred[_R]: ...


class Store:
    """Stores accepted messages durably; see the module docstring."""

    def __init__(self, cfg: Config, directory: Directory, queue: Queue,
                 wake: Callable[[], None] = lambda: None,
                 run_in_thread: RunInThread = threads.deferToThread, *,
                 commit: GroupCommit, srs: SRS | None = None,
                 now: Callable[[], float] = time.time, sizes: Sizes | None = None) -> None:
        self.cfg = cfg
        self.directory = directory
        self.queue = queue
        self.wake = wake
        self.run_in_thread = run_in_thread
        self.commit = commit
        self.srs = srs
        self.now = now
        self.sizes = sizes                  # told of each local copy (mailbox quotas)
        self._maildirs: dict[str, str] = {}
        self._mail_root: tuple[Config, str] | None = None

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
        if not held and remote and self.srs is not None:
            return self._write_groups(self._by_sender(sender, decisions), mailboxes, sender, received, message,
                                      msg_id)
        if held:
            try:
                entry = self.queue.prepare(sender, remote, received + message, held=held, local=mailboxes,
                                           msg_id=msg_id)
            except Exception:
                return defer.fail()
            return self.commit.commit([entry]).addCallback(lambda _: _logged([entry], "held")[0].id)
        return self._write(sender, mailboxes, remote, received, message, msg_id)

    def deliver_local(self, sender: str, mailboxes: list[str], message: bytes) -> defer.Deferred[list[str]]:
        """Store a released held message (``Received:`` included) into local mailboxes."""
        return_path = f"Return-Path: <{sender}>\r\n".encode("utf-8", "replace")
        return self.commit.deliver([self._maildir(m) for m in mailboxes], return_path + message)

    def inject(self, sender: str, recipients: Iterable[str], message: bytes,
               msg_id: str = "") -> defer.Deferred[str | None]:
        """Deliver a message made here (a bounce) to addresses routed like local mail.

        Inbound recipients are expanded through the directory (unknown ones dropped);
        every other one is queued.  ``message`` is complete, CRLF line endings;
        ``msg_id`` is the id of the message the bounce reports on (for the log).  A
        directory that cannot answer fails the Deferred (DirectoryError): nothing written.
        """
        found = Expansion(others=tuple(r.lower() for r in recipients))
        d = gather(lambda facts: policy.resolve_targets(self.cfg, facts, found), self.directory)
        return d.addCallback(lambda targets: self._write(sender, list(targets[0]), list(targets[1]), b"",
                                                         message, msg_id))

    def _by_sender(self, sender: str, decisions: Sequence[policy.Decision]) -> dict[str, list[str]]:
        """The remote recipients grouped by the envelope sender each gets (SRS for forwards)."""
        groups: dict[str, list[str]] = {}
        local_sender = not sender or sender.rpartition("@")[2].lower() in self.cfg.domains
        inbound = self.cfg.inbound_domains()
        for d in decisions:
            if not d.remote:
                continue
            envelope = sender
            if self.srs is not None and not local_sender and d.rule in FORWARDING_RULES and inbound:
                domain = d.recipient.rpartition("@")[2].lower()
                try:
                    envelope = self.srs.forward(sender, domain if domain in inbound else inbound[0], self.now())
                except SRSError:
                    envelope = sender
            group = groups.setdefault(envelope, [])
            group.extend(r for r in d.remote if r not in group)
        return groups

    def _write(self, sender: str, mailboxes: list[str], remote: list[str],
               received: bytes, message: bytes, msg_id: str = "") -> defer.Deferred[str | None]:
        return self._write_groups({sender: remote} if remote else {}, mailboxes, sender, received, message, msg_id)

    def _write_groups(self, groups: dict[str, list[str]], mailboxes: list[str], sender: str,
                      received: bytes, message: bytes, msg_id: str = "") -> defer.Deferred[str | None]:
        """One transaction: every local copy and the queue entries (one per envelope
        sender) become durable and visible together, then the Deferred fires and the
        runner is woken; on any failure nothing is left and the Deferred fails."""
        parts: list[Part] = []
        entries: list[StagedEntry] = []
        try:
            if mailboxes:
                paths = [self._maildir(m) for m in mailboxes]
                return_path = f"Return-Path: <{sender}>\r\n".encode("utf-8", "replace")
                copy = return_path + received + message
                parts.append(maildir.Copies(self._root(), paths, copy) if self.sizes is None
                             else CountedCopies(self._root(), paths, copy, self.sizes))
            for envelope, remote in groups.items():
                entries.append(self.queue.prepare(envelope, remote, received + message, msg_id=msg_id))
            parts.extend(entries)
        except Exception:
            return defer.fail()
        if not parts:
            return defer.succeed(None)
        return self.commit.commit(parts).addCallback(self._committed, entries)

    def _committed(self, _parts: object, entries: list[StagedEntry]) -> str | None:
        if not entries:
            return None
        _logged(entries, "queued")
        self.wake()
        return entries[0].id

    def _root(self) -> str:
        """The folder holding the maildirs, as a string (computed once per configuration)."""
        if self._mail_root is None or self._mail_root[0] is not self.cfg:
            self._mail_root = (self.cfg, os.fspath(self.cfg.mail_dir))
        return self._mail_root[1]

    def _maildir(self, mailbox: str) -> str:
        """The maildir of a mailbox, as a string (remembered: this is the hot path)."""
        path = self._maildirs.get(mailbox)
        if path is None:
            path = os.fspath(maildir.maildir_path(self.cfg.mail_dir, mailbox))
            if len(self._maildirs) < 10_000:
                self._maildirs[mailbox] = path
        return path


def _logged(entries: list[StagedEntry], state: str) -> list[StagedEntry]:
    """Log each new queue entry with the SMTP message id it carries (``grep`` follows it)::

        mailguard outbound: id=66190428394dccdf61af0 msg=2K7F3Q1X9B state=queued from=<joe@example.com> to=<ann@remote.example>
    """
    for staged in entries:
        e = staged.entry
        log.info("{line}", line=(
            f"mailguard outbound: id={e.id} msg={e.msg_id or '-'} state={state} from=<{e.sender}> "
            f"to={','.join(f'<{r.address}>' for r in e.recipients)}"))
    return entries
