"""Tests for :mod:`mailguard.storage.maildir`: delivery (through the group commit) and the POP3 view."""

from __future__ import annotations

import builtins
import errno
import os
import time
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from delivery_helpers import commit_inline, deliver

from mailguard.storage import maildir, safeio
from mailguard.storage.maildir import LockTable, Mailbox, MailboxLocked, maildir_path

MESSAGE = (b"Return-Path: <a@example.org>\r\nReceived: from x by y\r\nSubject: hi\r\n\r\n"
           b"line one\r\n.dot line\r\nlast\r\n")

NAME = re.compile(r"^(\d+)\.M(\d{6})P(\d+)Q(\d+)\.[^/,:]+,S=(\d+),W=(\d+)$")


def files(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


def test_maildir_path_is_domain_then_local(tmp_path: Path) -> None:
    """A mailbox lives in mail_dir/<domain>/<local>."""
    assert maildir_path(tmp_path, "alice@example.com") == tmp_path / "example.com" / "alice"


@pytest.mark.parametrize("address", [
    "alice", "@example.com", "alice@", "a/b@example.com", "alice@ex/ample.com", "..@example.com",
    "alice@..", ".hidden@example.com", "alice@.example.com", "a\0b@example.com", "a..b@example.com",
    "a\\b@example.com",
])
def test_maildir_path_refuses_escapes(tmp_path: Path, address: str) -> None:
    """Addresses that could leave mail_dir or hide a folder are refused with ValueError."""
    with pytest.raises(ValueError):
        maildir_path(tmp_path, address)


def test_deliver_creates_maildir_and_stores_lf(tmp_path: Path) -> None:
    """The first delivery creates tmp/new/cur and stores the message with LF line endings."""
    box = tmp_path / "example.com" / "alice"
    name = deliver(box, MESSAGE)
    assert files(box) == ["cur", "new", "tmp"]
    assert files(box / "new") == [name]
    assert files(box / "tmp") == []
    assert (box / "new" / name).read_bytes() == MESSAGE.replace(b"\r\n", b"\n")
    assert oct((box / "new" / name).stat().st_mode & 0o777) == "0o600"


def test_name_carries_file_size_and_crlf_size(tmp_path: Path) -> None:
    """S= is the file size and W= the CRLF octet count POP3 reports (Dovecot's meanings)."""
    name = deliver(tmp_path / "box", MESSAGE)
    m = NAME.match(name)
    assert m is not None, name
    assert int(m.group(5)) == (tmp_path / "box" / "new" / name).stat().st_size
    assert int(m.group(6)) == len(MESSAGE)
    assert int(m.group(3)) == os.getpid()


def test_message_without_final_newline_gets_one(tmp_path: Path) -> None:
    """A message not ending in CRLF is stored with a final LF, and W= counts its CRLF."""
    name = deliver(tmp_path / "box", b"Subject: x\r\n\r\nno end")
    assert (tmp_path / "box" / "new" / name).read_bytes() == b"Subject: x\n\nno end\n"
    wire = b"Subject: x\r\n\r\nno end\r\n"
    assert name.endswith(",W=%d" % len(wire))


@settings(max_examples=300)
@given(st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b"\r\r\n", b"\n\r", b"."]), max_size=30))
def test_stored_form_of_any_line_ends(pieces: list[bytes]) -> None:
    """Each CRLF is stored as LF, anything else as it came, with a final LF; W= is the size
    POP3 sends, every bare LF as CRLF."""
    message = b"".join(pieces)
    stored, suffix = maildir.stored_form(message)
    expected = message.replace(b"\r\n", b"\n")
    if expected and not expected.endswith(b"\n"):
        expected += b"\n"
    assert stored == expected
    on_the_wire = re.sub(rb"(?<!\r)\n", b"\r\n", expected)
    assert suffix == f",S={len(expected)},W={len(on_the_wire)}"


def test_names_are_unique_across_threads(tmp_path: Path) -> None:
    """Concurrent deliveries into one maildir never collide."""
    box = tmp_path / "box"
    names: list[str] = []

    def work() -> None:
        for _ in range(50):
            names.append(deliver(box, MESSAGE))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(names)) == 200
    assert len(files(box / "new")) == 200


def test_creating_maildir_fsyncs_parents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """New directories are made durable: the folders holding them are fsynced."""
    synced: list[str] = []
    real = safeio.fsync_dir

    def fsync_dir(path: str | os.PathLike[str]) -> None:
        synced.append(os.fspath(path))
        real(path)

    monkeypatch.setattr(safeio, "fsync_dir", fsync_dir)
    box = tmp_path / "mail" / "example.com" / "alice"
    deliver(box, MESSAGE)
    for parent in (tmp_path, tmp_path / "mail", tmp_path / "mail" / "example.com", box):
        assert str(parent) in synced


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_disk_full_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    """ENOSPC while writing or syncing raises OSError and leaves new/ and tmp/ empty."""
    box = tmp_path / "box"
    maildir._create(box)

    def boom(*args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, failing, boom)
    with pytest.raises(OSError) as info:
        deliver(box, MESSAGE, use_syncfs=False)   # without syncfs every file is fsynced
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert files(box / "new") == []
    assert files(box / "tmp") == []


