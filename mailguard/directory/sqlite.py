"""The directory (a Global Address List, as in Exchange), kept in SQLite.

Format
======
``data_dir/directory.sqlite``, WAL mode, tables keyed by lower-case ``local@domain``:

- ``mailboxes(address, password, created, quota)``: local users; ``password`` is a
  libpass (passlib) hash string, argon2 by default; ``quota`` the mailbox's own quota
  in octets (0: none), NULL for the configured ``[limits] mailbox_quota``.
- ``aliases(alias, target)``: another name for any entry, or for a remote address.
- ``list_members(list, member)``: distribution lists; members are local or remote.
- ``contacts(address, remote)``: a custom recipient that forwards to a remote address.
- ``list_senders(list, senders)``: who may send to a list (``anyone``, ``authenticated``,
  ``members``).  A list without a row takes mail from ``anyone``: every list made
  before schema version 2, and a new one until its policy is set.

An address is at most one kind of entry.  The server queries the file for every
lookup, so changes made by the CLI (another process) are seen at once.

Two faces
=========
:class:`SQLiteStore` is the blocking store: lookups and the administrative changes
the CLI makes, run on the caller's thread.  A locked or unreadable database raises
:class:`DirectoryError`.

:class:`SQLiteDirectory` is the server's :class:`~mailguard.directory.base.Directory`:
it runs every lookup on a dedicated thread (a locked database waits there for its
busy timeout, never on the reactor), and password checks, which cost
tens of milliseconds of CPU, on the pool it is given for hashing.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

from passlib.context import CryptContext

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mailguard.core.address import AddressError, parse_path
from mailguard.core.entries import SENDER_POLICIES
from mailguard.directory import sqlschema as schema
from mailguard.directory.base import DirectoryError, EntryError, Expansion
from mailguard.directory.stamped import StampedAnswers

__all__ = ["SQLiteStore", "SQLiteDirectory", "DirectoryError", "EntryError", "Expansion", "HASHES"]

# argon2id with OWASP's recommended minimum (19 MiB, 2 passes, 1 lane): about 20-40 ms
# of one core per check here, instead of libpass's default 64 MiB x 3 x 4 lanes, which
# took 0.5 s under load and made every POP3 login wait for it.
HASHES = CryptContext(schemes=["argon2", "bcrypt", "sha512_crypt"], deprecated="auto",
                      argon2__memory_cost=19456, argon2__time_cost=2, argon2__parallelism=1,
                      argon2__type="ID")
MAX_DEPTH = 8          # alias/list nesting followed before giving up

_KIND_QUERY = """
SELECT 'mailbox' FROM mailboxes WHERE address = ?1
UNION ALL SELECT 'alias' FROM aliases WHERE alias = ?1
UNION ALL SELECT 'list' FROM list_members WHERE list = ?1
UNION ALL SELECT 'contact' FROM contacts WHERE address = ?1
LIMIT 1
"""


@dataclass
class _Walk:
    mailboxes: dict[str, None] = field(default_factory=dict)
    others: dict[str, None] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)


class SQLiteStore:
    """The GAL over one SQLite file, blocking; safe to use from several threads."""

    def __init__(self, path: Path, *, create: bool = True, timeout: float = 0.25) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._local = threading.local()
        self.ready = not create
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._ensure_schema()
            except DirectoryError:
                # Locked or unreadable now: the server starts anyway, answers the
                # 4xx directory_failure meanwhile, and creates the tables when it can.
                pass

    def _ensure_schema(self) -> None:
        try:
            schema.bring_up_to_date(self._db(), self.path)
        except sqlite3.Error as e:
            self._reset()
            raise DirectoryError(f"{self.path}: {e}") from None
        self.ready = True

    # -- connections ---------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            try:
                # Password hashes: the file is private (SQLite gives its -wal and -shm files
                # the same mode).  Made here with 0600 rather than left to the umask.
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    if os.fstat(fd).st_mode & 0o077:      # made 0644 by an older version
                        os.fchmod(fd, 0o600)
                finally:
                    os.close(fd)
            except FileNotFoundError:
                pass                                  # its folder is gone: connect() says so
            except OSError as e:
                raise DirectoryError(f"cannot open {self.path}: {e.strerror or e}") from None
            try:
                db = sqlite3.connect(f"file:{self.path}?mode=rwc", uri=True, timeout=self.timeout,
                                     isolation_level=None, check_same_thread=True)
            except sqlite3.Error as e:
                raise DirectoryError(f"cannot open {self.path}: {e}") from None
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as e:
                db.close()
                raise DirectoryError(f"cannot open {self.path}: {e}") from None
            self._local.db = db
        return db

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        if not self.path.exists():
            # An open connection would go on reading a deleted file: say so instead.
            self._reset()
            raise DirectoryError(f"{self.path} is missing")
        if not self.ready:
            self._ensure_schema()
        try:
            return self._db().execute(sql, args).fetchall()
        except sqlite3.Error as e:
            self._reset()
            raise DirectoryError(f"{self.path}: {e}") from None

    def _reset(self) -> None:
        self._local.own_quotas = None
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def close(self) -> None:
        """Close this thread's connection."""
        self._reset()

    # -- lookups -------------------------------------------------------------

    def kind(self, address: str) -> str | None:
        """``mailbox``, ``alias``, ``list``, ``contact``, or None when unknown."""
        rows = self._query(_KIND_QUERY, (address.lower(),))
        return str(rows[0][0]) if rows else None

    def expand(self, address: str) -> Expansion | None:
        """Expand an address through aliases, lists and contacts; None when unknown.

        Nested aliases and lists are followed up to :data:`MAX_DEPTH`; a loop ends
        where it closes.  Duplicates are removed: one copy per mailbox.
        """
        address = address.lower()
        kind = self.kind(address)
        if kind is None:
            return None
        if kind == "mailbox":                  # the common case: one query
            return Expansion(mailboxes=(address,))
        walk = _Walk()
        self._walk(address, walk, 0)
        senders, members = self._sender_policy(address, kind, walk)
        return Expansion(tuple(walk.mailboxes), tuple(walk.others), senders, members)

    def _sender_policy(self, address: str, kind: str, walk: _Walk) -> tuple[str | None, frozenset[str]]:
        """The sender policy of the list ``address`` is (or that its aliases lead to), and its members.

        The members, only for ``members``: every address the walk reached below the list.
        """
        chain = {address}
        for _ in range(MAX_DEPTH):
            if kind != "alias":
                break
            (target,), = self._query("SELECT target FROM aliases WHERE alias = ?", (address,))
            address = str(target)
            chain.add(address)
            kind = self.kind(address) or ""
        if kind != "list":
            return None, frozenset()
        senders = self.list_senders(address)
        if senders != "members":
            return senders, frozenset()
        return senders, frozenset((walk.seen - chain) | set(walk.mailboxes) | set(walk.others))

    def _walk(self, address: str, walk: _Walk, depth: int) -> None:
        if address in walk.seen:
            return
        walk.seen.add(address)
        kind = self.kind(address)
        if kind is None or depth > MAX_DEPTH:
            walk.others[address] = None
        elif kind == "mailbox":
            walk.mailboxes[address] = None
        elif kind == "alias":
            (target,), = self._query("SELECT target FROM aliases WHERE alias = ?", (address,))
            self._walk(str(target), walk, depth + 1)
        elif kind == "list":
            for (member,) in self._query("SELECT member FROM list_members WHERE list = ? ORDER BY member",
                                         (address,)):
                self._walk(str(member), walk, depth + 1)
        else:
            (remote,), = self._query("SELECT remote FROM contacts WHERE address = ?", (address,))
            walk.others[str(remote).lower()] = None

    def verify_password(self, login: str, password: str) -> str | None:
        """The mailbox address when ``password`` is right for ``login``, else None.

        ``login`` is the mailbox address or one of its aliases.  Unknown logins are
        checked against a dummy hash so that timing does not tell them apart.
        Blocking and CPU-heavy: call it in a thread.
        """
        mailbox = self._login_mailbox(login.strip().lower())
        row = self._query("SELECT password FROM mailboxes WHERE address = ?", (mailbox,)) if mailbox else []
        if not row:
            HASHES.dummy_verify()
            return None
        if HASHES.verify(password, str(row[0][0])):
            return mailbox
        return None

    def _login_mailbox(self, login: str) -> str | None:
        kind = self.kind(login)
        if kind == "mailbox":
            return login
        if kind == "alias":
            exp = self.expand(login)
            if exp is not None and len(exp.mailboxes) == 1 and not exp.others:
                return exp.mailboxes[0]
        return None

    def addresses_of(self, mailbox: str) -> set[str]:
        """The mailbox's own address and every alias that leads only to it."""
        mailbox = mailbox.lower()
        out = {mailbox}
        frontier = [mailbox]
        while frontier:
            target = frontier.pop()
            for (alias,) in self._query("SELECT alias FROM aliases WHERE target = ?", (target,)):
                if str(alias) not in out:
                    out.add(str(alias))
                    frontier.append(str(alias))
        return out

    # -- administration (the CLI) ---------------------------------------------

    def _write(self, sql: str, args: tuple[object, ...]) -> int:
        if not self.ready:
            self._ensure_schema()
        try:
            return self._db().execute(sql, args).rowcount
        except sqlite3.Error as e:
            self._reset()
            raise DirectoryError(f"{self.path}: {e}") from None

    def _must_be_new(self, address: str) -> None:
        kind = self.kind(address)
        if kind is not None:
            raise EntryError(f"{address} exists already (a {kind})")

    def add_mailbox(self, address: str, password: str) -> None:
        """Create a mailbox with a password (hashed here: blocking)."""
        address = address.lower()
        self._must_be_new(address)
        self._write("INSERT INTO mailboxes (address, password, created) VALUES (?, ?, ?)",
                    (address, HASHES.hash(password), time.time()))

    def set_password(self, address: str, password: str) -> None:
        """Change a mailbox's password."""
        if not self._write("UPDATE mailboxes SET password = ? WHERE address = ?",
                           (HASHES.hash(password), address.lower())):
            raise EntryError(f"no mailbox {address}")

    def delete_mailbox(self, address: str) -> None:
        """Remove a mailbox from the directory (its maildir is left on disk)."""
        if not self._write("DELETE FROM mailboxes WHERE address = ?", (address.lower(),)):
            raise EntryError(f"no mailbox {address}")

    def set_quota(self, address: str, quota: int | None) -> None:
        """Give a mailbox its own quota in octets (0: none), or None: the configured default again."""
        if not self._write("UPDATE mailboxes SET quota = ? WHERE address = ?", (quota, address.lower())):
            raise EntryError(f"no mailbox {address}")

    def quotas(self, mailboxes: tuple[str, ...] = ()) -> dict[str, int]:
        """The mailboxes (all when none are named) that have their own quota, with it."""
        if not mailboxes:
            rows = self._query("SELECT address, quota FROM mailboxes WHERE quota IS NOT NULL")
        else:
            marks = ", ".join("?" * len(mailboxes))
            rows = self._query(f"SELECT address, quota FROM mailboxes WHERE quota IS NOT NULL AND address IN ({marks})",
                               tuple(m.lower() for m in mailboxes))
        return {str(a): int(str(q)) for a, q in rows}

    def own_quotas(self) -> dict[str, int]:
        """Every mailbox's own quota, read again only when the file changed since the last call
        on this thread (``PRAGMA data_version``): one tiny query when nothing changed."""
        (version,), = self._query("PRAGMA data_version")
        known: tuple[object, dict[str, int]] | None = getattr(self._local, "own_quotas", None)
        if known is None or known[0] != version:
            known = (version, self.quotas())
            self._local.own_quotas = known
        return known[1]

    def mailboxes(self) -> list[str]:
        """Every mailbox address, sorted."""
        return [str(a) for (a,) in self._query("SELECT address FROM mailboxes ORDER BY address")]

    def add_alias(self, alias: str, target: str) -> None:
        """Make ``alias`` another name for ``target`` (any entry, or a remote address)."""
        alias = alias.lower()
        self._must_be_new(alias)
        if alias == target.lower():
            raise EntryError("an alias cannot point at itself")
        self._write("INSERT INTO aliases VALUES (?, ?)", (alias, target.lower()))

    def delete_alias(self, alias: str) -> None:
        """Remove an alias."""
        if not self._write("DELETE FROM aliases WHERE alias = ?", (alias.lower(),)):
            raise EntryError(f"no alias {alias}")

    def add_list_members(self, name: str, members: list[str]) -> None:
        """Create a list, or add members to it; a member that is not a mail address is refused."""
        name = name.lower()
        for m in members:
            try:
                if parse_path(m) is None:
                    raise AddressError("empty address")
            except AddressError as e:
                raise EntryError(f"list {name}: member {m!r} is not a mail address: {e}") from None
        kind = self.kind(name)
        if kind not in (None, "list"):
            raise EntryError(f"{name} exists already (a {kind})")
        for m in members:
            self._write("INSERT OR IGNORE INTO list_members VALUES (?, ?)", (name, m.lower()))

    def delete_list(self, name: str, members: list[str] | None = None) -> None:
        """Remove some members, or the whole list when ``members`` is empty."""
        name = name.lower()
        if self.kind(name) != "list":
            raise EntryError(f"no list {name}")
        if members:
            for m in members:
                self._write("DELETE FROM list_members WHERE list = ? AND member = ?", (name, m.lower()))
        else:
            self._write("DELETE FROM list_members WHERE list = ?", (name,))
        if self.kind(name) != "list":          # gone: a list made again later starts afresh
            self._write("DELETE FROM list_senders WHERE list = ?", (name,))

    def list_senders(self, name: str) -> str:
        """Who may send to the list ``name``: ``anyone`` (also without a row), ``authenticated``, ``members``."""
        rows = self._query("SELECT senders FROM list_senders WHERE list = ?", (name.lower(),))
        return str(rows[0][0]) if rows else "anyone"

    def set_list_senders(self, name: str, senders: str) -> None:
        """Set who may send to the list ``name`` (one of :data:`SENDER_POLICIES`)."""
        name = name.lower()
        if senders not in SENDER_POLICIES:
            raise EntryError(f"list {name}: senders must be one of {', '.join(SENDER_POLICIES)}, not {senders!r}")
        if self.kind(name) != "list":
            raise EntryError(f"no list {name}")
        self._write("INSERT OR REPLACE INTO list_senders VALUES (?, ?)", (name, senders))

    def add_contact(self, address: str, remote: str) -> None:
        """Create a contact: mail to ``address`` goes on to ``remote``."""
        address = address.lower()
        self._must_be_new(address)
        self._write("INSERT INTO contacts VALUES (?, ?)", (address, remote.lower()))

    def delete_contact(self, address: str) -> None:
        """Remove a contact."""
        if not self._write("DELETE FROM contacts WHERE address = ?", (address.lower(),)):
            raise EntryError(f"no contact {address}")

    def references(self) -> list[tuple[str, str, str]]:
        """Every address an entry points at, as ``(entry, kind, target)``: alias targets,
        list members and contacts' remote addresses, sorted."""
        rows = [("alias", a, t) for a, t in self._query("SELECT alias, target FROM aliases")]
        rows += [("list", n, m) for n, m in self._query("SELECT list, member FROM list_members")]
        rows += [("contact", a, r) for a, r in self._query("SELECT address, remote FROM contacts")]
        return sorted((str(entry), kind, str(target)) for kind, entry, target in rows)

    def entries(self) -> list[tuple[str, str, str]]:
        """Every entry as ``(address, kind, detail)``, sorted by address."""
        rows: list[tuple[str, str, str]] = []
        rows += [(str(a), "mailbox", "") for (a,) in self._query("SELECT address FROM mailboxes")]
        rows += [(str(a), "alias", str(t)) for a, t in self._query("SELECT alias, target FROM aliases")]
        lists: dict[str, list[str]] = {}
        for name, member in self._query("SELECT list, member FROM list_members ORDER BY member"):
            lists.setdefault(str(name), []).append(str(member))
        rows += [(n, "list", ", ".join(m)) for n, m in lists.items()]
        rows += [(str(a), "contact", str(r)) for a, r in self._query("SELECT address, remote FROM contacts")]
        return sorted(rows)


