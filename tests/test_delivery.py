"""Tests for mailguard.storage.delivery: one message, local copies and queue entry, as one transaction.

The real :class:`Store`, :class:`GroupCommit` and :class:`Queue` run on a temporary
folder; the sync and rename primitives of :mod:`mailguard.storage.safeio` are
wrapped by recorders that still call the real functions, so the tests see the order
the production path makes its writes durable and visible in.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from twisted.python.failure import Failure

from conftest import make_config
from test_groupcommit import ThreadReactor, results_of

from mailguard.core import policy, replies
from mailguard.storage import maildir, safeio
from mailguard.storage.delivery import Store
from mailguard.storage.groupcommit import GroupCommit
from mailguard.storage.queue import Queue

MESSAGE = b"From: joe@here.example\r\nSubject: hi\r\n\r\nbody\r\n"
RECEIVED = b"Received: from client by mx.here.example\r\n"
LOCAL = ("ann@here.example", "bob@here.example")
REMOTE = "zoe@far.example"


class Rig:
    """A Store on the real group commit and queue, with every sync, rename and wake-up recorded."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_syncfs: bool = True) -> None:
        self.cfg = make_config(tmp_path, server={"data_dir": str(tmp_path / "var")},
                               domains={"here.example": {"route": "inbound"}})
        self.cfg.mail_dir.mkdir(parents=True)
        self.reactor = ThreadReactor()
        self.queue = Queue(self.cfg.queue_dir)
        self.commit = GroupCommit(self.reactor, self.cfg.mail_dir, use_syncfs=use_syncfs)
        self.store = Store(self.cfg, None, self.queue, wake=lambda: self.events.append(("wake", "")),  # type: ignore[arg-type]
                           commit=self.commit)
        self.events: list[tuple[str, str]] = []
        self.live_at_sync: list[list[str]] = []     # what the runner could see at each sync
        self.fail: dict[str, Exception] = {}
        self._record(monkeypatch)

    def _record(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = {name: getattr(safeio, name) for name in ("fsync", "fsync_dir", "syncfs", "rename")}

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            real["fsync"](fd)

        def fsync_dir(path: Any) -> None:
            self.events.append(("fsync_dir", os.fspath(path)))
            self.live_at_sync.append(self.queue.ids())
            real["fsync_dir"](path)

        def syncfs(path: Any) -> None:
            self.events.append(("syncfs", os.fspath(path)))
            self.live_at_sync.append(self.queue.ids())
            if "syncfs" in self.fail and sum(e[0] == "syncfs" for e in self.events) == 2:
                raise self.fail["syncfs"]
            real["syncfs"](path)

        def rename(src: Any, dst: Any) -> None:
            self.events.append(("rename", os.fspath(dst)))
            real["rename"](src, dst)

        for name, fn in (("fsync", fsync), ("fsync_dir", fsync_dir), ("syncfs", syncfs), ("rename", rename)):
            monkeypatch.setattr(safeio, name, fn)

    def store_one(self, mailboxes: tuple[str, ...] = LOCAL, remote: tuple[str, ...] = (REMOTE,)) -> Any:
        """Store one message; the Deferred's result (the queue id, or a Failure)."""
        decisions = [policy.Decision(replies.RECIPIENT_OK, "test", m, mailboxes=(m,)) for m in mailboxes]
        decisions += [policy.Decision(replies.RECIPIENT_OK, "test", r, remote=(r,)) for r in remote]
        result = results_of(self.store.store("id", "joe@here.example", decisions, RECEIVED, MESSAGE))
        self.reactor.run_until([result])
        self.events.append(("fired", ""))
        self.commit.stop()
        return result[0]

    def box(self, mailbox: str) -> Path:
        local, _, domain = mailbox.partition("@")
        return self.cfg.mail_dir / domain / local

    def in_sight(self) -> dict[str, list[str]]:
        """What a POP3 reader and the queue runner can see: new/ of each mailbox, live queue entries."""
        seen = {m: sorted(os.listdir(self.box(m) / "new")) if (self.box(m) / "new").is_dir() else []
                for m in LOCAL}
        seen["queue"] = self.queue.ids()
        return seen

    def leftovers(self) -> list[str]:
        """Every file under tmp/ of the mailboxes and in the queue folder (staged or not)."""
        out = []
        for m in LOCAL:
            tmp = self.box(m) / "tmp"
            out += [str(tmp / n) for n in os.listdir(tmp)] if tmp.is_dir() else []
        if self.cfg.queue_dir.is_dir():
            out += [str(self.cfg.queue_dir / n) for n in os.listdir(self.cfg.queue_dir)]
        return out


@pytest.mark.parametrize("use_syncfs", [True, False])
def test_everything_is_synced_before_it_is_renamed_and_renamed_before_the_answer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, use_syncfs: bool) -> None:
    """Data sync of every copy -> every publishing rename -> sync of the renames -> the Deferred
    fires (the 250) and the runner is woken; the queue entry is out of the runner's sight until then."""
    rig = Rig(tmp_path, monkeypatch, use_syncfs)
    for m in LOCAL:
        maildir._create(rig.box(m))     # watch a plain delivery, not the making of folders
    rig.cfg.queue_dir.mkdir()
    rig.events.clear()
    queue_id = rig.store_one()
    assert isinstance(queue_id, str)
    kinds = [k for k, _ in rig.events]
    renames = [p for k, p in rig.events if k == "rename"]
    new_copies = [str(rig.box(m) / "new" / n) for m in LOCAL for n in os.listdir(rig.box(m) / "new")]
    queue_files = [str(rig.queue.message_path(queue_id)), str(rig.queue.envelope_path(queue_id))]
    assert renames == new_copies + queue_files          # the envelope, which makes the entry live, last
    first_rename, last_rename = kinds.index("rename"), len(kinds) - 1 - kinds[::-1].index("rename")
    before, after = rig.events[:first_rename], rig.events[last_rename + 1:]
    if use_syncfs:
        assert before == [("syncfs", str(rig.cfg.mail_dir))]       # one filesystem: one sync
        assert after == [("syncfs", str(rig.cfg.mail_dir)), ("wake", ""), ("fired", "")]
    else:
        synced = [p for k, p in before if k == "fsync"]
        staged = sorted(synced)
        assert len(staged) == 4 and all("/tmp/" in p or "/.tmp-" in p for p in staged)
        assert sorted(after[:-2]) == sorted(("fsync_dir", d) for d in
                                            [str(rig.box(m) / "new") for m in LOCAL] + [str(rig.cfg.queue_dir)])
        assert after[-2:] == [("wake", ""), ("fired", "")]
    assert rig.live_at_sync[-1] == []                   # not live for the runner before it is durable
    assert rig.in_sight()["queue"] == [queue_id]
    assert sorted(rig.leftovers()) == sorted(queue_files)


