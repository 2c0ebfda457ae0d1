"""Tests for mailguard.storage.groupcommit: batched durable delivery transactions."""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.python.failure import Failure

from mailguard.storage import safeio
from mailguard.storage.groupcommit import GroupCommit, _Job
from mailguard.storage.maildir import Copies

MESSAGE = b"Return-Path: <a@b.example>\r\nSubject: hi\r\n\r\nbody\r\n.dot\r\n"


class ThreadReactor:
    """Collects callFromThread calls so the test thread can run them."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = queue.SimpleQueue()

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        self.calls.put((f, args))

    def run_one(self, timeout: float = 10) -> None:
        f, args = self.calls.get(timeout=timeout)
        f(*args)

    def run_until(self, results: list[list[Any]], timeout: float = 10) -> int:
        """Run calls until every result list is filled; return how many calls it took."""
        n = 0
        while not all(results):
            self.run_one(timeout)
            n += 1
        return n


def results_of(d: Any) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def files(box: Path, folder: str) -> list[Path]:
    return sorted((box / folder).iterdir()) if (box / folder).is_dir() else []


@pytest.mark.parametrize("use_syncfs", [True, False])
def test_batch_lands_in_new_with_lf_endings_and_sizes(tmp_path: Path, use_syncfs: bool) -> None:
    """Two messages, three maildirs: every copy is in new/ (LF endings, S= and W= sizes), tmp/ is empty."""
    reactor = ThreadReactor()
    gc = GroupCommit(reactor, tmp_path, use_syncfs=use_syncfs)
    a, b, c = tmp_path / "d" / "a", tmp_path / "d" / "b", tmp_path / "d" / "c"
    first = results_of(gc.deliver([a, b], MESSAGE))
    second = results_of(gc.deliver([c], MESSAGE))
    reactor.run_until([first, second])
    gc.stop()
    assert len(first[0]) == 2 and len(second[0]) == 1
    for box in (a, b, c):
        (stored,) = files(box, "new")
        data = stored.read_bytes()
        assert data == MESSAGE.replace(b"\r\n", b"\n")
        assert stored.name.endswith(f",S={len(data)},W={len(MESSAGE)}")
        assert files(box, "tmp") == []
    assert gc.messages == 2


def test_a_failing_maildir_fails_only_its_own_delivery(tmp_path: Path) -> None:
    """A maildir that cannot be written fails its whole transaction and leaves nothing; the batch's others land."""
    reactor = ThreadReactor()
    gc = GroupCommit(reactor, tmp_path)
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where a folder should be")
    good = tmp_path / "good"
    d_bad = _Job([Copies(tmp_path, [str(good), str(blocker / "x")], MESSAGE)], _deferred())
    d_good = _Job([Copies(tmp_path, [str(good)], MESSAGE)], _deferred())
    gc._commit([d_bad, d_good])
    bad_result, good_result = results_of(d_bad.deferred), results_of(d_good.deferred)
    reactor.run_until([bad_result, good_result])
    assert isinstance(bad_result[0], Failure) and bad_result[0].check(OSError)
    assert isinstance(good_result[0], list)
    assert len(files(good, "new")) == 1          # only the good delivery's copy
    assert files(good, "tmp") == []


def test_a_failed_sync_fails_the_batch_and_removes_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the sync after the renames fails, no 250 is given and nothing stays in new/."""
    reactor = ThreadReactor()
    gc = GroupCommit(reactor, tmp_path)
    calls = {"n": 0}
    real = safeio.syncfs

    def flaky(path: str) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(5, "I/O error")
        real(path)

    monkeypatch.setattr(safeio, "syncfs", flaky)
    box = tmp_path / "box"
    (result,) = [results_of(gc.deliver([box], MESSAGE))]
    reactor.run_until([result])
    gc.stop()
    assert calls["n"] == 2
    assert isinstance(result[0], Failure) and result[0].check(OSError)
    assert files(box, "new") == [] and files(box, "tmp") == []


def test_concurrent_deliveries_are_batched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliveries queued while a sync runs share the next batch: fewer batches than messages."""
    reactor = ThreadReactor()
    gc = GroupCommit(reactor, tmp_path)
    gate = threading.Event()
    real = safeio.syncfs

    def slow_sync(path: str) -> None:
        gate.wait(5)
        real(path)

    monkeypatch.setattr(safeio, "syncfs", slow_sync)
    ds = [results_of(gc.deliver([tmp_path / "m" / str(i % 3)], MESSAGE)) for i in range(30)]
    gate.set()
    wakeups = reactor.run_until(ds)
    gc.stop()
    assert all(isinstance(r[0], list) for r in ds)
    assert gc.messages == 30
    assert gc.batches < 30
    assert wakeups == gc.batches          # one reactor wake-up per batch
    assert sum(len(files(tmp_path / "m" / str(i), "new")) for i in range(3)) == 30