T = TypeVar("T")
# One lookup thread, so one connection: in WAL mode readers do not wait for writers,
# so more threads would only help while the file is locked, when each would wait out
# the same busy timeout; and every idle connection left open keeps other processes
# from locking the file exclusively (a lookup that finds the file gone or broken
# closes its thread's connection, which then is the only one).
QUERY_THREADS = 1


class SQLiteDirectory:
    """The :class:`~mailguard.directory.base.Directory` over a :class:`SQLiteStore`.

    Lookups run on a pool of :data:`QUERY_THREADS` thread(s) of its own, started at the
    first lookup (after twistd has forked) and stopped by :meth:`close`; password
    checks run on ``hash_pool`` (the caller starts and stops it).
    """

    def __init__(self, store: SQLiteStore, reactor: IReactorFromThreads, hash_pool: ThreadPool) -> None:
        self.store = store
        self.reactor = reactor
        self.hash_pool = hash_pool
        self._pool: ThreadPool | None = None
        self._own_quotas: dict[str, int] | None = None     # replaced whole by the lookup thread
        self._answers: StampedAnswers[Expansion | None] = StampedAnswers(
            (str(store.path), f"{store.path}-wal"))

    @property
    def ready(self) -> bool:
        """False while the file could not be opened (the server answers 4xx meanwhile)."""
        return self.store.ready

    def _run(self, pool: ThreadPool, f: Callable[..., T], *args: object) -> Deferred[T]:
        return deferToThreadPool(self.reactor, pool, f, *args)

    def _lookups(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=QUERY_THREADS, name="mailguard-directory")
            self._pool.start()
        return self._pool

    def expand(self, address: str) -> Deferred[Expansion | None]:
        """Answered again without a lookup while the file is unchanged (:mod:`.stamped`)."""
        key = address.lower()
        stamp = self._answers.stamp()
        found, answer = self._answers.get(key, stamp)
        if found:
            return succeed(answer)

        def keep(answer: Expansion | None) -> Expansion | None:
            self._answers.put(key, stamp, answer)
            return answer
        return self._run(self._lookups(), self._expand, address).addCallback(keep)

    def _expand(self, address: str) -> Expansion | None:
        """On the lookup thread: the expansion, and a fresh copy of the mailboxes' own quotas."""
        found = self.store.expand(address)
        self._own_quotas = self.store.own_quotas()
        return found

    def verify_password(self, login: str, password: str) -> Deferred[str | None]:
        return self._run(self.hash_pool, self.store.verify_password, login, password)

    def addresses_of(self, mailbox: str) -> Deferred[frozenset[str]]:
        return self._run(self._lookups(), lambda: frozenset(self.store.addresses_of(mailbox)))

    def quotas(self, mailboxes: tuple[str, ...]) -> Deferred[dict[str, int]]:
        """From the copy the last :meth:`expand` took (a RCPT expands its address first), so
        asking costs no trip to the lookup thread; before any expand, from the file."""
        own = self._own_quotas
        if own is None:
            return self._run(self._lookups(), self.store.quotas, mailboxes)
        return succeed({m: own[m] for m in mailboxes if m in own})

    def close(self) -> None:
        """Stop the lookup threads (their connections go with them) and close this thread's."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
        self.store.close()
