"""Tests for mailguard.storage.queue: the durable on-disk outbound queue."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from mailguard.storage import queue as queue_mod
from mailguard.storage import safeio
from mailguard.storage.queue import DELIVERED, FAILED, PENDING, Queue, QueueError, format_entry

MESSAGE = b"Received: from a\r\nSubject: x\r\n\r\nbody\r\n"


def test_enqueue_stores_message_and_envelope(tmp_path: Path) -> None:
    """enqueue returns an id whose message bytes and pending recipients load back."""
    q = Queue(tmp_path / "queue")
    entry_id = q.enqueue("joe@here.example", ["a@r.example", "b@s.example", "a@r.example"], MESSAGE)
    assert q.read_message(entry_id) == MESSAGE
    entry = q.load(entry_id)
    assert entry.sender == "joe@here.example"
    assert [(r.address, r.state) for r in entry.recipients] == [("a@r.example", PENDING), ("b@s.example", PENDING)]
    assert [e.id for e in q.list()] == [entry_id]
    env = json.loads((tmp_path / "queue" / f"{entry_id}.env").read_text())
    assert env["version"] == 1 and env["recipients"][0]["state"] == "pending"


def test_null_sender_kept_empty(tmp_path: Path) -> None:
    """The null sender is stored as the empty string."""
    q = Queue(tmp_path)
    assert q.load(q.enqueue("", ["a@r.example"], MESSAGE)).sender == ""


def test_enqueue_is_durable_and_envelope_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both files are fsynced before any rename, the envelope is renamed last, then the folder
    is fsynced; a rewritten envelope is fsynced, renamed, and the folder fsynced."""
    events: list[str] = []
    real_fsync, real_rename, real_fsync_dir = safeio.fsync, safeio.rename, safeio.fsync_dir

    def fsync(fd: int) -> None:
        events.append("fsync " + Path(os.readlink(f"/proc/self/fd/{fd}")).name.split("-")[1])
        real_fsync(fd)

    def rename(src: str, dst: str) -> None:
        events.append("rename " + Path(dst).suffix)
        real_rename(src, dst)

    def fsync_dir(path: str) -> None:
        events.append("fsync-dir")
        real_fsync_dir(path)

    monkeypatch.setattr(safeio, "fsync", fsync)
    monkeypatch.setattr(safeio, "rename", rename)
    monkeypatch.setattr(safeio, "fsync_dir", fsync_dir)
    q = Queue(tmp_path)
    entry_id = q.enqueue("joe@here.example", ["a@r.example"], MESSAGE)
    assert events == [f"fsync {entry_id}.msg", f"fsync {entry_id}.env", "rename .msg", "rename .env", "fsync-dir"]
    events.clear()
    q.update(entry_id, lambda e: setattr(e.recipients[0], "attempts", 1))
    assert events == [f"fsync {entry_id}.env", "rename .env", "fsync-dir"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]


def test_message_without_envelope_is_not_live(tmp_path: Path) -> None:
    """A crash between the two writes leaves an orphan message that list() ignores and cleanup removes."""
    q = Queue(tmp_path)
    entry_id = q.enqueue("joe@here.example", ["a@r.example"], MESSAGE)
    (tmp_path / f"{entry_id}.env").unlink()
    young = q.enqueue("joe@here.example", ["a@r.example"], MESSAGE)
    (tmp_path / f"{young}.env").unlink()
    (tmp_path / ".tmp-x.env-1234").write_bytes(b"{")
    old = time.time() - 7200
    os.utime(tmp_path / f"{entry_id}.msg", (old, old))
    os.utime(tmp_path / ".tmp-x.env-1234", (old, old))
    assert q.list() == []
    assert sorted(q.cleanup()) == sorted([f"{entry_id}.msg", ".tmp-x.env-1234"])
    assert (tmp_path / f"{young}.msg").exists()


