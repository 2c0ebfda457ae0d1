"""Tests for the admin command line's guards: entries that point at nothing, and short passwords."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from passlib.context import CryptContext

from mailguard import config
from mailguard.app import cli
from mailguard.directory import sqlite as directory_mod
from mailguard.directory.sqlite import SQLiteStore

CHEAP = CryptContext(schemes=["sha256_crypt"], sha256_crypt__default_rounds=1000)
CONF = """\
[server]
hostname = "mx.office.example"
data_dir = "data"
[domains."office.example"]
route = "inbound"
[domains."old.example"]
route = "reroute"
to = "office.example"
[domains."partner.example"]
route = "relay"
"""
NOTHING = "points at nothing: no mailbox, alias, list or contact"


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """office.example inbound, old.example rerouted to it, partner.example relayed; a cheap hash."""
    monkeypatch.setattr(directory_mod, "HASHES", CHEAP)
    path = tmp_path / "mailguard.toml"
    path.write_text(CONF)
    return path


def run(conf: Path, capsys: pytest.CaptureFixture[str], *argv: str, stdin: str = "") -> tuple[int, str, str]:
    """``mailguard --config CONF ARGV...``: (exit status, stdout, stderr)."""
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdin", io.StringIO(stdin))
        code = cli.main(["--config", str(conf), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def store(conf: Path) -> SQLiteStore:
    return SQLiteStore(conf.parent / "data" / "directory.sqlite")


def test_alias_to_nothing_is_saved_with_a_warning(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An alias to an unknown address of an inbound domain (a typo) is saved, exit 0, and stderr
    says it points at nothing; through a reroute, the address looked for is the rerouted one."""
    assert run(conf, capsys, "alias", "add", "info@office.example", "typo@office.example") == (
        0, "alias info@office.example -> typo@office.example\n",
        f"mailguard: warning: alias info@office.example -> typo@office.example {NOTHING} typo@office.example\n")
    assert run(conf, capsys, "alias", "add", "sales@office.example", "typo@old.example") == (
        0, "alias sales@office.example -> typo@old.example\n",
        f"mailguard: warning: alias sales@office.example -> typo@old.example {NOTHING} typo@office.example\n")
    assert store(conf).kind("info@office.example") == "alias"


@pytest.mark.parametrize("target", ["bob@office.example", "bob@old.example", "postmaster@office.example",
                                    "someone@partner.example", "someone@remote.example", "sales@office.example"])
def test_alias_to_something_is_quiet(conf: Path, capsys: pytest.CaptureFixture[str], target: str) -> None:
    """A mailbox (directly or through a reroute), another alias, postmaster@, a relay or a remote
    domain: no warning (only the domain's own server knows its remote addresses)."""
    assert run(conf, capsys, "user", "add", "bob@office.example", "--password-stdin", stdin="long enough\n")[0] == 0
    assert run(conf, capsys, "alias", "add", "sales@office.example", "bob@office.example")[0] == 0
    assert run(conf, capsys, "alias", "add", "info@office.example", target) == (
        0, f"alias info@office.example -> {target}\n", "")