def test_syncfs_is_found_on_linux() -> None:
    """On Linux the fast path is available (else every delivery pays two fsyncs)."""
    if os.uname().sysname == "Linux":
        assert safeio.HAVE_SYNCFS


def _deferred() -> Any:
    from twisted.internet import defer
    return defer.Deferred()


def test_an_unexpected_error_fails_the_batch_and_the_writer_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug (not an OSError) in one batch answers its deliveries with a failure; the next batch lands."""
    reactor = ThreadReactor()
    gc = GroupCommit(reactor, tmp_path)
    real = safeio.syncfs
    calls = {"n": 0}

    def buggy(path: str) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise TypeError("a bug")
        real(path)

    monkeypatch.setattr(safeio, "syncfs", buggy)
    first = results_of(gc.deliver([tmp_path / "a"], MESSAGE))
    reactor.run_until([first])
    assert isinstance(first[0], Failure) and first[0].check(TypeError)
    assert files(tmp_path / "a", "tmp") == []
    second = results_of(gc.deliver([tmp_path / "a"], MESSAGE))
    reactor.run_until([second])
    gc.stop()
    assert isinstance(second[0], list)
    assert len(files(tmp_path / "a", "new")) == 1


def _renaming_threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the name of the thread that does each rename into ``new/``."""
    names: list[str] = []
    real = safeio.rename

    def rename(src: str, dst: str) -> None:
        names.append(threading.current_thread().name)
        real(src, dst)

    monkeypatch.setattr(safeio, "rename", rename)
    return names


def test_a_lone_delivery_is_published_by_the_stager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing else to do, the stager renames and syncs the batch itself: no hand-over
    to the publisher thread between the client's message and its 250.  The files still
    land in new/ and tmp/ is left empty."""
    renamers = _renaming_threads(monkeypatch)
    reactor = ThreadReactor()
    gc = GroupCommit(reactor, tmp_path)
    for _ in range(3):
        done = results_of(gc.deliver([tmp_path / "a"], MESSAGE))
        reactor.run_until([done])
        assert isinstance(done[0], list)
    gc.stop()
    assert renamers == ["mailguard-stage"] * 3
    assert gc.inline == 3
    assert len(files(tmp_path / "a", "new")) == 3 and files(tmp_path / "a", "tmp") == []


def test_under_load_the_publisher_overlaps_the_next_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deliveries waiting while a batch is staged: that batch goes to the publisher thread, so
    the next batch's first sync runs beside its second."""
    renamers = _renaming_threads(monkeypatch)
    reactor = ThreadReactor()
    gc = GroupCommit(reactor, tmp_path)
    gate, syncing = threading.Event(), threading.Event()
    real = safeio.syncfs

    def slow_sync(path: str) -> None:
        syncing.set()
        gate.wait(5)
        real(path)

    monkeypatch.setattr(safeio, "syncfs", slow_sync)
    ds = [results_of(gc.deliver([tmp_path / "m"], MESSAGE))]
    assert syncing.wait(5)                # the first batch is being synced: the rest waits
    ds += [results_of(gc.deliver([tmp_path / "m"], MESSAGE)) for _ in range(19)]
    gate.set()
    reactor.run_until(ds)
    gc.stop()
    assert all(isinstance(r[0], list) for r in ds)
    assert renamers[0] == "mailguard-publish"
    assert len(files(tmp_path / "m", "new")) == 20
