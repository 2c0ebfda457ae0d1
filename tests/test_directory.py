"""Tests for mailguard.directory.sqlite: the SQLite GAL (entries, expansion, passwords, failures)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Iterator

import pytest
from passlib.context import CryptContext

from mailguard.directory import sqlite as directory_mod
from mailguard.directory.sqlite import Directory, DirectoryError, EntryError, Expansion

CHEAP = CryptContext(schemes=["sha256_crypt"], sha256_crypt__default_rounds=1000)


@pytest.fixture
def gal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Directory]:
    """A fresh directory with a cheap hash scheme (argon2 is tested once on its own)."""
    monkeypatch.setattr(directory_mod, "HASHES", CHEAP)
    d = Directory(tmp_path / "var" / "directory.sqlite")
    yield d
    d.close()


def test_mailbox_crud(gal: Directory) -> None:
    """Mailboxes are created lower-cased, listed, and deleted; a second create is refused."""
    gal.add_mailbox("Alice@Office.Example", "pw1")
    gal.add_mailbox("bob@office.example", "pw2")
    assert gal.mailboxes() == ["alice@office.example", "bob@office.example"]
    assert gal.kind("ALICE@office.example") == "mailbox"
    with pytest.raises(EntryError):
        gal.add_mailbox("alice@office.example", "again")
    gal.delete_mailbox("bob@office.example")
    assert gal.mailboxes() == ["alice@office.example"] and gal.kind("bob@office.example") is None
    with pytest.raises(EntryError):
        gal.delete_mailbox("bob@office.example")


def test_alias_crud(gal: Directory) -> None:
    """An alias points at a target; it cannot shadow another entry or point at itself."""
    gal.add_mailbox("alice@office.example", "pw")
    gal.add_alias("A.Smith@office.example", "Alice@office.example")
    assert gal.kind("a.smith@office.example") == "alias"
    assert gal.expand("a.smith@office.example") == Expansion(mailboxes=("alice@office.example",))
    with pytest.raises(EntryError):
        gal.add_alias("alice@office.example", "bob@office.example")
    with pytest.raises(EntryError):
        gal.add_alias("self@office.example", "SELF@office.example")
    gal.delete_alias("a.smith@office.example")
    assert gal.expand("a.smith@office.example") is None
    with pytest.raises(EntryError):
        gal.delete_alias("a.smith@office.example")


def test_list_crud(gal: Directory) -> None:
    """Lists gain and lose members; deleting without members removes the list."""
    gal.add_mailbox("alice@office.example", "pw")
    gal.add_list_members("staff@office.example", ["alice@office.example", "Partner@Remote.Example"])
    gal.add_list_members("staff@office.example", ["alice@office.example"])      # no duplicate row
    assert gal.kind("staff@office.example") == "list"
    assert ("staff@office.example", "list", "alice@office.example, partner@remote.example") in gal.entries()
    gal.delete_list("staff@office.example", ["partner@remote.example"])
    assert gal.expand("staff@office.example") == Expansion(mailboxes=("alice@office.example",))
    gal.delete_list("staff@office.example")
    assert gal.kind("staff@office.example") is None
    with pytest.raises(EntryError):
        gal.delete_list("staff@office.example")
    with pytest.raises(EntryError):
        gal.add_list_members("alice@office.example", ["x@y.example"])


def test_contact_crud(gal: Directory) -> None:
    """A contact forwards to its remote address."""
    gal.add_contact("Vendor@office.example", "Sales@Vendor.Example")
    assert gal.expand("vendor@office.example") == Expansion(others=("sales@vendor.example",))
    with pytest.raises(EntryError):
        gal.add_contact("vendor@office.example", "x@y.example")
    gal.delete_contact("vendor@office.example")
    assert gal.kind("vendor@office.example") is None
    with pytest.raises(EntryError):
        gal.delete_contact("vendor@office.example")


def test_unknown_address_expands_to_none(gal: Directory) -> None:
    """An address not in the directory is None (the policy answers unknown_recipient)."""
    assert gal.expand("nobody@office.example") is None


def test_nested_expansion_dedupes_and_stops_at_loops(gal: Directory) -> None:
    """Lists inside lists and aliases are followed; each mailbox appears once; loops end."""
    for m in ("alice", "bob", "carol"):
        gal.add_mailbox(f"{m}@office.example", "pw")
    gal.add_alias("boss@office.example", "alice@office.example")
    gal.add_contact("vendor@office.example", "sales@vendor.example")
    gal.add_list_members("team@office.example", ["bob@office.example", "boss@office.example", "all@office.example"])
    gal.add_list_members("all@office.example", ["team@office.example", "alice@office.example",
                                                "carol@office.example", "vendor@office.example",
                                                "friend@remote.example", "gone@office.example"])
    exp = gal.expand("all@office.example")
    assert exp is not None
    assert sorted(exp.mailboxes) == ["alice@office.example", "bob@office.example", "carol@office.example"]
    assert len(exp.mailboxes) == 3
    assert sorted(exp.others) == ["friend@remote.example", "gone@office.example", "sales@vendor.example"]
    team = gal.expand("team@office.example")
    assert team is not None and sorted(team.mailboxes) == sorted(exp.mailboxes)


def test_alias_loop_expands_to_nothing(gal: Directory) -> None:
    """a -> b -> a ends where it closes: no mailbox, no endless walk."""
    gal.add_alias("a@office.example", "b@office.example")
    gal.add_alias("b@office.example", "a@office.example")
    assert gal.expand("a@office.example") == Expansion()


def test_deep_nesting_is_bounded(gal: Directory) -> None:
    """A chain deeper than MAX_DEPTH stops; the rest is left to the router as an address."""
    gal.add_mailbox("end@office.example", "pw")
    n = directory_mod.MAX_DEPTH + 3
    for i in range(n):
        gal.add_alias(f"a{i}@office.example", f"a{i + 1}@office.example" if i + 1 < n else "end@office.example")
    exp = gal.expand("a0@office.example")
    assert exp is not None and exp.mailboxes == () and len(exp.others) == 1


def test_verify_password(gal: Directory) -> None:
    """The right password gives the mailbox (also via a sole alias, any case); wrong or unknown gives None."""
    gal.add_mailbox("alice@office.example", "correct horse")
    gal.add_alias("a.smith@office.example", "alice@office.example")
    assert gal.verify_password("alice@office.example", "correct horse") == "alice@office.example"
    assert gal.verify_password(" Alice@Office.example ", "correct horse") == "alice@office.example"
    assert gal.verify_password("a.smith@office.example", "correct horse") == "alice@office.example"
    assert gal.verify_password("alice@office.example", "Correct horse") is None
    assert gal.verify_password("alice@office.example", "") is None
    assert gal.verify_password("nobody@office.example", "correct horse") is None


def test_list_and_contact_cannot_log_in(gal: Directory) -> None:
    """Only mailboxes (and aliases of exactly one mailbox) have passwords."""
    gal.add_mailbox("alice@office.example", "pw")
    gal.add_mailbox("bob@office.example", "pw")
    gal.add_list_members("staff@office.example", ["alice@office.example"])
    gal.add_list_members("both@office.example", ["alice@office.example", "bob@office.example"])
    gal.add_contact("vendor@office.example", "alice@office.example")
    for login in ("staff@office.example", "both@office.example", "vendor@office.example"):
        assert gal.verify_password(login, "pw") is None, login


def test_set_password(gal: Directory) -> None:
    """passwd replaces the hash; the old password stops working."""
    gal.add_mailbox("alice@office.example", "old")
    gal.set_password("alice@office.example", "new")
    assert gal.verify_password("alice@office.example", "old") is None
    assert gal.verify_password("alice@office.example", "new") == "alice@office.example"
    with pytest.raises(EntryError):
        gal.set_password("nobody@office.example", "x")


def test_passwords_are_stored_hashed(tmp_path: Path) -> None:
    """With the shipped context the stored password is an argon2 hash, never the password."""
    d = Directory(tmp_path / "d.sqlite")
    d.add_mailbox("alice@office.example", "s3cret-pass")
    d.close()
    db = sqlite3.connect(tmp_path / "d.sqlite")
    (stored,), = db.execute("SELECT password FROM mailboxes").fetchall()
    db.close()
    assert stored.startswith("$argon2") and "s3cret-pass" not in stored
    assert d.verify_password("alice@office.example", "s3cret-pass") == "alice@office.example"
    assert d.verify_password("alice@office.example", "s3cret-pasS") is None


def test_addresses_of(gal: Directory) -> None:
    """A mailbox owns its address and every alias chain that leads to it, nothing else."""
    gal.add_mailbox("alice@office.example", "pw")
    gal.add_mailbox("bob@office.example", "pw")
    gal.add_alias("a.smith@office.example", "alice@office.example")
    gal.add_alias("smithy@office.example", "a.smith@office.example")
    gal.add_alias("robert@office.example", "bob@office.example")
    gal.add_list_members("staff@office.example", ["alice@office.example"])
    assert gal.addresses_of("Alice@office.example") == {
        "alice@office.example", "a.smith@office.example", "smithy@office.example"}


def test_changes_from_another_process_are_seen_at_once(gal: Directory, tmp_path: Path) -> None:
    """The server's Directory sees an entry another connection (the CLI) just added."""
    assert gal.expand("new@office.example") is None
    cli = Directory(gal.path)
    cli.add_mailbox("new@office.example", "pw")
    cli.close()
    assert gal.expand("new@office.example") == Expansion(mailboxes=("new@office.example",))