def test_list_and_contact_warn_for_each_target_that_points_at_nothing(conf: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``list add`` warns once per member that is nothing; ``contact add`` like ``alias add``."""
    run(conf, capsys, "user", "add", "bob@office.example", "--password-stdin", stdin="long enough\n")
    assert run(conf, capsys, "list", "add", "staff@office.example", "bob@office.example", "gone@office.example",
               "ann@remote.example", "left@office.example") == (
        0, "list staff@office.example: 4 member(s) added\n"
           "list staff@office.example: takes mail from anyone and forwards it to remote members; "
           "'mailguard list senders staff@office.example authenticated' limits who may send\n",
        f"mailguard: warning: list staff@office.example: member gone@office.example {NOTHING} gone@office.example\n"
        f"mailguard: warning: list staff@office.example: member left@office.example {NOTHING} left@office.example\n")
    assert run(conf, capsys, "contact", "add", "c@office.example", "nobody@office.example") == (
        0, "contact c@office.example -> nobody@office.example\n",
        f"mailguard: warning: contact c@office.example -> nobody@office.example {NOTHING} nobody@office.example\n")


def test_deleting_a_target_names_what_now_points_at_nothing(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``user del`` (and ``alias del``, ``list del``) warn about every alias, list and contact that
    pointed at the removed entry, directly or through a reroute; the deletion is done, exit 0."""
    run(conf, capsys, "user", "add", "bob@office.example", "--password-stdin", stdin="long enough\n")
    run(conf, capsys, "user", "add", "ann@office.example", "--password-stdin", stdin="long enough\n")
    run(conf, capsys, "alias", "add", "sales@office.example", "bob@office.example")
    run(conf, capsys, "alias", "add", "robert@office.example", "bob@old.example")
    run(conf, capsys, "list", "add", "staff@office.example", "bob@office.example", "ann@office.example")
    run(conf, capsys, "alias", "add", "all@office.example", "staff@office.example")
    assert run(conf, capsys, "user", "del", "bob@office.example") == (
        0, "mailbox bob@office.example deleted (its maildir is kept)\n",
        f"mailguard: warning: alias robert@office.example -> bob@old.example {NOTHING} bob@office.example\n"
        f"mailguard: warning: alias sales@office.example -> bob@office.example {NOTHING} bob@office.example\n"
        f"mailguard: warning: list staff@office.example: member bob@office.example {NOTHING} bob@office.example\n")
    assert run(conf, capsys, "list", "del", "staff@office.example") == (
        0, "list staff@office.example: deleted\n",
        f"mailguard: warning: alias all@office.example -> staff@office.example {NOTHING} staff@office.example\n")
    assert run(conf, capsys, "user", "del", "ann@office.example") == (
        0, "mailbox ann@office.example deleted (its maildir is kept)\n", "")
    assert store(conf).kind("bob@office.example") is None


def test_check_config_and_status_list_entries_pointing_at_nothing(conf: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``check-config`` warns on stderr (exit 0: the configuration is fine); ``status`` prints a
    ``directory:`` line for each, sorted by entry."""
    run(conf, capsys, "alias", "add", "info@office.example", "typo@office.example")
    run(conf, capsys, "list", "add", "staff@office.example", "gone@office.example", "ann@remote.example")
    code, out, err = run(conf, capsys, "check-config")
    assert code == 0 and out.startswith(f"{conf}: ok\n")
    assert err == (f"mailguard: warning: alias info@office.example -> typo@office.example {NOTHING} "
                   f"typo@office.example\n"
                   f"mailguard: warning: list staff@office.example: member gone@office.example {NOTHING} "
                   f"gone@office.example\n")
    code, out, err = run(conf, capsys, "status")
    assert out.endswith(f"directory: sqlite {conf.parent / 'data' / 'directory.sqlite'}, 0 mailbox(es)\n"
                        f"directory: alias info@office.example -> typo@office.example {NOTHING} "
                        f"typo@office.example\n"
                        f"directory: list staff@office.example: member gone@office.example {NOTHING} "
                        f"gone@office.example\n"), out


def test_check_config_is_quiet_without_dangling_entries(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No directory yet, or one whose entries all lead somewhere: nothing on stderr."""
    assert run(conf, capsys, "check-config")[::2] == (0, "")
    run(conf, capsys, "alias", "add", "info@office.example", "postmaster@office.example")
    assert run(conf, capsys, "check-config")[::2] == (0, "")


@pytest.mark.parametrize("argv", [["user", "add", "bob@office.example"], ["user", "passwd", "bob@office.example"]])
def test_short_password_is_refused(conf: Path, capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    """``user add`` and ``user passwd`` refuse a password under ``[auth] min_password_length``
    (8 by default) with one line, exit 1, nothing changed; exactly 8 characters is taken."""
    if argv[1] == "passwd":
        assert run(conf, capsys, "user", "add", "bob@office.example", "--password-stdin", stdin="original pw\n")[0] == 0
    assert run(conf, capsys, *argv, "--password-stdin", stdin="secret7\n") == (
        1, "", f"mailguard: the password is too short: 7 characters, at least 8 needed "
               f"([auth] min_password_length in {conf})\n")
    if argv[1] == "add":
        assert store(conf).mailboxes() == []
    else:
        assert store(conf).verify_password("bob@office.example", "original pw") == "bob@office.example"
    assert run(conf, capsys, *argv, "--password-stdin", stdin="8 chars!\n")[0] == 0
    assert store(conf).verify_password("bob@office.example", "8 chars!") == "bob@office.example"


def test_minimum_password_length_is_configurable(conf: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``[auth] min_password_length = 12`` refuses 11 characters; 1 takes any non-empty password;
    0 or a string is a configuration error naming the key."""
    conf.write_text(CONF + "[auth]\nmin_password_length = 12\n")
    assert run(conf, capsys, "user", "add", "bob@office.example", "--password-stdin", stdin="eleven char\n") == (
        1, "", f"mailguard: the password is too short: 11 characters, at least 12 needed "
               f"([auth] min_password_length in {conf})\n")
    conf.write_text(CONF + "[auth]\nmin_password_length = 1\n")
    assert run(conf, capsys, "user", "add", "bob@office.example", "--password-stdin", stdin="x\n")[0] == 0
    assert config.defaults().auth.min_password_length == 8
    for bad, why in (("0", "must be between 1 and 1024, not 0"), ('"8"', "must be an integer, not '8'")):
        conf.write_text(CONF + f"[auth]\nmin_password_length = {bad}\n")
        assert run(conf, capsys, "check-config") == (
            1, "", f"mailguard: {conf}: auth.min_password_length: {why}\n")
