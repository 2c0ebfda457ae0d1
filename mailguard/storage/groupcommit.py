"""Group commit: delivery transactions made durable by two filesystem syncs per batch.

A delivery is one transaction: every local copy of a message and its queue entry
for the remote recipients appear together, once all of them are durable, or none
does.  Each transaction is a list of parts (:class:`Part`:
:class:`mailguard.storage.maildir.Copies`, :class:`mailguard.storage.queue.StagedEntry`)
that can write their files under names no reader looks at and say where each goes.

Delivering one message the classic way costs two fsyncs per file (the data, then
the folder), and on a journalling filesystem each one waits for a journal commit:
on the project's reference machine that caps a mail host near 300 messages/s
however many clients send at once.  :class:`GroupCommit` runs transactions in
writer threads and batches them:

1. *stage*: every part of every transaction of the batch writes its files
   (maildir ``tmp/``, the queue's ``.tmp-*`` names);
2. ``syncfs``: the files' data are on disk (one sync per filesystem touched);
3. *publish*: each file is renamed to its final name (``new/``; the queue entry's
   message, then its envelope);
4. ``syncfs``: the renames are on disk;
5. only now does each transaction's Deferred fire (and the client get its ``250``;
   the store wakes the queue runner after that).

Steps 1-2 and 3-5 run in two threads, so one batch's first sync overlaps the
previous batch's second.  While one batch syncs, the next one gathers, so batches
grow with load by themselves.  When nothing is waiting to be staged and the
publisher is idle, the stager publishes the batch itself: there is nothing to
overlap, and handing it over would only add a thread wake-up to the time the
client waits for its ``250``.

So nothing is renamed into sight before the data of the whole message is durable
everywhere (the maildir rule, extended to the queue), and nothing is acknowledged
before the renames are durable too.  The queue keeps an entry out of the runner's
sight until its transaction is over (:meth:`Part.finish`).  Any failure aborts the
transaction: its published names and staged files are unlinked and the Deferred
fails (the client gets a 451 and retries; nothing it could duplicate went out).  A
crash at any instant leaves at worst staged files under ignored names, never a
partial file in sight and never an acknowledged message missing.

``syncfs(2)`` is Linux's; elsewhere each file is fsynced as it is written and each
folder renamed into is fsynced after the renames, which is correct but slower.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from twisted.internet import defer
from twisted.python.failure import Failure

from mailguard.storage import maildir, safeio

MAX_BATCH = 256


class Part(Protocol):
    """One store's share of a delivery transaction."""

    #: A folder on the filesystem the part writes to (what ``syncfs`` is given).
    root: str

    def stage(self, staged: list[tuple[str, str]], sync: bool) -> None:
        """Write the part's files under ignored names; append (staged, final) for each,
        in publishing order, as soon as the file exists.  With ``sync`` fsync each file.
        On failure raise (what was appended is cleaned up by the caller)."""

    def finish(self, published: bool) -> None:
        """The transaction is over: durable and in sight (True) or aborted (False)."""


@dataclass
class _Job:
    parts: Sequence[Part]
    deferred: defer.Deferred[Sequence[Part]]
    staged: list[tuple[str, str]] = field(default_factory=list)   # (tmp, final)
    placed: list[str] = field(default_factory=list)
    done: bool = False          # answered (or about to be, through the reactor)

    def abort(self) -> None:
        """Unlink everything the job wrote, the published names first (the last one first).

        Published names are withdrawn durably (best effort: the disk is failing), so
        a crash cannot bring back a copy the client was told to send again.
        """
        for p in reversed(self.placed):
            safeio.unlink_quietly(p)
        for tmp, _ in self.staged:
            safeio.unlink_quietly(tmp)
        for folder in dict.fromkeys(os.path.dirname(p) for p in self.placed):
            try:
                safeio.fsync_dir(folder)
            except OSError:
                pass
        self.finish(False)

    def finish(self, published: bool) -> None:
        for part in self.parts:
            try:
                part.finish(published)
            except Exception:
                pass


def _fire_all(results: list[tuple[defer.Deferred[Sequence[Part]], Sequence[Part]]]) -> None:
    for d, parts in results:
        d.callback(parts)


