"""Tests for mailguard.directory.sqlite: the SQLite GAL (entries, expansion, passwords, failures)."""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from passlib.context import CryptContext
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from mailguard.app import cli
from mailguard.directory import sqlite as directory_mod
from mailguard.directory.sqlite import DirectoryError, EntryError, Expansion, SQLiteDirectory, SQLiteStore

CHEAP = CryptContext(schemes=["sha256_crypt"], sha256_crypt__default_rounds=1000)


@pytest.fixture
def gal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SQLiteStore]:
    """A fresh directory with a cheap hash scheme (argon2 is tested once on its own)."""
    monkeypatch.setattr(directory_mod, "HASHES", CHEAP)
    d = SQLiteStore(tmp_path / "var" / "directory.sqlite")
    yield d
    d.close()


def test_mailbox_crud(gal: SQLiteStore) -> None:
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


def test_alias_crud(gal: SQLiteStore) -> None:
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


def test_list_crud(gal: SQLiteStore) -> None:
    """Lists gain and lose members; deleting without members removes the list."""
    gal.add_mailbox("alice@office.example", "pw")
    gal.add_list_members("staff@office.example", ["alice@office.example", "Partner@Remote.Example"])
    gal.add_list_members("staff@office.example", ["alice@office.example"])      # no duplicate row
    assert gal.kind("staff@office.example") == "list"
    assert ("staff@office.example", "list", "alice@office.example, partner@remote.example") in gal.entries()
    gal.delete_list("staff@office.example", ["partner@remote.example"])
    assert gal.expand("staff@office.example") == Expansion(mailboxes=("alice@office.example",), senders="anyone")
    gal.delete_list("staff@office.example")
    assert gal.kind("staff@office.example") is None
    with pytest.raises(EntryError):
        gal.delete_list("staff@office.example")
    with pytest.raises(EntryError):
        gal.add_list_members("alice@office.example", ["x@y.example"])


def test_contact_crud(gal: SQLiteStore) -> None:
    """A contact forwards to its remote address."""
    gal.add_contact("Vendor@office.example", "Sales@Vendor.Example")
    assert gal.expand("vendor@office.example") == Expansion(others=("sales@vendor.example",))
    with pytest.raises(EntryError):
        gal.add_contact("vendor@office.example", "x@y.example")
    gal.delete_contact("vendor@office.example")
    assert gal.kind("vendor@office.example") is None
    with pytest.raises(EntryError):
        gal.delete_contact("vendor@office.example")


def test_unknown_address_expands_to_none(gal: SQLiteStore) -> None:
    """An address not in the directory is None (the policy answers unknown_recipient)."""
    assert gal.expand("nobody@office.example") is None


def test_nested_expansion_dedupes_and_stops_at_loops(gal: SQLiteStore) -> None:
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


def test_alias_loop_expands_to_nothing(gal: SQLiteStore) -> None:
    """a -> b -> a ends where it closes: no mailbox, no endless walk."""
    gal.add_alias("a@office.example", "b@office.example")
    gal.add_alias("b@office.example", "a@office.example")
    assert gal.expand("a@office.example") == Expansion()


def test_deep_nesting_is_bounded(gal: SQLiteStore) -> None:
    """A chain deeper than MAX_DEPTH stops; the rest is left to the router as an address."""
    gal.add_mailbox("end@office.example", "pw")
    n = directory_mod.MAX_DEPTH + 3
    for i in range(n):
        gal.add_alias(f"a{i}@office.example", f"a{i + 1}@office.example" if i + 1 < n else "end@office.example")
    exp = gal.expand("a0@office.example")
    assert exp is not None and exp.mailboxes == () and len(exp.others) == 1