def test_failed_rename_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rename that fails removes the tmp file too."""
    box = tmp_path / "box"
    maildir._create(box)

    def boom(*args: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(safeio, "rename", boom)
    with pytest.raises(OSError):
        deliver(box, MESSAGE)
    monkeypatch.undo()
    assert files(box / "new") == [] and files(box / "tmp") == []


def test_copies_to_many_maildirs_are_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the second copy fails, the first never reaches new/, so a retry does not duplicate."""
    ok, bad = tmp_path / "ok", tmp_path / "bad"
    maildir._create(ok)
    maildir._create(bad)
    real_open = os.open

    def open_(path: os.PathLike[str], *args: object) -> int:
        if str(path).startswith(str(bad / "tmp")):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        return real_open(path, *args)

    monkeypatch.setattr(os, "open", open_)
    with pytest.raises(OSError):
        commit_inline([maildir.Copies(tmp_path, [str(ok), str(bad)], MESSAGE)])
    monkeypatch.undo()
    assert files(ok / "new") == [] and files(ok / "tmp") == []
    assert files(bad / "new") == []


def make_box(tmp_path: Path, bodies: list[bytes]) -> Path:
    box = tmp_path / "box"
    for b in bodies:
        deliver(box, b)
    return box


def test_mailbox_lists_in_delivery_order_with_sizes(tmp_path: Path) -> None:
    """Messages are numbered in delivery order; sizes are the CRLF octets."""
    bodies = [b"Subject: %d\r\n\r\n" % i + b"x" * i + b"\r\n" for i in range(1, 30)]
    box = make_box(tmp_path, bodies)
    mb = Mailbox.open(box)
    assert [m.size for _, m in mb.live()] == [len(b) for b in bodies]
    assert mb.stat() == (29, sum(len(b) for b in bodies))


def test_open_reads_names_not_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """STAT/LIST data comes from the file names: opening the mailbox opens no message file."""
    box = tmp_path / "box"
    maildir._create(box)
    for i in range(2000):
        (box / "new" / f"17000{i:05d}.M000001P1Q{i}.h,S=10,W=12").write_bytes(b"x" * 10)

    def no_open(*args: object, **kw: object) -> None:
        raise AssertionError("a message file was opened")

    monkeypatch.setattr(builtins, "open", no_open)
    mb = Mailbox.open(box)
    monkeypatch.undo()
    assert mb.stat() == (2000, 24000)


def test_foreign_files_are_measured(tmp_path: Path) -> None:
    """A file with no W= (another MDA wrote it) is read once and its CRLF size counted."""
    box = tmp_path / "box"
    maildir._create(box)
    (box / "cur" / "123.foreign:2,S").write_bytes(b"Subject: a\n\nb\r\nc\n")
    (box / "new" / ".hidden").write_bytes(b"ignored")
    mb = Mailbox.open(box)
    assert [(m.uid, m.size) for _, m in mb.live()] == [("123.foreign", len(b"Subject: a\r\n\r\nb\r\nc\r\n"))]


def test_missing_maildir_is_empty(tmp_path: Path) -> None:
    """A mailbox that never got mail opens empty and is not created by reading."""
    mb = Mailbox.open(tmp_path / "nobody")
    assert mb.stat() == (0, 0)
    assert not (tmp_path / "nobody").exists()


def test_uid_is_stable_across_new_to_cur_and_flags(tmp_path: Path) -> None:
    """The UIDL is the unique part of the name; moving to cur/ with flags keeps it."""
    box = make_box(tmp_path, [MESSAGE, MESSAGE])
    before = [m.uid for _, m in Mailbox.open(box).live()]
    mb = Mailbox.open(box)
    mb.mark_retrieved(1)
    mb.commit()
    assert len(files(box / "cur")) == 1 and files(box / "cur")[0].endswith(":2,S")
    assert [m.uid for _, m in Mailbox.open(box).live()] == before
    assert all(":" not in u and "," not in u for u in before)


def test_seen_flag_keeps_existing_flags(tmp_path: Path) -> None:
    """A message in cur/ with flags gets S added in sorted order."""
    box = make_box(tmp_path, [MESSAGE])
    (name,) = files(box / "new")
    os.rename(box / "new" / name, box / "cur" / (name + ":2,RF"))
    mb = Mailbox.open(box)
    mb.mark_retrieved(1)
    mb.commit()
    assert files(box / "cur") == [name + ":2,FRS"]