class GroupCommit:
    """Commits delivery transactions durably, batching the syncs; see the module docstring.

    :param reactor: where results are delivered (``callFromThread``).
    :param root: a folder on the filesystem holding the maildirs (for :meth:`deliver`).
    """

    def __init__(self, reactor: Any, root: Path | str, use_syncfs: bool = True) -> None:
        self.reactor = reactor
        self.root = os.fspath(root)
        self.use_syncfs = use_syncfs and safeio.HAVE_SYNCFS
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._published: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._publisher: threading.Thread | None = None
        self._lock = threading.Lock()
        self._handed = 0                 # batches given to the publisher and not yet done
        self._devices: dict[str, int] = {}
        #: Batches the stager published itself (nothing else to do).
        self.inline = 0
        self.batches = 0
        self.messages = 0

    def commit(self, parts: Sequence[Part]) -> defer.Deferred[Sequence[Part]]:
        """Make every part durable and visible as one transaction; fire (with ``parts``) then.

        The Deferred fails, and nothing of the transaction is left, when any part fails.
        """
        d: defer.Deferred[Sequence[Part]] = defer.Deferred()
        self._jobs.put(_Job(list(parts), d))
        thread = self._thread
        if thread is None or not thread.is_alive():     # checked again under the lock
            self._start()
        return d

    def deliver(self, maildirs: Sequence[str | Path], message: bytes) -> defer.Deferred[list[str]]:
        """Store one copy of the CRLF ``message`` in each maildir; fire with the file names."""
        copies = maildir.Copies(self.root, maildirs, message)
        return self.commit([copies]).addCallback(lambda _: copies.names)

    def stop(self) -> None:
        """Let the writer threads finish what they have and end."""
        if self._thread is not None:
            self._jobs.put(None)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mailguard-stage", daemon=True)
                self._publisher = threading.Thread(target=self._publish_loop, name="mailguard-publish",
                                                   daemon=True)
                self._thread.start()
                self._publisher.start()

    # -- the writer threads --------------------------------------------------------
    #
    # Two stages, so that one batch's first sync overlaps the previous batch's second:
    # the stager writes a batch under its staged names and syncs it, then hands it to
    # the publisher, which renames it into sight, syncs again and answers.

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                self._published.put(None)
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            try:
                live = self._stage_batch(batch)
            except Exception:                  # a bug must not kill the writer: fail the batch
                self._fail_all(batch, Failure())
                live = []
            if live:
                self._hand_over(live)
            if stop:
                self._published.put(None)
                return

    def _hand_over(self, live: list[_Job]) -> None:
        """Give a staged batch to the publisher, or publish it here when nothing would overlap."""
        with self._lock:
            inline = self._handed == 0 and self._jobs.empty()
            if not inline:
                self._handed += 1
        if not inline:
            self._published.put(live)
            return
        self.inline += 1
        self._publish_guarded(live)

    def _publish_loop(self) -> None:
        while True:
            batch = self._published.get()
            if batch is None:
                return
            self._publish_guarded(batch)
            with self._lock:
                self._handed -= 1

    def _publish_guarded(self, batch: list[_Job]) -> None:
        try:
            self._publish_batch(batch)
        except Exception:                      # a bug must not kill the writer: fail the batch
            self._fail_all(batch, Failure())

    def _commit(self, batch: list[_Job]) -> None:
        """Both stages for one batch, in the calling thread (tests)."""
        live = self._stage_batch(batch)
        if live:
            self._publish_batch(live)

    def _stage_batch(self, batch: list[_Job]) -> list[_Job]:
        live: list[_Job] = []
        sync_each = not self.use_syncfs
        for job in batch:
            try:
                for part in job.parts:
                    part.stage(job.staged, sync_each)
                live.append(job)
            except Exception:
                self._fail(job, Failure())
        if not live:
            return []
        try:
            if self.use_syncfs:
                self._syncfs(live)
            # Without syncfs each file was fsynced as it was written.
        except OSError:
            f = Failure()
            for job in live:
                self._fail(job, f)
            return []
        return live

    def _publish_batch(self, live: list[_Job]) -> None:
        published: list[_Job] = []
        for job in live:
            try:
                for tmp, final in job.staged:
                    safeio.rename(tmp, final)
                    job.placed.append(final)
                published.append(job)
            except OSError:
                self._fail(job, Failure())
        try:
            if self.use_syncfs:
                self._syncfs(published)
            else:
                for folder in dict.fromkeys(os.path.dirname(p) for job in published for p in job.placed):
                    safeio.fsync_dir(folder)
        except OSError:
            f = Failure()
            for job in published:
                self._fail(job, f)
            return
        self.batches += 1
        self.messages += len(published)
        for job in published:
            job.done = True
            job.finish(True)
        results = [(job.deferred, job.parts) for job in published]
        # One wake-up of the reactor for the whole batch, not one per message.
        self.reactor.callFromThread(_fire_all, results)

    def _syncfs(self, jobs: list[_Job]) -> None:
        """One ``syncfs`` per filesystem the jobs wrote to."""
        roots = dict.fromkeys(part.root for job in jobs for part in job.parts)
        done: set[int] = set()
        for root in roots:
            device = self._devices.get(root)
            if device is None:
                device = self._devices[root] = os.stat(root).st_dev
            if device not in done:
                done.add(device)
                safeio.syncfs(root)

    def _fail_all(self, batch: list[_Job], failure: Failure) -> None:
        for job in batch:
            if not job.done:
                self._fail(job, failure)

    def _fail(self, job: _Job, failure: Failure) -> None:
        """Abort the job: nothing of it stays; its Deferred fails."""
        job.done = True
        job.abort()
        self.reactor.callFromThread(job.deferred.errback, failure)
