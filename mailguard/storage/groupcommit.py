"""Group commit: many maildir deliveries made durable by two filesystem syncs per batch.

Delivering one message the classic way costs two fsyncs (the file, then ``new/``),
and on a journalling filesystem each one waits for a journal commit: on the
project's reference machine that caps a mail host near 300 messages/s however
many clients send at once.  :class:`GroupCommit` runs deliveries in one writer
thread and batches them:

1. *stage*: every message of the batch is written to its maildir's ``tmp/``;
2. ``syncfs``: the files' data and directory entries are on disk;
3. *publish*: each file is renamed from ``tmp/`` into ``new/``;
4. ``syncfs``: the renames are on disk;
5. only now does each delivery's Deferred fire (and the client get its ``250``).

Steps 1-2 and 3-5 run in two threads, so one batch's first sync overlaps the
previous batch's second.

So a message appears in ``new/`` only after its content is durable (the maildir
rule), and is acknowledged only after the rename is durable too; a crash at any
instant leaves at worst an orphan in ``tmp/``, never a partial file in ``new/``
and never an acknowledged message missing.  While one batch syncs, the next one
gathers, so batches grow with load by themselves.

``syncfs(2)`` is Linux's; elsewhere (or if it fails to load) each file and each
``new/`` folder is fsynced instead, which is correct but slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from mailguard.storage import maildir

MAX_BATCH = 256


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _load_syncfs()


@dataclass
class _Job:
    maildirs: list[str]
    message: bytes
    deferred: defer.Deferred[list[str]]
    staged: list[tuple[str, str]] = field(default_factory=list)   # (tmp, final)
    placed: list[str] = field(default_factory=list)

    def cleanup(self) -> None:
        for p in self.placed + [tmp for tmp, _ in self.staged]:
            try:
                os.unlink(p)
            except OSError:
                pass


def _fire_all(results: list[tuple[defer.Deferred[list[str]], list[str]]]) -> None:
    for d, names in results:
        d.callback(names)


class GroupCommit:
    """Stores messages into maildirs durably, batching the syncs; see the module docstring.

    :param reactor: where results are delivered (``callFromThread``).
    :param root: a folder on the filesystem holding the maildirs (for ``syncfs``).
    """

    def __init__(self, reactor: IReactorFromThreads, root: Path, use_syncfs: bool = True) -> None:
        self.reactor = reactor
        self.root = Path(root)
        self.syncfs = _SYNCFS if use_syncfs else None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._published: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._publisher: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0
        self.messages = 0

    def deliver(self, maildirs: Sequence[str | os.PathLike[str]],
                message: bytes) -> defer.Deferred[list[str]]:
        """Store one copy of the CRLF ``message`` in each maildir; fire when all are durable."""
        d: defer.Deferred[list[str]] = defer.Deferred()
        self._jobs.put(_Job([os.fspath(m) for m in maildirs], message, d))
        self._start()
        return d

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
    # the stager writes a batch to tmp/ and syncs it, then hands it to the publisher,
    # which renames it into new/, syncs again and answers.

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
                self._published.put(live)
            if stop:
                self._published.put(None)
                return

    def _publish_loop(self) -> None:
        while True:
            batch = self._published.get()
            if batch is None:
                return
            try:
                self._publish_batch(batch)
            except Exception:
                self._fail_all(batch, Failure())

    def _commit(self, batch: list[_Job]) -> None:
        """Both stages for one batch, in the calling thread (tests)."""
        live = self._stage_batch(batch)
        if live:
            self._publish_batch(live)

    def _stage_batch(self, batch: list[_Job]) -> list[_Job]:
        live: list[_Job] = []
        for job in batch:
            try:
                self._stage(job)
                live.append(job)
            except Exception:
                job.cleanup()
                self._fail(job, Failure())
        if not live:
            return []
        try:
            self._sync_data(live)
        except OSError:
            f = Failure()
            for job in live:
                job.cleanup()
                self._fail(job, f)
            return []
        return live

    def _publish_batch(self, live: list[_Job]) -> None:
        published: list[_Job] = []
        for job in live:
            try:
                for tmp, final in job.staged:
                    os.rename(tmp, final)
                    job.placed.append(final)
                published.append(job)
            except OSError:
                job.cleanup()
                self._fail(job, Failure())
        try:
            self._sync_names(published)
        except OSError:
            f = Failure()
            for job in published:
                job.cleanup()
                self._fail(job, f)
            return
        self.batches += 1
        self.messages += len(published)
        results = [(job.deferred, [os.path.basename(p) for p in job.placed]) for job in published]
        # One wake-up of the reactor for the whole batch, not one per message.
        self.reactor.callFromThread(_fire_all, results)

    def _stage(self, job: _Job) -> None:
        lf, suffix = maildir.stored_form(job.message)
        fsync_each = self.syncfs is None
        for box in job.maildirs:
            name = maildir.unique_name(suffix)
            tmp = maildir.write_tmp(box, name, lf, fsync=fsync_each)
            job.staged.append((tmp, os.path.join(box, "new", name)))

    def _syncfs(self) -> None:
        assert self.syncfs is not None
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if self.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)

    def _sync_data(self, jobs: list[_Job]) -> None:
        if self.syncfs is not None:
            self._syncfs()
        # Without syncfs each file was fsynced as it was written.

    def _sync_names(self, jobs: list[_Job]) -> None:
        if self.syncfs is not None:
            self._syncfs()
            return
        for folder in dict.fromkeys(os.path.dirname(p) for job in jobs for p in job.placed):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _fail_all(self, batch: list[_Job], failure: Failure) -> None:
        for job in batch:
            if not job.deferred.called:
                job.cleanup()
                self._fail(job, failure)

    def _fail(self, job: _Job, failure: Failure) -> None:
        self.reactor.callFromThread(job.deferred.errback, failure)