def test_update_rewrites_and_deletes_finished(tmp_path: Path) -> None:
    """update() persists state changes and deletes the entry once everything is done."""
    q = Queue(tmp_path)
    entry_id = q.enqueue("joe@here.example", ["a@r.example", "b@r.example"], MESSAGE)

    def first(e: queue_mod.QueueEntry) -> None:
        e.recipients[0].state = DELIVERED
        e.recipients[0].last_reply = "250 ok"

    q.update(entry_id, first)
    assert [r.state for r in q.load(entry_id).recipients] == [DELIVERED, PENDING]

    def second(e: queue_mod.QueueEntry) -> None:
        e.recipients[1].state = FAILED
        e.recipients[1].notified = True

    q.update(entry_id, second)
    assert q.ids() == []
    assert not (tmp_path / f"{entry_id}.msg").exists()


def test_delete_and_no_resurrection(tmp_path: Path) -> None:
    """delete() removes an entry; a later save (an attempt finishing) does not bring it back."""
    q = Queue(tmp_path)
    entry_id = q.enqueue("joe@here.example", ["a@r.example"], MESSAGE)
    entry = q.load(entry_id)
    assert q.delete(entry_id) is True
    assert q.delete(entry_id) is False
    assert q.save(entry) is False
    assert q.update(entry_id, lambda e: None) is None
    assert q.list() == []


def test_ids_are_checked(tmp_path: Path) -> None:
    """A queue id that is not one of ours (a path, say) is refused, not opened."""
    q = Queue(tmp_path)
    with pytest.raises(QueueError):
        q.delete("../../etc/passwd")
    with pytest.raises(QueueError):
        q.load("0" * 21)


def test_flush_trigger(tmp_path: Path) -> None:
    """request_flush creates the trigger file; take_flush_request consumes it once."""
    q = Queue(tmp_path / "q")
    assert q.take_flush_request() is False
    q.request_flush()
    assert (tmp_path / "q" / "flush").exists()
    assert q.take_flush_request() is True
    assert q.take_flush_request() is False


def test_format_entry(tmp_path: Path) -> None:
    """queue list shows id first, then age, sender, each recipient with its state and last reply."""
    q = Queue(tmp_path, clock=lambda: 1000.0)
    entry_id = q.enqueue("", ["a@r.example", "b@r.example"], MESSAGE)

    def change(e: queue_mod.QueueEntry) -> None:
        e.recipients[0].state = "deferred"
        e.recipients[0].last_reply = "451 4.3.0 later"
        e.recipients[1].state = DELIVERED
        e.recipients[1].last_reply = "250 ok"

    q.update(entry_id, change)
    line = format_entry(q.load(entry_id), now=1000.0 + 3 * 3600 + 5 * 60)
    assert line == f"{entry_id} 3h05m <> a@r.example=deferred(451 4.3.0 later) b@r.example=delivered"