def test_locked_database_raises_directory_error(gal: Directory) -> None:
    """A database held exclusively by another process is a DirectoryError (a 4xx), not a crash."""
    gal.add_mailbox("alice@office.example", "pw")
    gal.close()
    holder = sqlite3.connect(gal.path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO contacts VALUES ('x@office.example', 'y@remote.example')")
        with pytest.raises(DirectoryError):
            gal.expand("alice@office.example")
        with pytest.raises(DirectoryError):
            gal.addresses_of("alice@office.example")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert gal.expand("alice@office.example") == Expansion(mailboxes=("alice@office.example",))


def test_unreadable_database_raises_directory_error(tmp_path: Path) -> None:
    """A file that is not a database gives DirectoryError on lookup."""
    path = tmp_path / "directory.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    d = Directory(path, create=False)
    with pytest.raises(DirectoryError):
        d.expand("alice@office.example")
    with pytest.raises(DirectoryError):
        d.verify_password("alice@office.example", "pw")


def test_missing_tables_raise_directory_error(tmp_path: Path) -> None:
    """A directory file replaced by an empty database answers DirectoryError, not 'unknown user'."""
    path = tmp_path / "directory.sqlite"
    d = Directory(path, create=False)
    with pytest.raises(DirectoryError):
        d.kind("alice@office.example")
