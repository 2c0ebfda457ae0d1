"""The format of ``directory.sqlite``: its tables, its version and the migrations between versions."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from mailguard.directory.base import DirectoryError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailboxes (address TEXT PRIMARY KEY, password TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS aliases (alias TEXT PRIMARY KEY, target TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS list_members (list TEXT NOT NULL, member TEXT NOT NULL, PRIMARY KEY (list, member));
CREATE TABLE IF NOT EXISTS contacts (address TEXT PRIMARY KEY, remote TEXT NOT NULL);
"""

#: The schema version this code writes (``PRAGMA user_version``); 0 is a file made
#: before versions were recorded (the same four tables as version 1).
SCHEMA_VERSION = 3
#: The SQL that takes a database from version ``n - 1`` to ``n``, applied in order at
#: start (and by any command that opens the file), each step in one transaction.
MIGRATIONS: dict[int, str] = {
    1: "",
    # Lists' sender policies; existing lists get no row: they go on taking mail from anyone.
    2: "CREATE TABLE IF NOT EXISTS list_senders (list TEXT PRIMARY KEY, senders TEXT NOT NULL "
       "CHECK (senders IN ('anyone', 'authenticated', 'members')));",
    3: "ALTER TABLE mailboxes ADD COLUMN quota INTEGER;",   # per-mailbox quota; NULL = the default
}


def bring_up_to_date(db: sqlite3.Connection, path: Path) -> None:
    """Make the tables, then bring the file to :data:`SCHEMA_VERSION` through :data:`MIGRATIONS`.

    :raises DirectoryError: the file was written by a newer mailguard.
    """
    db.executescript(_SCHEMA)
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise DirectoryError(f"{path}: schema version {version} is newer than this mailguard's "
                             f"({SCHEMA_VERSION}); run the mailguard that wrote it")
    for step in range(version + 1, SCHEMA_VERSION + 1):
        db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[step]}\nPRAGMA user_version = {step}; COMMIT;")