def test_deletions_wait_for_commit(tmp_path: Path) -> None:
    """delete() only marks; commit() unlinks; a mailbox dropped without commit keeps all."""
    box = make_box(tmp_path, [MESSAGE, MESSAGE, MESSAGE])
    mb = Mailbox.open(box)
    mb.delete(2)
    assert mb.stat() == (2, 2 * len(MESSAGE))
    with pytest.raises(KeyError):
        mb.message(2)
    assert len(files(box / "new")) == 3
    del mb
    mb = Mailbox.open(box)
    mb.delete(1)
    mb.delete(3)
    mb.reset()
    mb.delete(3)
    result = mb.commit()
    assert (result.deleted, result.failed) == (1, 0)
    assert Mailbox.open(box).stat() == (2, 2 * len(MESSAGE))


def test_top_returns_headers_and_n_lines(tmp_path: Path) -> None:
    """TOP data: every header, the blank line, then the first n body lines (LF form)."""
    box = make_box(tmp_path, [b"A: 1\r\nB: 2\r\n\r\none\r\ntwo\r\nthree\r\n"])
    mb = Mailbox.open(box)
    assert mb.top(1, 0) == b"A: 1\nB: 2\n\n"
    assert mb.top(1, 2) == b"A: 1\nB: 2\n\none\ntwo\n"
    assert mb.top(1, 99) == b"A: 1\nB: 2\n\none\ntwo\nthree\n"


def test_lock_table_is_exclusive(tmp_path: Path) -> None:
    """A second acquire of the same maildir fails until the first is released."""
    locks = LockTable()
    locks.acquire(tmp_path / "a")
    with pytest.raises(MailboxLocked):
        locks.acquire(tmp_path / "x" / ".." / "a")
    locks.acquire(tmp_path / "b")
    locks.release(tmp_path / "a")
    locks.acquire(tmp_path / "a")


def test_long_or_odd_names_get_a_hashed_uid(tmp_path: Path) -> None:
    """Names that are no valid UIDL (over 70 characters) get a stable 40-character hash."""
    box = tmp_path / "box"
    maildir._create(box)
    (box / "cur" / ("9" * 100 + ",S=2:2,")).write_bytes(b"x\n")
    first = Mailbox.open(box).message(1).uid
    assert len(first) == 40 and all(c in "0123456789abcdef" for c in first)
    os.rename(box / "cur" / ("9" * 100 + ",S=2:2,"), box / "cur" / ("9" * 100 + ",S=2:2,S"))
    assert Mailbox.open(box).message(1).uid == first


def _age_folders(box: Path, seconds: int) -> tuple[int, int]:
    """Set new/ and cur/ mtimes into the past; return the stamps set."""
    stamps = []
    for folder in ("new", "cur"):
        t = time.time_ns() - seconds * 1_000_000_000
        os.utime(box / folder, ns=(t, t))
        stamps.append(t)
    return stamps[0], stamps[1]


def test_unchanged_mailbox_is_opened_from_the_scan_cache(tmp_path: Path) -> None:
    """An old, unchanged maildir is opened without listing it; any change is seen at once."""
    box = tmp_path / "alice"
    for i in range(3):
        deliver(box, b"Subject: %d\r\n\r\nbody\r\n" % i)
    _age_folders(box, 10)
    first = Mailbox.open(box)
    assert len(first.messages) == 3
    # Prove the second open comes from the cache: a file slipped in with the folder's
    # mtime put back is not seen ...
    stamp = os.stat(box / "new").st_mtime_ns
    (box / "new" / "1.M1P1Q1.sneaky,S=3,W=4").write_bytes(b"x\n\n")
    os.utime(box / "new", ns=(stamp, stamp))
    assert [m.uid for m in Mailbox.open(box).messages] == [m.uid for m in first.messages]
    # ... while a real delivery changes the mtime and the next open scans again.
    deliver(box, b"Subject: new\r\n\r\nbody\r\n")
    assert len(Mailbox.open(box).messages) == 5


def test_recently_changed_mailbox_is_not_cached(tmp_path: Path) -> None:
    """A scan of a folder changed within the last second is never reused (racy timestamps)."""
    box = tmp_path / "bob"
    deliver(box, b"Subject: 1\r\n\r\nbody\r\n")
    assert len(Mailbox.open(box).messages) == 1
    stamp = os.stat(box / "new").st_mtime_ns
    (box / "new" / "1.M1P1Q1.same-tick,S=3,W=4").write_bytes(b"x\n\n")
    os.utime(box / "new", ns=(stamp, stamp))
    assert len(Mailbox.open(box).messages) == 2
