"""The durable outbound queue: one message file and one JSON envelope per entry.

Every method here blocks (file I/O and fsync): the server and the queue runner call
them through ``deferToThread``; the admin CLI calls them directly.

Format
======
Everything lives in one folder (``cfg.queue_dir``, normally ``data_dir/queue``):

``<id>.msg``
    The message exactly as accepted: CRLF line endings, ``Received:`` prepended.
``<id>.env``
    The envelope, UTF-8 JSON; its presence is what makes an entry live::

        {"version": 1, "id": "<id>", "sender": "joe@example.com" | "",
         "queued_at": 1764420000.25,
         "recipients": [
           {"address": "ann@remote.example", "state": "deferred",
            "attempts": 1, "next_attempt": 1764420300.25,
            "last_reply": "451 4.3.0 try later", "relay": "mx1.remote.example",
            "notified": false, "local": false}],
         "held": "", "msg_id": "2K7F3Q1X9B"}

    ``sender`` is ``""`` for the null sender ``<>``.  ``state`` is ``pending``
    (never tried), ``deferred`` (a temporary failure; ``next_attempt`` is when to try
    again, seconds since the epoch), ``delivered`` or ``failed``.  ``notified`` is
    true once the delivery status notification for a failed recipient was handed on.
    ``held`` is not empty for a message a content filter quarantined: the reason.  A
    held entry is not delivered (and does not expire) until ``mailguard queue release
    ID`` empties it.  A ``local`` recipient is a mailbox of this host: a held message
    for local mailboxes waits here too, and goes into the maildir when released.
    ``msg_id`` is the id the SMTP server gave the message (in its ``250`` reply, its
    ``Received:`` header and its log lines; for a bounce, the bounced message's id),
    so that the log lines of every step carry it; ``""`` when unknown.
``.tmp-*``
    A file being written.  Leftovers from a crash are removed by :meth:`Queue.cleanup`.
``flush``
    The flush trigger: an empty file.  :meth:`Queue.request_flush` (``mailguard queue
    flush``, from any process) creates it; the running queue runner checks for it every
    couple of seconds, removes it and tries every waiting recipient at once.

The id is 13 hex digits of microseconds since the epoch followed by 8 random hex
digits, so ids sort by age.  Both files are written to a temporary name, made
durable, renamed into place (the message first, the envelope last, so a crash never
leaves a live entry without its message), and the folder made durable.  The server
does this for a new entry inside a delivery transaction (:meth:`Queue.prepare`), so
the entry appears together with the message's local copies; envelopes are rewritten
with :func:`mailguard.storage.safeio.atomic_write` after every delivery attempt.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from mailguard.storage import safeio

PENDING = "pending"
DEFERRED = "deferred"
DELIVERED = "delivered"
FAILED = "failed"
STATES = (PENDING, DEFERRED, DELIVERED, FAILED)

_ID = re.compile(r"^[0-9a-f]{21}$")
_ORPHAN_AGE = 3600.0


class QueueError(Exception):
    """An entry that does not exist or cannot be read; ``reason`` says why without the id."""

    def __init__(self, text: str, reason: str = "") -> None:
        super().__init__(text)
        self.reason = reason or text


@dataclass(frozen=True)
class Damaged:
    """A live entry the runner cannot deliver, and why (shown by ``queue list``)."""

    id: str
    reason: str


@dataclass
class RecipientState:
    """Delivery state of one recipient of a queued message."""

    address: str
    state: str = PENDING
    attempts: int = 0
    next_attempt: float | None = None
    last_reply: str = ""
    relay: str = ""
    notified: bool = False
    warned: bool = False          # a delay warning was sent for it
    local: bool = False           # a local mailbox (of a held message): delivered to its maildir

    @property
    def waiting(self) -> bool:
        """True while the recipient still has to be tried."""
        return self.state in (PENDING, DEFERRED)

    def due(self, now: float) -> bool:
        """True when the recipient should be tried at ``now``."""
        return self.state == PENDING or (
            self.state == DEFERRED and (self.next_attempt is None or self.next_attempt <= now))


@dataclass
class QueueEntry:
    """One queued message's envelope (the message itself stays on disk)."""

    id: str
    sender: str
    queued_at: float
    recipients: list[RecipientState] = field(default_factory=list)
    held: str = ""                # the quarantine reason; "" = deliver
    msg_id: str = ""              # the SMTP message id it came from (a bounce: the bounced one's)

    @property
    def finished(self) -> bool:
        """True when nothing is left to try and every failure has been reported."""
        return all(r.state == DELIVERED or (r.state == FAILED and r.notified) for r in self.recipients)

    def to_json(self) -> bytes:
        data = {"version": 1, "id": self.id, "sender": self.sender, "queued_at": self.queued_at,
                "recipients": [asdict(r) for r in self.recipients], "held": self.held,
                "msg_id": self.msg_id}
        return json.dumps(data, indent=1).encode("utf-8") + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> QueueEntry:
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict) or data.get("version") != 1:
            raise QueueError("unknown envelope version")
        rcpts = [RecipientState(**r) for r in data["recipients"]]
        for r in rcpts:
            if r.state not in STATES:
                raise QueueError(f"unknown recipient state {r.state!r}")
        return cls(str(data["id"]), str(data["sender"]), float(data["queued_at"]), rcpts,
                   str(data.get("held", "")), str(data.get("msg_id", "")))


