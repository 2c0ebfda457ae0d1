"""Greylisting: ``[checks] greylist = SECONDS`` (0 = off), decided by :mod:`mailguard.core.greylist`.

At RCPT, mail from an untrusted client for a (client /24 or /64, sender, recipient)
triplet seen for the first time is deferred with ``greylisted``; a retry after the
delay passes and whitelists the client network.  The state lives in
``data_dir/greylist.sqlite`` so that a restart does not greylist everyone again.

Format
======
SQLite, two tables::

    triplets(network TEXT, sender TEXT, recipient TEXT, first_seen REAL, passed INTEGER,
             last_seen REAL, PRIMARY KEY (network, sender, recipient))
    clients(network TEXT PRIMARY KEY, until REAL)       -- auto-whitelisted networks

Senders and recipients are stored lower case.  Every access runs in a thread (never on
the reactor); one lock serialises them on the one connection.  Entries older than
:data:`~mailguard.core.greylist.MAX_AGE` are removed now and then.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer

from mailguard.checks.base import RCPT, Connection, Facts
from mailguard.core import greylist as decide_mod
from mailguard.core.checks import Refusal, client_network
from mailguard.core.replies import Reply

RunInThread = Callable[..., "defer.Deferred[Any]"]
CLEANUP_EVERY = 1000          # decisions between two removals of old entries

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (network TEXT, sender TEXT, recipient TEXT, first_seen REAL,
    passed INTEGER, last_seen REAL, PRIMARY KEY (network, sender, recipient));
CREATE TABLE IF NOT EXISTS clients (network TEXT PRIMARY KEY, until REAL);
"""


class GreylistStore:
    """The triplets and whitelisted networks in SQLite; methods block (call them in a thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._decisions = 0

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            self.path.chmod(0o600)
            self._db = db
        return self._db

    def decide(self, network: str, sender: str, recipient: str, now: float, delay: float,
               write: bool = True) -> decide_mod.Outcome:
        """Decide one triplet and store the new state (unless ``write`` is false)."""
        key = (network, sender.lower(), recipient.lower())
        with self._lock:
            db = self._open()
            row = db.execute("SELECT first_seen, passed, last_seen FROM triplets WHERE network=? AND sender=? "
                             "AND recipient=?", key).fetchone()
            triplet = decide_mod.Triplet(row[0], bool(row[1]), row[2]) if row else None
            client = db.execute("SELECT until FROM clients WHERE network=?", (network,)).fetchone()
            outcome = decide_mod.decide(triplet, client[0] if client else None, now, delay)
            if not write:
                return outcome
            with db:
                if outcome.triplet is not None:
                    t = outcome.triplet
                    db.execute("INSERT OR REPLACE INTO triplets VALUES (?, ?, ?, ?, ?, ?)",
                               (*key, t.first_seen, int(t.passed), t.last_seen))
                if outcome.whitelist_until is not None:
                    db.execute("INSERT OR REPLACE INTO clients VALUES (?, ?)", (network, outcome.whitelist_until))
            self._decisions += 1
            if self._decisions % CLEANUP_EVERY == 0:
                self._cleanup(db, now)
            return outcome

    @staticmethod
    def _cleanup(db: sqlite3.Connection, now: float) -> None:
        with db:
            db.execute("DELETE FROM triplets WHERE (passed = 0 AND first_seen < ?) OR last_seen < ?",
                       (now - decide_mod.RETRY_WINDOW, now - decide_mod.MAX_AGE))
            db.execute("DELETE FROM clients WHERE until < ?", (now,))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class Greylist:
    """The RCPT-stage check; see the module docstring."""

    rule = "greylisted"
    stage = RCPT
    for_trusted = False

    def __init__(self, store: GreylistStore, delay: int, reply: Reply, run_in_thread: RunInThread) -> None:
        self.store = store
        self.delay = delay
        self.reply = reply
        self.run_in_thread = run_in_thread

    def connected(self, conn: Connection) -> None:
        pass

    async def check(self, facts: Facts) -> Refusal | None:
        network = client_network(facts.conn.ip)
        recipient = facts.recipient or ""
        outcome: decide_mod.Outcome = await self.run_in_thread(
            self.store.decide, network, facts.sender, recipient, facts.now, self.delay, not facts.dry_run)
        if not outcome.deferred:
            return None
        return Refusal(self.rule, self.reply, f"triplet={network},<{facts.sender}>,<{recipient}> {outcome.reason}")
