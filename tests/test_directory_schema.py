"""The directory's schema version (PRAGMA user_version) and the migrations applied when it opens."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mailguard.directory import sqlschema
from mailguard.directory.sqlite import DirectoryError, SQLiteStore


def test_a_new_file_and_an_old_one_get_the_current_version(tmp_path: Path) -> None:
    """A new file is written at SCHEMA_VERSION; a file from before versions (0) is migrated, rows kept."""
    SQLiteStore(tmp_path / "new.sqlite").mailboxes()
    with sqlite3.connect(tmp_path / "new.sqlite") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (sqlschema.SCHEMA_VERSION,)
    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as db:
        db.executescript(sqlschema._SCHEMA + "INSERT INTO aliases VALUES ('a@x.example', 'b@x.example');")
    SQLiteStore(old)
    with sqlite3.connect(old) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (sqlschema.SCHEMA_VERSION,)
        assert db.execute("SELECT alias, target FROM aliases").fetchall() == [("a@x.example", "b@x.example")]


def test_a_version_1_file_gets_list_sender_policies_and_its_lists_stay_open(tmp_path: Path) -> None:
    """Version 1 had no list_senders table: the upgrade adds it, and a list from before keeps
    taking mail from anyone (the behaviour it had), until its policy is set."""
    path = tmp_path / "v1.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(sqlschema._SCHEMA + "INSERT INTO list_members VALUES ('team@x.example', 'a@x.example');"
                         "PRAGMA user_version = 1;")
    store = SQLiteStore(path)
    assert store.list_senders("team@x.example") == "anyone"
    exp = store.expand("team@x.example")
    assert exp is not None and exp.senders == "anyone"
    store.set_list_senders("team@x.example", "members")
    exp = store.expand("team@x.example")
    assert exp is not None and exp.senders == "members" and exp.members == {"a@x.example"}
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (sqlschema.SCHEMA_VERSION,)


def test_a_newer_file_is_refused(tmp_path: Path) -> None:
    """A file written by a newer mailguard is not touched: a DirectoryError naming both versions."""
    path = tmp_path / "newer.sqlite"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {sqlschema.SCHEMA_VERSION + 1}")
    with pytest.raises(DirectoryError, match=f"schema version {sqlschema.SCHEMA_VERSION + 1} is newer"):
        SQLiteStore(path, create=False)._ensure_schema()