def test_a_failing_local_write_queues_nothing_and_publishes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One mailbox cannot be written: the store fails (451), no copy reaches any new/, no queue
    entry exists, nothing staged is left, and the runner is not woken."""
    rig = Rig(tmp_path, monkeypatch)
    bob = rig.box("bob@here.example")
    bob.mkdir(parents=True)
    (bob / "tmp").write_text("a file where a folder should be")
    result = rig.store_one()
    assert isinstance(result, Failure) and result.check(OSError)
    assert rig.in_sight() == {"ann@here.example": [], "bob@here.example": [], "queue": []}
    assert rig.leftovers() == []
    assert ("wake", "") not in rig.events and "rename" not in [k for k, _ in rig.events]


def test_a_failing_queue_write_publishes_no_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The queue entry cannot be written: no local copy is published either."""
    rig = Rig(tmp_path, monkeypatch)
    real_open = os.open

    def open_(path: Any, *args: Any) -> int:
        if os.fspath(path).startswith(str(rig.cfg.queue_dir / ".tmp-")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", open_)
    result = rig.store_one()
    monkeypatch.setattr(os, "open", real_open)
    assert isinstance(result, Failure) and result.check(OSError)
    assert rig.in_sight() == {"ann@here.example": [], "bob@here.example": [], "queue": []}
    assert [p for p in rig.leftovers() if "/tmp/" in p] == []
    assert ("wake", "") not in rig.events


def test_a_failed_sync_after_publishing_withdraws_every_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sync of the renames fails: the copies and the queue entry are unlinked again, no 250."""
    rig = Rig(tmp_path, monkeypatch)
    rig.fail["syncfs"] = OSError(5, "Input/output error")
    result = rig.store_one()
    assert isinstance(result, Failure) and result.check(OSError)
    assert [k for k, _ in rig.events].count("rename") == 4
    assert rig.in_sight() == {"ann@here.example": [], "bob@here.example": [], "queue": []}
    failed_sync = [i for i, (k, _) in enumerate(rig.events) if k == "syncfs"][1]
    withdrawn = sorted(p for k, p in rig.events[failed_sync:] if k == "fsync_dir")
    assert withdrawn == sorted([str(rig.box(m) / "new") for m in LOCAL] + [str(rig.cfg.queue_dir)])
    assert rig.leftovers() == []
    assert ("wake", "") not in rig.events


def test_local_only_mail_touches_no_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Mail for local mailboxes only: no queue id, no queue folder, no wake-up."""
    rig = Rig(tmp_path, monkeypatch)
    assert rig.store_one(remote=()) is None
    assert [len(v) for v in rig.in_sight().values()] == [1, 1, 0]
    assert not rig.cfg.queue_dir.exists() and ("wake", "") not in rig.events