def test_verify_password(gal: SQLiteStore) -> None:
    """The right password gives the mailbox (also via a sole alias, any case); wrong or unknown gives None."""
    gal.add_mailbox("alice@office.example", "correct horse")
    gal.add_alias("a.smith@office.example", "alice@office.example")
    assert gal.verify_password("alice@office.example", "correct horse") == "alice@office.example"
    assert gal.verify_password(" Alice@Office.example ", "correct horse") == "alice@office.example"
    assert gal.verify_password("a.smith@office.example", "correct horse") == "alice@office.example"
    assert gal.verify_password("alice@office.example", "Correct horse") is None
    assert gal.verify_password("alice@office.example", "") is None
    assert gal.verify_password("nobody@office.example", "correct horse") is None


def test_list_and_contact_cannot_log_in(gal: SQLiteStore) -> None:
    """Only mailboxes (and aliases of exactly one mailbox) have passwords."""
    gal.add_mailbox("alice@office.example", "pw")
    gal.add_mailbox("bob@office.example", "pw")
    gal.add_list_members("staff@office.example", ["alice@office.example"])
    gal.add_list_members("both@office.example", ["alice@office.example", "bob@office.example"])
    gal.add_contact("vendor@office.example", "alice@office.example")
    for login in ("staff@office.example", "both@office.example", "vendor@office.example"):
        assert gal.verify_password(login, "pw") is None, login


def test_set_password(gal: SQLiteStore) -> None:
    """passwd replaces the hash; the old password stops working."""
    gal.add_mailbox("alice@office.example", "old")
    gal.set_password("alice@office.example", "new")
    assert gal.verify_password("alice@office.example", "old") is None
    assert gal.verify_password("alice@office.example", "new") == "alice@office.example"
    with pytest.raises(EntryError):
        gal.set_password("nobody@office.example", "x")


def test_passwords_are_stored_hashed(tmp_path: Path) -> None:
    """With the shipped context the stored password is an argon2 hash, never the password."""
    d = SQLiteStore(tmp_path / "d.sqlite")
    d.add_mailbox("alice@office.example", "s3cret-pass")
    d.close()
    db = sqlite3.connect(tmp_path / "d.sqlite")
    (stored,), = db.execute("SELECT password FROM mailboxes").fetchall()
    db.close()
    assert stored.startswith("$argon2") and "s3cret-pass" not in stored
    assert d.verify_password("alice@office.example", "s3cret-pass") == "alice@office.example"
    assert d.verify_password("alice@office.example", "s3cret-pasS") is None


def test_addresses_of(gal: SQLiteStore) -> None:
    """A mailbox owns its address and every alias chain that leads to it, nothing else."""
    gal.add_mailbox("alice@office.example", "pw")
    gal.add_mailbox("bob@office.example", "pw")
    gal.add_alias("a.smith@office.example", "alice@office.example")
    gal.add_alias("smithy@office.example", "a.smith@office.example")
    gal.add_alias("robert@office.example", "bob@office.example")
    gal.add_list_members("staff@office.example", ["alice@office.example"])
    assert gal.addresses_of("Alice@office.example") == {
        "alice@office.example", "a.smith@office.example", "smithy@office.example"}


def test_changes_from_another_process_are_seen_at_once(gal: SQLiteStore, tmp_path: Path) -> None:
    """The server's SQLiteStore sees an entry another connection (the CLI) just added."""
    assert gal.expand("new@office.example") is None
    cli = SQLiteStore(gal.path)
    cli.add_mailbox("new@office.example", "pw")
    cli.close()
    assert gal.expand("new@office.example") == Expansion(mailboxes=("new@office.example",))


def test_locked_database_raises_directory_error(gal: SQLiteStore) -> None:
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
    d = SQLiteStore(path, create=False)
    with pytest.raises(DirectoryError):
        d.expand("alice@office.example")
    with pytest.raises(DirectoryError):
        d.verify_password("alice@office.example", "pw")