class Queue:
    """The queue folder.  Safe to share between threads of one process.

    :param root: the queue folder; created when missing.
    :param clock: seconds since the epoch (``reactor.seconds`` or ``time.time``).
    """

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.clock = clock
        self._lock = threading.Lock()
        self._inflight: set[str] = set()

    # -- paths ---------------------------------------------------------------

    def _check(self, entry_id: str) -> str:
        if not _ID.match(entry_id):
            raise QueueError(f"not a queue id: {entry_id!r}")
        return entry_id

    def message_path(self, entry_id: str) -> Path:
        return self.root / f"{self._check(entry_id)}.msg"

    def envelope_path(self, entry_id: str) -> Path:
        return self.root / f"{self._check(entry_id)}.env"

    @property
    def flush_path(self) -> Path:
        return self.root / "flush"

    def _write(self, path: Path, data: bytes) -> None:
        """Write ``data`` to ``path`` atomically and durably (temp, fsync, rename, fsync dir)."""
        safeio.atomic_write(path, data, self._tmp_name(path.name))

    def _tmp_name(self, name: str) -> Path:
        """Where a file is written before it is renamed to ``name`` (ignored by every reader)."""
        return self.root / f".tmp-{name}-{secrets.token_hex(4)}"

    # -- the contract --------------------------------------------------------

    def enqueue(self, sender: str, recipients: builtins.list[str], message: bytes, *, held: str = "",
                local: Sequence[str] = (), msg_id: str = "") -> str:
        """Store a message durably for delivery to ``recipients``; returns its queue id.

        Blocking; on return the entry survives a crash.  ``sender`` is "" for ``<>``.
        ``held``: the quarantine reason (the entry waits for ``release``); ``local``:
        mailboxes of this host that get the message when it is released; ``msg_id``:
        the SMTP message id the log lines carry.  (The server
        queues through :meth:`prepare` and a group commit instead.)
        """
        entry = self.prepare(sender, recipients, message, held=held, local=local, msg_id=msg_id)
        staged: builtins.list[tuple[str, str]] = []
        try:
            entry.stage(staged, sync=True)
            for tmp, final in staged:
                safeio.rename(tmp, final)
            safeio.fsync_dir(self.root)
        except BaseException:
            for tmp, final in reversed(staged):
                safeio.unlink_quietly(final)
                safeio.unlink_quietly(tmp)
            raise
        finally:
            entry.finish(True)
        return entry.id

    def prepare(self, sender: str, recipients: builtins.list[str], message: bytes, *, held: str = "",
                local: Sequence[str] = (), msg_id: str = "") -> StagedEntry:
        """A new entry as the queue part of a delivery transaction (nothing written yet).

        The entry stays out of :meth:`ids` (and so out of the runner's sight) until
        its :meth:`StagedEntry.finish`, even once its files are renamed into place.
        """
        if not recipients and not local:
            raise ValueError("a queued message needs at least one recipient")
        now = self.clock()
        entry_id = f"{int(now * 1_000_000) & (16**13 - 1):013x}{secrets.token_hex(4)}"
        unique = builtins.list(dict.fromkeys(recipients))
        entry = QueueEntry(entry_id, sender, now, [RecipientState(r) for r in unique]
                           + [RecipientState(m, local=True) for m in dict.fromkeys(local)], held, msg_id)
        with self._lock:
            self._inflight.add(entry_id)
        return StagedEntry(self, entry, message)

    def _settled(self, entry_id: str) -> None:
        with self._lock:
            self._inflight.discard(entry_id)

    def load(self, entry_id: str) -> QueueEntry:
        """The envelope of one entry.  :raises QueueError: no such entry, or unreadable."""
        try:
            raw = self.envelope_path(entry_id).read_bytes()
        except FileNotFoundError:
            raise QueueError(f"no queue entry {entry_id}") from None
        try:
            return QueueEntry.from_json(raw)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            reason = f"unreadable envelope: {type(e).__name__}: {e}"
            raise QueueError(f"queue entry {entry_id}: {reason}", reason) from None

    def read_message(self, entry_id: str) -> bytes:
        """The message bytes of one entry.  :raises QueueError: missing."""
        try:
            return self.message_path(entry_id).read_bytes()
        except FileNotFoundError:
            raise QueueError(f"no message file for queue entry {entry_id}") from None

    def ids(self) -> list[str]:
        """Ids of the live entries, oldest first."""
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return []
        inflight = self._inflight
        return sorted(n[:-4] for n in names
                      if n.endswith(".env") and _ID.match(n[:-4]) and n[:-4] not in inflight)

    def list(self) -> list[QueueEntry]:
        """Every live entry, oldest first (damaged ones are left out: see :meth:`scan`)."""
        return self.scan()[0]

    def scan(self) -> tuple[builtins.list[QueueEntry], builtins.list[Damaged]]:
        """Every live entry, oldest first, and the entries that cannot be delivered.

        An entry is damaged when its envelope cannot be read or its message file is
        missing: the runner cannot deliver it, so ``queue list`` shows it with the reason.
        """
        entries: builtins.list[QueueEntry] = []
        damaged: builtins.list[Damaged] = []
        for entry_id in self.ids():
            try:
                entry = self.load(entry_id)
            except QueueError as e:
                if self.envelope_path(entry_id).exists():
                    damaged.append(Damaged(entry_id, e.reason))
                continue
            if not self.message_path(entry_id).exists():
                if self.envelope_path(entry_id).exists():       # not deleted meanwhile
                    damaged.append(Damaged(entry_id, "message file missing"))
                continue
            entries.append(entry)
        return entries, damaged

    def save(self, entry: QueueEntry) -> bool:
        """Rewrite an entry's envelope atomically; False (nothing written) when it was deleted."""
        with self._lock:
            return self._save(entry)

    def _save(self, entry: QueueEntry) -> bool:
        if not self.message_path(entry.id).exists():
            return False
        self._write(self.envelope_path(entry.id), entry.to_json())
        return True

    def update(self, entry_id: str, change: Callable[[QueueEntry], Any]) -> QueueEntry | None:
        """Load, apply ``change`` and save, as one step among this process's threads.

        An entry whose every recipient is delivered or failed-and-reported is deleted.
        Returns the new envelope, or None when the entry is gone.
        """
        with self._lock:
            try:
                entry = self.load(entry_id)
            except QueueError:
                return None
            change(entry)
            if entry.finished:
                self._delete(entry_id)
                return entry
            return entry if self._save(entry) else None

    def release(self, entry_id: str) -> bool:
        """Deliver a held entry from now on; False when there is no such held entry."""
        released = False

        def change(entry: QueueEntry) -> None:
            nonlocal released
            released, entry.held = bool(entry.held), ""
            if released:
                entry.queued_at = self.clock()   # max_queue_time counts from the release

        return self.update(entry_id, change) is not None and released

    def delete(self, entry_id: str) -> bool:
        """Remove an entry (envelope first, so it stops being live at once); False when absent."""
        with self._lock:
            return self._delete(entry_id)

    def _delete(self, entry_id: str) -> bool:
        try:
            self.envelope_path(entry_id).unlink()
        except FileNotFoundError:
            found = False
        else:
            found = True
        self.message_path(entry_id).unlink(missing_ok=True)
        if found:
            safeio.fsync_dir(self.root)
        return found

    def request_flush(self) -> None:
        """Ask the running queue runner (in any process) to try every waiting recipient now."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.flush_path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)

    def take_flush_request(self) -> bool:
        """True (and the trigger removed) when a flush was requested."""
        try:
            self.flush_path.unlink()
        except FileNotFoundError:
            return False
        return True

    def cleanup(self) -> builtins.list[str]:
        """Remove crash leftovers: temporary files, and message files without an envelope
        that are older than an hour (younger ones may be an enqueue in progress)."""
        removed: builtins.list[str] = []
        try:
            names = os.listdir(self.root)
        except FileNotFoundError:
            return removed
        now = time.time()
        live = set(self.ids())
        for name in names:
            path = self.root / name
            stale = name.startswith(".tmp-") or (name.endswith(".msg") and name[:-4] not in live)
            try:
                if stale and now - path.stat().st_mtime > (_ORPHAN_AGE if name.endswith(".msg") else 60):
                    path.unlink()
                    removed.append(name)
            except FileNotFoundError:
                continue
        return removed


class StagedEntry:
    """The queue part of a delivery transaction (see :mod:`mailguard.storage.groupcommit`).

    :meth:`stage` writes the message and the envelope under ``.tmp-`` names, which
    the runner, ``queue list`` and :meth:`Queue.ids` ignore, and says where each goes:
    the message first, the envelope last, so a live envelope always has its message.
    """

    def __init__(self, queue: Queue, entry: QueueEntry, message: bytes) -> None:
        self.queue = queue
        self.entry = entry
        self.message = message
        self.root = os.fspath(queue.root)

    @property
    def id(self) -> str:
        return self.entry.id

    def stage(self, staged: list[tuple[str, str]], sync: bool) -> None:
        """Write both files under temporary names, appending (tmp, final) to ``staged``."""
        q = self.queue
        if not q.root.is_dir():
            q.root.mkdir(parents=True, exist_ok=True)
            safeio.fsync_dir(q.root.parent)
        for final, data in ((q.message_path(self.id), self.message),
                            (q.envelope_path(self.id), self.entry.to_json())):
            tmp = q._tmp_name(final.name)
            safeio.write_new(tmp, data, sync)
            staged.append((os.fspath(tmp), os.fspath(final)))

    def finish(self, published: bool) -> None:
        """The transaction is over: the entry is durable (or gone) and may be seen."""
        self.queue._settled(self.id)


def _span(seconds: float) -> str:
    """``4m30s``, ``2h05m``, ``3d01h``: a duration as ``queue list`` shows it."""
    days, rest = divmod(max(0, int(seconds)), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s"


def format_entry(entry: QueueEntry, now: float | None = None) -> str:
    """One line for ``mailguard queue list``: id, age, sender, then each recipient.

    ``0123abcd... 2h05m <joe@example.com> ann@x.example=deferred(451 4.3.0 later, next try in 4m30s) bob@y.example=delivered``

    A quarantined entry shows ``HELD(<reason>)`` after the sender (it is not tried
    until released, so no next try is shown).
    """
    now = time.time() if now is None else now
    parts = [entry.id, _span(now - entry.queued_at), f"<{entry.sender}>"]
    if entry.held:
        parts.append(f"HELD({' '.join(entry.held.split())})")
    for r in entry.recipients:
        notes = [r.last_reply] if r.last_reply and r.state != DELIVERED else []
        if r.state == DEFERRED and r.next_attempt is not None and not entry.held:
            wait = r.next_attempt - now
            notes.append(f"next try in {_span(wait)}" if wait >= 1 else "next try now")
        text = f"{r.address}={r.state}"
        if notes:
            text += f"({', '.join(notes)})"
        parts.append(text)
    return " ".join(parts)


def format_damaged(damaged: Damaged) -> str:
    """One line for a damaged entry: ``<id> DAMAGED <reason>`` (the reason on one line)."""
    reason = " ".join(damaged.reason.split())
    return f"{damaged.id} DAMAGED {reason}"


#: What ``mailguard queue list`` prints for a queue with nothing in it.
EMPTY = "queue is empty"


def format_entries(entries: Iterable[QueueEntry], now: float | None = None,
                   damaged: Iterable[Damaged] = ()) -> list[str]:
    """``format_entry`` for each entry and ``format_damaged`` for each damaged one, oldest first
    (``[EMPTY]`` when there is none)."""
    lines = [(e.id, format_entry(e, now)) for e in entries] + [(d.id, format_damaged(d)) for d in damaged]
    return [line for _, line in sorted(lines)] or [EMPTY]
