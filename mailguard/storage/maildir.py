"""Maildir mailboxes: durable delivery and the POP3 view of a mailbox.

Written fresh because ``twisted.mail.maildir`` does not work on Python 3.  This module imports nothing from Twisted: every function
here blocks, and callers on the reactor run it with ``deferToThread``.

Format
------
A mailbox ``local@domain`` is the maildir ``<mail_dir>/<domain>/<local>/`` with the
standard ``tmp/``, ``new/`` and ``cur/`` folders, so Dovecot or mutt can read it.

Messages are stored with LF line endings (the maildir convention).  A file name is::

    <sec>.M<usec>P<pid>Q<counter>.<host>,S=<file octets>,W=<CRLF octets>[:2,<flags>]

``S=`` is the size of the file on disk and ``W=`` the size of the message with every
line ending as CRLF (RFC 1939 section 11: the octets POP3 reports and sends before
byte-stuffing).  These are Dovecot's meanings of the two fields, so Dovecot trusts
them and POP3 ``STAT``/``LIST`` need no file reads.  In ``<host>``, ``/``, ``:`` and
``,`` are written ``\\057``, ``\\072`` and ``\\054`` (maildir and Dovecot convention).

Delivery (``maildir(5)``, D. J. Bernstein's "Using maildir format"): write to
``tmp/``, make the file durable, ``rename`` into ``new/``, make ``new/`` durable.
Nothing half-written ever appears in ``new/``.  :class:`Copies` is the maildir part
of a delivery; :mod:`mailguard.storage.groupcommit` runs those steps for a whole
batch of messages at once.

Reading (:class:`Mailbox`): the POP3 session scans ``new/`` and ``cur/`` once when it
opens.  The unique id (UIDL, RFC 1939 section 7) is the part of the name before the
first ``,`` or ``:``, which neither a new->cur move nor a flag change alters.  The
session touches the disk only at commit (``QUIT``, RFC 1939 section 6, UPDATE
state): deleted messages are unlinked, and messages retrieved with ``RETR`` get the
``S`` (seen) flag, moving from ``new/`` to ``cur/`` with ``:2,S``.  Messages that were
only listed stay where they are, so a mail reader still shows them as new; a session
that ends without ``QUIT`` changes nothing at all.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

from mailguard.core.dotstuff import has_bare_cr
from mailguard.storage import safeio
from mailguard.storage.poplock import LockTable as LockTable, MailboxLocked as MailboxLocked  # their old home

_DIR_MODE = 0o700
_SUBDIRS = ("tmp", "new", "cur")

_counter = itertools.count(1)


def _safe_host() -> str:
    host = socket.gethostname() or "localhost"
    return host.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


_HOST = _safe_host()


def maildir_path(mail_dir: Path, address: str) -> Path:
    """The maildir of the mailbox ``address`` (already normalised): ``mail_dir/<domain>/<local>``.

    :raises ValueError: the address is not ``local@domain`` or a part could escape
        ``mail_dir`` (a path separator, NUL, ``..``, a leading ``.``, empty).
    """
    local, sep, domain = address.rpartition("@")
    if not sep:
        raise ValueError(f"not a mailbox address: {address!r}")
    for part in (local, domain):
        if (not part or part.startswith(".") or "/" in part or "\\" in part
                or "\0" in part or ".." in part):
            raise ValueError(f"unsafe mailbox address: {address!r}")
    return Path(mail_dir) / domain / local


def _unique() -> str:
    now = time.time_ns() // 1000
    sec, usec = divmod(now, 1_000_000)
    return f"{sec}.M{usec:06d}P{os.getpid()}Q{next(_counter)}.{_HOST}"


def _lf_form(message: bytes) -> tuple[bytes, int]:
    """The stored (LF) form of a CRLF message and the octet count of its CRLF form."""
    if not has_bare_cr(message):
        lf = message.translate(None, b"\r")     # every CR ends a line: a third of replace's time
    else:
        lf = message.replace(b"\r\n", b"\n")
    if lf and not lf.endswith(b"\n"):
        lf += b"\n"
    return lf, wire_size(lf)


def wire_size(stored: bytes) -> int:
    """Octets of ``stored`` once every bare LF is sent as CRLF (what RETR sends before stuffing)."""
    crlf = stored.count(b"\r\n") if b"\r" in stored else 0       # a stored message seldom has a CR
    return len(stored) + stored.count(b"\n") - crlf


def _create(maildir: Path) -> None:
    """Create the maildir and its three folders, making every new directory entry durable."""
    made: list[Path] = []
    missing = []
    p = maildir
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, _DIR_MODE)
        except FileExistsError:
            continue
        made.append(d)
    for sub in _SUBDIRS:
        try:
            os.mkdir(maildir / sub, _DIR_MODE)
        except FileExistsError:
            continue
        made.append(maildir / sub)
    for parent in {d.parent for d in made}:
        safeio.fsync_dir(parent)


def stored_form(message: bytes) -> tuple[bytes, str]:
    """The stored (LF) form of a CRLF message and the file-name suffix carrying its sizes."""
    lf, crlf_size = _lf_form(message)
    return lf, f",S={len(lf)},W={crlf_size}"


def unique_name(suffix: str) -> str:
    """A new unique maildir file name ending in ``suffix``."""
    return _unique() + suffix


def write_tmp(maildir: str | Path, name: str, data: bytes, fsync: bool = True) -> str:
    """Write ``data`` to ``maildir/tmp/name`` (creating the maildir when missing).

    With ``fsync=False`` the caller makes the file durable itself (the group commit
    syncs a whole batch at once) before renaming it into ``new/``.  On failure
    nothing is left behind and :class:`OSError` is raised.  Paths are plain strings
    here: this is the delivery hot path, and pathlib's objects cost more than the
    write itself for a small message.
    """
    tmp = os.path.join(maildir, "tmp", name)
    try:
        safeio.write_new(tmp, data, fsync)
    except FileNotFoundError:
        _create(Path(maildir))
        safeio.write_new(tmp, data, fsync)
    return tmp


class Copies:
    """The maildir part of a delivery transaction: one copy of a message per maildir.

    :meth:`stage` writes each copy to its maildir's ``tmp/`` (where no reader looks)
    and says where it goes in ``new/``; the group commit makes the files durable,
    renames them and syncs again (see :mod:`mailguard.storage.groupcommit`).

    :param root: a folder on the filesystem that holds the maildirs (for ``syncfs``).
    :param maildirs: the maildirs, as strings (the hot path).
    :param message: the CRLF message, trace headers already prepended.
    """

    def __init__(self, root: str | Path, maildirs: Sequence[str | Path], message: bytes) -> None:
        self.root = os.fspath(root)
        self.maildirs = maildirs
        self.message = message
        self.names: list[str] = []

    def stage(self, staged: list[tuple[str, str]], sync: bool) -> None:
        """Write every copy to ``tmp/``, appending (tmp path, final path) to ``staged``."""
        lf, suffix = stored_form(self.message)
        for box in self.maildirs:
            name = unique_name(suffix)
            tmp = write_tmp(box, name, lf, fsync=sync)
            staged.append((tmp, os.path.join(box, "new", name)))
            self.names.append(name)

    def finish(self, published: bool) -> None:
        """Nothing to release: a copy is only files."""


# -- reading -----------------------------------------------------------------------------


@dataclass(slots=True)
class Message:
    """One message as a POP3 session sees it."""

    folder: str          #: "new" or "cur"
    name: str            #: file name inside the folder
    uid: str             #: the UIDL, stable for ever
    size: int            #: octets of the CRLF form (RFC 1939 section 11)
    deleted: bool = False
    retrieved: bool = False


_UID = re.compile(r"[\x21-\x7e]{1,70}")
_ORDER = re.compile(r"(\d+)(?:\.M(\d+))?")
# The common case, a name mailguard (or Dovecot) wrote: <sec>.M<usec>...,S=<n>,W=<n>[:2,flags]
_FAST = re.compile(r"((\d+)\.M(\d+)[\x21-\x2b\x2d-\x39\x3b-\x7e]*)(?:,S=\d+)?,W=(\d+)(?::.*)?")


def _uid(base: str) -> str:
    """RFC 1939 section 7: 1 to 70 characters in 0x21..0x7E; longer or odd names are hashed."""
    if _UID.fullmatch(base):
        return base
    return hashlib.sha1(base.encode("utf-8", "surrogateescape")).hexdigest()


def _order(base: str) -> tuple[int, int, str]:
    """Delivery order: seconds, then microseconds, then the name."""
    m = _ORDER.match(base)
    if m is None:
        return (0, 0, base)
    return (int(m.group(1)), int(m.group(2) or 0), base)


def _parse(folder: str, directory: Path, name: str) -> tuple[tuple[int, int, str], Message] | None:
    stem = name.partition(":")[0]
    base, _, fields = stem.partition(",")
    if not base:
        return None
    size = -1
    if fields:
        for f in fields.split(","):
            if f[:2] == "W=" and f[2:].isdigit():
                size = int(f[2:])
    if size < 0:
        try:
            with open(directory / name, "rb") as fh:
                size = 0
                last = b""
                while chunk := fh.read(1 << 16):
                    size += wire_size(chunk)
                    if last == b"\r" and chunk.startswith(b"\n"):
                        size -= 1  # a CRLF split across two reads
                    last = chunk[-1:]
        except OSError:
            return None
    return _order(base), Message(folder, name, _uid(base), size)


class _ScanCache:
    """Recent scans of maildirs, valid while ``new/`` and ``cur/`` keep their mtimes.

    A scan is kept only when both folders were last changed more than a second before
    it began, so no change can share a timestamp with it (the "racy" case): any later
    delivery, move or deletion changes a folder's mtime and the next open scans again.
    """

    RACY_NS = 1_000_000_000
    SIZE = 64

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple[int, int], list[tuple[str, str, str, int]]]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def stamp(path: Path) -> tuple[int, int]:
        out = []
        for folder in ("new", "cur"):
            try:
                out.append(os.stat(os.path.join(path, folder)).st_mtime_ns)
            except OSError:
                out.append(-1)
        return out[0], out[1]

    def get(self, path: Path, stamp: tuple[int, int]) -> list[tuple[str, str, str, int]] | None:
        with self._lock:
            entry = self._entries.get(os.fspath(path))
        if entry is None or entry[0] != stamp:
            return None
        return entry[1]

    def put(self, path: Path, stamp: tuple[int, int], started: int, messages: list[Message]) -> None:
        if max(stamp) > started - self.RACY_NS or self.stamp(path) != stamp:
            return
        fields = [(m.folder, m.name, m.uid, m.size) for m in messages]
        with self._lock:
            self._entries.pop(os.fspath(path), None)
            self._entries[os.fspath(path)] = (stamp, fields)
            while len(self._entries) > self.SIZE:
                del self._entries[next(iter(self._entries))]


_SCANS = _ScanCache()


@dataclass(frozen=True)
class CommitResult:
    """What :meth:`Mailbox.commit` did."""

    deleted: int
    failed: int


class Mailbox:
    """A snapshot of a maildir for one POP3 session (RFC 1939).

    Message numbers are 1-based and fixed for the session.  Deletion marks and the
    seen state live in memory until :meth:`commit`.
    """

    def __init__(self, path: Path, messages: list[Message]) -> None:
        self.path = Path(path)
        self.messages = messages

    @classmethod
    def open(cls, path: Path) -> Mailbox:
        """Scan ``new/`` and ``cur/`` (names only, for files mailguard wrote).  Blocking.

        A maildir that does not exist yet is an empty mailbox.  The result of a scan
        is remembered (see :class:`_ScanCache`), so opening an unchanged mailbox again
        costs two ``stat`` calls instead of a directory listing.
        """
        started = time.time_ns()
        stamp = _SCANS.stamp(path)
        cached = _SCANS.get(path, stamp)
        if cached is not None:
            return cls(path, [Message(*fields) for fields in cached])
        mailbox = cls._scan(path)
        _SCANS.put(path, stamp, started, mailbox.messages)
        return mailbox

    @classmethod
    def _scan(cls, path: Path) -> Mailbox:
        found: list[tuple[tuple[int, int, str], Message]] = []
        for folder in ("new", "cur"):
            directory = Path(path) / folder
            try:
                entries = os.listdir(directory)
            except FileNotFoundError:
                continue
            fast = _FAST.fullmatch
            for name in entries:
                m = fast(name)
                if m is not None and len(m.group(1)) <= 70:
                    base = m.group(1)
                    found.append(((int(m.group(2)), int(m.group(3)), base),
                                  Message(folder, name, base, int(m.group(4)))))
                    continue
                if name.startswith("."):
                    continue
                parsed = _parse(folder, directory, name)
                if parsed is not None:
                    found.append(parsed)
        found.sort(key=lambda item: item[0])
        return cls(path, [m for _, m in found])

    def _get(self, number: int) -> Message:
        if not 1 <= number <= len(self.messages):
            raise KeyError(number)
        return self.messages[number - 1]

    def message(self, number: int) -> Message:
        """Message ``number`` unless deleted in this session.

        :raises KeyError: no such message, or it is marked deleted.
        """
        msg = self._get(number)
        if msg.deleted:
            raise KeyError(number)
        return msg

    def live(self) -> list[tuple[int, Message]]:
        """(number, message) for every message not marked deleted."""
        return [(i, m) for i, m in enumerate(self.messages, 1) if not m.deleted]

    def stat(self) -> tuple[int, int]:
        """(count, octets) of the messages not marked deleted (``STAT``)."""
        live = [m.size for m in self.messages if not m.deleted]
        return len(live), sum(live)

    def open_message(self, number: int) -> BinaryIO:
        """The stored (LF) message, opened for reading.

        :raises KeyError: no such message.  :raises OSError: the file is gone.
        """
        msg = self.message(number)
        return open(os.path.join(self.path, msg.folder, msg.name), "rb")

    def top(self, number: int, lines: int) -> bytes:
        """Headers, the blank line, and the first ``lines`` body lines (``TOP``).  Blocking."""
        out: list[bytes] = []
        body = -1
        with self.open_message(number) as fh:
            for line in fh:
                if body < 0:
                    out.append(line)
                    if line in (b"\n", b"\r\n"):
                        body = 0
                    continue
                if body >= lines:
                    break
                out.append(line)
                body += 1
        return b"".join(out)

    def delete(self, number: int) -> None:
        """Mark for deletion at commit. :raises KeyError: no such message or already marked."""
        self.message(number).deleted = True

    def mark_retrieved(self, number: int) -> None:
        """Remember that the whole message was sent (it gets the seen flag at commit)."""
        self.message(number).retrieved = True

    def reset(self) -> None:
        """Unmark every deletion (``RSET``)."""
        for m in self.messages:
            m.deleted = False

    def commit(self) -> CommitResult:
        """Apply the session (RFC 1939 UPDATE state).  Blocking.

        Deleted messages are unlinked; retrieved ones get the seen flag (``new/`` ->
        ``cur/<name>:2,S``).  A message already gone counts as deleted.  Each changed
        folder is fsynced once.
        """
        deleted = failed = 0
        touched: set[Path] = set()
        for m in self.messages:
            if not (m.deleted or m.retrieved):
                continue
            src = self.path / m.folder / m.name
            if m.deleted:
                try:
                    os.unlink(src)
                except FileNotFoundError:
                    pass
                except OSError:
                    failed += 1
                    continue
                deleted += 1
                touched.add(src.parent)
            elif m.retrieved:
                target = _seen_name(m.name)
                if m.folder == "cur" and target == m.name:
                    continue
                try:
                    safeio.rename(src, self.path / "cur" / target)
                except OSError:
                    continue  # the flag is a courtesy; the message itself is intact
                touched.update({src.parent, self.path / "cur"})
        for folder in touched:
            try:
                safeio.fsync_dir(folder)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    failed += 1
        return CommitResult(deleted, failed)


def _seen_name(name: str) -> str:
    """The name with the maildir ``S`` flag added (``:2,`` info, flags kept sorted)."""
    base, sep, info = name.partition(":")
    if not sep or not info.startswith("2,"):
        return f"{base}:2,S"
    flags = set(info[2:])
    flags.add("S")
    return f"{base}:2,{''.join(sorted(flags))}"