def test_missing_tables_raise_directory_error(tmp_path: Path) -> None:
    """A directory file replaced by an empty database answers DirectoryError, not 'unknown user'."""
    path = tmp_path / "directory.sqlite"
    d = SQLiteStore(path, create=False)
    with pytest.raises(DirectoryError):
        d.kind("alice@office.example")


# -- SQLiteDirectory: the server's asynchronous face --------------------------------------------------


class ThreadReactor:
    """The one reactor method deferToThreadPool uses: results queue up until the test drains them."""

    def __init__(self) -> None:
        self.calls: queue.Queue[tuple[Callable[..., object], tuple[object, ...]]] = queue.Queue()

    def callFromThread(self, f: Callable[..., object], *args: object) -> None:
        self.calls.put((f, args))

    def result(self, d: Deferred[Any], deadline: float = 10.0) -> Any:
        """Run what the threads handed back until ``d`` has fired (or the deadline passes)."""
        out: list[Any] = []
        d.addBoth(out.append)
        end = time.monotonic() + deadline
        while not out:
            f, args = self.calls.get(timeout=max(0.0, end - time.monotonic()))
            f(*args)
        return out[0]


@pytest.fixture
def async_gal(gal: SQLiteStore) -> Iterator[tuple[SQLiteDirectory, ThreadReactor]]:
    """A SQLiteDirectory over the test store, and the reactor stand-in its results come back through."""
    reactor = ThreadReactor()
    hashes = ThreadPool(minthreads=0, maxthreads=1, name="test-hash")
    hashes.start()
    d = SQLiteDirectory(gal, reactor, hashes)      # type: ignore[arg-type]
    yield d, reactor
    d.close()
    hashes.stop()


def test_sqlite_directory_answers_as_the_store(gal: SQLiteStore,
                                               async_gal: tuple[SQLiteDirectory, ThreadReactor]) -> None:
    """expand, addresses_of and verify_password give the store's answers, as Deferreds."""
    d, reactor = async_gal
    gal.add_mailbox("alice@office.example", "pw")
    gal.add_alias("a.smith@office.example", "alice@office.example")
    assert reactor.result(d.expand("A.Smith@office.example")) == Expansion(mailboxes=("alice@office.example",))
    assert reactor.result(d.expand("nobody@office.example")) is None
    assert reactor.result(d.addresses_of("alice@office.example")) == \
        frozenset({"alice@office.example", "a.smith@office.example"})
    assert reactor.result(d.verify_password("a.smith@office.example", "pw")) == "alice@office.example"
    assert reactor.result(d.verify_password("alice@office.example", "wrong")) is None


