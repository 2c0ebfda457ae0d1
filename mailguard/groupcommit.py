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
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from mailguard import maildir

MAX_BATCH = 256


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNCFS = _load_syncfs()


@dataclass
class _Job:
    maildirs: list[Path]
    message: bytes
    deferred: defer.Deferred
    staged: list[tuple[Path, Path]] = field(default_factory=list)   # (tmp, final)
    placed: list[Path] = field(default_factory=list)

    def cleanup(self) -> None:
        for p in self.placed + [tmp for tmp, _ in self.staged]:
            try:
                os.unlink(p)
            except OSError:
                pass


class GroupCommit:
    """Stores messages into maildirs durably, batching the syncs; see the module docstring.

    :param reactor: where results are delivered (``callFromThread``).
    :param root: a folder on the filesystem holding the maildirs (for ``syncfs``).
    """

    def __init__(self, reactor: Any, root: Path, use_syncfs: bool = True) -> None:
        self.reactor = reactor
        self.root = Path(root)
        self.syncfs = _SYNCFS if use_syncfs else None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0
        self.messages = 0

    def deliver(self, maildirs: list[Path], message: bytes) -> defer.Deferred:
        """Store one copy of the CRLF ``message`` in each maildir; fire when all are durable."""
        d: defer.Deferred = defer.Deferred()
        self._jobs.put(_Job(list(maildirs), message, d))
        self._start()
        return d

    def stop(self) -> None:
        """Let the writer thread finish what it has and end."""
        if self._thread is not None:
            self._jobs.put(None)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="mailguard-groupcommit", daemon=True)
                self._thread.start()

    # -- the writer thread ---------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
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
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Job]) -> None:
        live: list[_Job] = []
        for job in batch:
            try:
                self._stage(job)
                live.append(job)
            except Exception:
                job.cleanup()
                self._fail(job, Failure())
        if not live:
            return
        try:
            self._sync_data(live)
        except OSError:
            f = Failure()
            for job in live:
                job.cleanup()
                self._fail(job, f)
            return
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
        for job in published:
            names = [p.name for p in job.placed]
            self.reactor.callFromThread(job.deferred.callback, names)

    def _stage(self, job: _Job) -> None:
        lf, suffix = maildir.stored_form(job.message)
        fsync_each = self.syncfs is None
        for box in job.maildirs:
            name = maildir.unique_name(suffix)
            tmp = maildir.write_tmp(box, name, lf, fsync=fsync_each)
            job.staged.append((tmp, box / "new" / name))

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
        for folder in dict.fromkeys(p.parent for job in jobs for p in job.placed):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _fail(self, job: _Job, failure: Failure) -> None:
        self.reactor.callFromThread(job.deferred.errback, failure)
