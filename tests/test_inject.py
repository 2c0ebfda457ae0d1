"""Tests for Store.inject: bounces routed through the directory like local mail."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from mailguard.directory.base import DirectoryError
from mailguard.storage import maildir
from mailguard.storage.delivery import Store
from mailguard.storage.groupcommit import Part
from mailguard.storage.queue import Queue

from conftest import OFFICE, FakeDirectory, LogCapture, make_config
from delivery_helpers import commit_inline

DSN = b"From: MAILER-DAEMON@mx.office.example\r\nSubject: Undelivered\r\n\r\nSorry.\r\n"


def sync(f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(f, *args)


class Commit:
    """The real group commit run in line; records each transaction's maildir copies."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[list[str], bytes]] = []

    def commit(self, parts: list[Part]) -> defer.Deferred[Any]:
        for part in parts:
            if isinstance(part, maildir.Copies):
                self.deliveries.append(([str(p) for p in part.maildirs], part.message))
        return defer.maybeDeferred(commit_inline, parts)


def setup(tmp_path: Path) -> tuple[Store, FakeDirectory, Queue, Commit]:
    cfg = make_config(tmp_path, **{**OFFICE, "server": {"hostname": "mx.office.example", "data_dir": "data"}})
    gal = FakeDirectory()
    gal.add_mailbox("joe@compaq.example")
    queue = Queue(cfg.queue_dir)
    commit = Commit()
    store = Store(cfg, gal, queue, run_in_thread=sync, commit=commit)  # type: ignore[arg-type]
    return store, gal, queue, commit


def result(d: defer.Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "inject did not finish"
    return out[0]


def test_inject_routes_through_the_directory(tmp_path: Path) -> None:
    """A bounce to a rerouted local address lands in the mailbox; a remote one is queued."""
    store, gal, queue, commit = setup(tmp_path)
    assert not isinstance(result(store.inject("", ["Joe@DEC.example", "x@remote.example"], DSN)), Failure)
    [(paths, message)] = commit.deliveries
    assert paths == [str(maildir.maildir_path(store.cfg.mail_dir, "joe@compaq.example"))]
    assert message == b"Return-Path: <>\r\n" + DSN
    [entry] = queue.list()
    assert [r.address for r in entry.recipients] == ["x@remote.example"]
    [stored] = Path(paths[0], "new").iterdir()
    assert stored.read_bytes() == message.replace(b"\r\n", b"\n")


def test_a_bounce_is_queued_under_the_bounced_message_id(tmp_path: Path, logs: LogCapture) -> None:
    """The bounce's queue entry carries the id of the message it reports on, and says so in its log line."""
    store, gal, queue, commit = setup(tmp_path)
    entry_id = result(store.inject("", ["x@remote.example"], DSN, "2k7f3q1x9b"))
    assert queue.load(entry_id).msg_id == "2k7f3q1x9b"
    assert logs.matching("mailguard outbound:") == [
        f"mailguard outbound: id={entry_id} msg=2k7f3q1x9b state=queued from=<> to=<x@remote.example>"]


def test_inject_with_the_directory_down_fails_and_writes_nothing(tmp_path: Path) -> None:
    """The directory cannot answer: the Deferred fails with DirectoryError, nothing is stored
    (the bounce stays with the queue runner, which retries)."""
    store, gal, queue, commit = setup(tmp_path)
    gal.broken = True
    failure = result(store.inject("", ["joe@compaq.example", "x@remote.example"], DSN))
    assert isinstance(failure, Failure) and failure.check(DirectoryError)
    assert queue.list() == [] and commit.deliveries == []