def test_sqlite_directory_queries_off_the_calling_thread(gal: SQLiteStore,
                                                         async_gal: tuple[SQLiteDirectory, ThreadReactor]) -> None:
    """Every lookup runs on another thread: a database locked by another process leaves the
    caller (the reactor) free at once, and the lookup then fails with DirectoryError (a 4xx)."""
    d, reactor = async_gal
    gal.add_mailbox("alice@office.example", "pw")
    gal.close()
    threads: list[int] = []
    expand = gal.expand
    gal.expand = lambda address: threads.append(threading.get_ident()) or expand(address)  # type: ignore[method-assign]
    holder = sqlite3.connect(gal.path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("INSERT INTO contacts VALUES ('x@office.example', 'y@remote.example')")
        pending = d.expand("alice@office.example")
        owned = d.addresses_of("alice@office.example")
        assert not pending.called and not owned.called       # nothing ran on this thread
        failure = reactor.result(pending)
        assert isinstance(failure, Failure) and failure.check(DirectoryError), failure
        failure = reactor.result(owned)
        assert isinstance(failure, Failure) and failure.check(DirectoryError), failure
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert threads and threading.get_ident() not in threads
    assert reactor.result(d.expand("alice@office.example")) == Expansion(mailboxes=("alice@office.example",))


def test_sqlite_directory_quotas_follow_the_cli_without_a_thread_trip(
        gal: SQLiteStore, async_gal: tuple[SQLiteDirectory, ThreadReactor]) -> None:
    """Each expand refreshes the mailboxes' own quotas (only when the file changed), so quotas()
    answers at once; a change made by another process (the CLI) shows at the next expand."""
    d, reactor = async_gal
    gal.add_mailbox("alice@office.example", "pw")
    cli_store = SQLiteStore(gal.path)                  # another connection, as the CLI has
    assert reactor.result(d.quotas(("alice@office.example",))) == {}     # before any expand: from the file
    cli_store.set_quota("alice@office.example", 5000)
    reactor.result(d.expand("alice@office.example"))
    answer = d.quotas(("alice@office.example", "bob@office.example"))
    assert answer.called and reactor.result(answer) == {"alice@office.example": 5000}
    cli_store.set_quota("alice@office.example", None)
    reactor.result(d.expand("alice@office.example"))
    assert reactor.result(d.quotas(("alice@office.example",))) == {}
    cli_store.close()


# -- list members that are not addresses -------------------------------------------------------------


@pytest.mark.parametrize("member", ["foo", "a b@office.example", "x%y@office.example", ""])
def test_list_member_that_is_not_an_address_is_refused(gal: SQLiteStore, member: str) -> None:
    """The store refuses a list member that does not parse; nothing of the change is written."""
    with pytest.raises(EntryError, match=f"member {member!r} is not a mail address"):
        gal.add_list_members("staff@office.example", ["bob@office.example", member])
    assert gal.kind("staff@office.example") is None


def test_cli_refuses_a_list_member_that_is_not_an_address(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """``mailguard list add`` with a member that is no address: one line naming it, exit 1, no list."""
    conf = tmp_path / "mailguard.toml"
    conf.write_text('[server]\nhostname = "mx.office.example"\ndata_dir = "data"\n'
                    '[domains."office.example"]\nroute = "inbound"\n')
    assert cli.main(["--config", str(conf), "list", "add", "staff@office.example", "bob@office.example",
                     "bob"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("mailguard: list staff@office.example: member 'bob' is not a mail address: "
                   "address must be fully qualified (local@domain)\n")
    assert SQLiteStore(tmp_path / "data" / "directory.sqlite").kind("staff@office.example") is None


def test_unparsable_member_in_the_database_is_an_other(gal: SQLiteStore) -> None:
    """A member written past the checks (by hand, by an older version) comes out of the expansion
    as an address outside the directory; the server logs and drops it (see test_smtp)."""
    gal.add_mailbox("bob@office.example", "pw")
    gal.add_list_members("staff@office.example", ["bob@office.example"])
    gal._write("INSERT INTO list_members VALUES (?, ?)", ("staff@office.example", "bob"))
    assert gal.expand("staff@office.example") == Expansion(mailboxes=("bob@office.example",), others=("bob",),
                                                           senders="anyone")


@pytest.mark.parametrize("address, reason", [
    ("a/b@office.example", "a mailbox name may not hold '/', '\\', '..' or start with '.'"),
    ('"../../../etc"@office.example', "a mailbox name may not hold '/', '\\', '..' or start with '.'"),
    ('"a\\\\b"@office.example', "a mailbox name may not hold '/', '\\', '..' or start with '.'"),
])
@pytest.mark.parametrize("command", [["user", "add", "{a}", "--password-stdin"], ["list", "add", "team@office.example", "{a}"],
                                     ["alias", "add", "{a}", "alice@office.example"]])
def test_cli_refuses_addresses_delivery_cannot_store(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch, address: str, reason: str,
                                                     command: list[str]) -> None:
    """Addresses whose mailbox would be a path (a '/', '..') or hold a control character are
    refused by the CLI with one line saying why, exit 1, nothing written (issue 17 item 10)."""
    import io
    conf = tmp_path / "mailguard.toml"
    conf.write_text('[server]\nhostname = "mx.office.example"\ndata_dir = "data"\n'
                    '[domains."office.example"]\nroute = "inbound"\n')
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    argv = [part.replace("{a}", address) for part in command]
    assert cli.main(["--config", str(conf), *argv]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("mailguard: ") and err.endswith(f"{address!r} cannot be used: {reason}\n"), err
    assert SQLiteStore(tmp_path / "data" / "directory.sqlite").entries() == []


def test_fail2ban_jail_names_the_configured_ports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``mailguard fail2ban-jail`` bans the ports [listen] names, not 25/587/... (issue 17 item 11)."""
    conf = tmp_path / "mailguard.toml"
    conf.write_text('[server]\nhostname = "mx.office.example"\ndata_dir = "data"\n'
                    '[listen]\nsmtp = ["tcp:25:interface=0.0.0.0", "tcp:2526"]\n'
                    'submission = ["tcp:port=587"]\n')
    assert cli.main(["--config", str(conf), "fail2ban-jail", "--logpath", "/var/log/m.log"]) == 0
    out = capsys.readouterr().out
    assert "port     = 25,2526,587,2465,2110,2995\n" in out
    assert "logpath  = /var/log/m.log\n" in out and "filter   = mailguard\n" in out


def test_an_unchanged_file_answers_again_without_a_lookup(
        gal: SQLiteStore, async_gal: tuple[SQLiteDirectory, ThreadReactor]) -> None:
    """The second RCPT to an address (any case) is answered at once, from the answer kept; unknown too."""
    d, reactor = async_gal
    gal.add_mailbox("alice@office.example", "pw")
    asked: list[str] = []
    expand = gal.expand
    gal.expand = lambda address: asked.append(address) or expand(address)  # type: ignore[method-assign]
    first = reactor.result(d.expand("alice@office.example"))
    again = d.expand("Alice@Office.example")
    assert again.called and reactor.result(again) == first == Expansion(mailboxes=("alice@office.example",))
    assert reactor.result(d.expand("nobody@office.example")) is None
    assert d.expand("nobody@office.example").called
    assert asked == ["alice@office.example", "nobody@office.example"]


def test_a_change_by_the_cli_is_seen_by_the_next_rcpt(
        gal: SQLiteStore, async_gal: tuple[SQLiteDirectory, ThreadReactor]) -> None:
    """Each add, alias, removal or quota made through another connection shows at the next expand."""
    d, reactor = async_gal
    cli_store = SQLiteStore(gal.path)
    try:
        for n in range(20):                            # back to back: no time passes between them
            address = f"u{n}@office.example"
            assert reactor.result(d.expand(address)) is None
            cli_store.add_mailbox(address, "pw")
            assert reactor.result(d.expand(address)) == Expansion(mailboxes=(address,))
            cli_store.add_alias(f"a{n}@office.example", address)
            assert reactor.result(d.expand(f"a{n}@office.example")) == Expansion(mailboxes=(address,))
            cli_store.delete_alias(f"a{n}@office.example")
            cli_store.delete_mailbox(address)
            assert reactor.result(d.expand(address)) is None
    finally:
        cli_store.close()


def test_a_failed_lookup_is_not_kept(gal: SQLiteStore, async_gal: tuple[SQLiteDirectory, ThreadReactor]) -> None:
    """A lookup that failed (a 4xx for the client) is asked again next time, and then answers."""
    d, reactor = async_gal
    gal.add_mailbox("alice@office.example", "pw")
    expand = gal.expand
    gal.expand = lambda address: (_ for _ in ()).throw(DirectoryError("locked"))  # type: ignore[method-assign]
    failure = reactor.result(d.expand("alice@office.example"))
    assert isinstance(failure, Failure) and failure.check(DirectoryError)
    gal.expand = expand                                # type: ignore[method-assign]
    assert reactor.result(d.expand("alice@office.example")) == Expansion(mailboxes=("alice@office.example",))