def test_queue_list_says_empty_and_when_each_recipient_is_tried_next(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty queue is one line saying so; a deferred recipient shows its next try (or "now" once due)."""
    from mailguard.app import cli

    monkeypatch.setattr(time, "time", lambda: 1_764_420_000.0)

    (tmp_path / "mailguard.toml").write_text(f'[server]\ndata_dir = "{tmp_path / "var"}"\n')
    argv = ["--config", str(tmp_path / "mailguard.toml"), "queue", "list"]
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == "queue is empty\n"
    q = Queue(tmp_path / "var" / "queue")
    entry_id = q.enqueue("joe@here.example", ["a@r.example", "b@r.example"], MESSAGE)

    def change(e: queue_mod.QueueEntry) -> None:
        e.queued_at = time.time() - 125
        e.recipients[0].state = "deferred"
        e.recipients[0].last_reply = "451 4.3.0 later"
        e.recipients[0].next_attempt = time.time() + 3 * 3600 + 5 * 60 + 30
        e.recipients[1].state = "deferred"
        e.recipients[1].last_reply = "421 busy"
        e.recipients[1].next_attempt = time.time() - 10

    q.update(entry_id, change)
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == (
        f"{entry_id} 2m05s <joe@here.example> a@r.example=deferred(451 4.3.0 later, next try in 3h05m) "
        f"b@r.example=deferred(421 busy, next try now)\n")


def test_ids_sort_by_age(tmp_path: Path) -> None:
    """Entries list oldest first."""
    now = [5000.0]
    q = Queue(tmp_path, clock=lambda: now[0])
    first = q.enqueue("a@b.example", ["c@d.example"], MESSAGE)
    now[0] = 4000.0 + 2000
    second = q.enqueue("a@b.example", ["c@d.example"], MESSAGE)
    assert q.ids() == [first, second]


def test_queue_list_shows_damaged_entries_with_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unreadable envelope or a lost message file is listed as damaged (id first), not hidden."""
    from mailguard.app import cli

    (tmp_path / "mailguard.toml").write_text(f'[server]\ndata_dir = "{tmp_path / "var"}"\n')
    q = Queue(tmp_path / "var" / "queue", clock=lambda: time.time())
    good = q.enqueue("a@b.example", ["c@d.example"], MESSAGE)
    garbled = q.enqueue("a@b.example", ["c@d.example"], MESSAGE)
    q.envelope_path(garbled).write_bytes(b'{"version": 1, "id": "x", "recip')
    lost = q.enqueue("a@b.example", ["c@d.example"], MESSAGE)
    q.message_path(lost).unlink()
    assert cli.main(["--config", str(tmp_path / "mailguard.toml"), "queue", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == [good, garbled, lost]
    assert lines[0].startswith(f"{good} ") and "c@d.example=pending" in lines[0]
    assert lines[1].startswith(f"{garbled} DAMAGED unreadable envelope: JSONDecodeError: ")
    assert lines[2] == f"{lost} DAMAGED message file missing"
    assert [e.id for e in q.list()] == [good]           # the runner still skips them


def test_held_entry_keeps_its_reason_and_local_mailboxes(tmp_path: Path) -> None:
    """A quarantined message is stored held, with local mailboxes marked; the listing says HELD(reason)."""
    q = Queue(tmp_path)
    entry_id = q.enqueue("joe@here.example", ["a@r.example"], MESSAGE, held="virus  found",
                         local=["bob@here.example"])
    entry = q.load(entry_id)
    assert entry.held == "virus  found"
    assert [(r.address, r.local) for r in entry.recipients] == [("a@r.example", False), ("bob@here.example", True)]
    line = format_entry(entry, now=entry.queued_at)
    assert line == f"{entry_id} 0m00s <joe@here.example> HELD(virus found) a@r.example=pending bob@here.example=pending"


def test_release_empties_held_once(tmp_path: Path) -> None:
    """release() clears the hold (and restarts the queue clock); a second release, or a missing id, is False."""
    now = [1000.0]
    q = Queue(tmp_path, clock=lambda: now[0])
    entry_id = q.enqueue("", [], MESSAGE, held="spam", local=["bob@here.example"])
    now[0] = 5000.0
    assert q.release(entry_id) is True
    entry = q.load(entry_id)
    assert entry.held == "" and entry.queued_at == 5000.0
    assert q.release(entry_id) is False
    assert q.release("0" * 21) is False


def test_old_envelopes_without_held_still_load(tmp_path: Path) -> None:
    """Envelopes written before the hold existed load as not held, recipients not local."""
    q = Queue(tmp_path)
    entry_id = q.enqueue("joe@here.example", ["a@r.example"], MESSAGE)
    env = json.loads(q.envelope_path(entry_id).read_text())
    del env["held"]
    del env["recipients"][0]["local"]
    q.envelope_path(entry_id).write_text(json.dumps(env))
    entry = q.load(entry_id)
    assert entry.held == "" and not entry.recipients[0].local


def test_the_smtp_message_id_is_kept_and_old_envelopes_still_load(tmp_path: Path) -> None:
    """``msg_id`` survives the envelope file; an envelope written before it existed loads with ""."""
    q = Queue(tmp_path / "queue")
    entry_id = q.enqueue("joe@x.test", ["a@y.test"], b"hi\r\n", msg_id="2k7f3q1x9b")
    assert q.load(entry_id).msg_id == "2k7f3q1x9b"
    path = q.envelope_path(entry_id)
    data = json.loads(path.read_text())
    del data["msg_id"]
    path.write_text(json.dumps(data))
    assert q.load(entry_id).msg_id == ""
