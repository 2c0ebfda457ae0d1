"""End to end: mailbox quotas on the real ``twistd -n mailguard`` (issue 17 item 3).

A directory written before quotas existed (schema version 1) is upgraded when the
server starts.  Then, over the wire: a mailbox filled past 90 % of its quota logs
one warning, a full one gets ``452 4.2.2`` at RCPT, a ``SIZE=`` that would not fit
gets ``552 5.2.2``, a list delivers to its members that are not full, and
``mailguard user quota`` changes take effect without a restart.
"""

from __future__ import annotations

import sqlite3

import pytest

from .conftest import DOMAIN, ServerFactory
from .harness import MailguardServer, make_message

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
TEAM = f"team@{DOMAIN}"
DEFAULT_QUOTA = 10000
ALICE_QUOTA = 20000

# The directory as mailguard wrote it before quotas: schema version 1.
VERSION_1 = f"""
CREATE TABLE mailboxes (address TEXT PRIMARY KEY, password TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE aliases (alias TEXT PRIMARY KEY, target TEXT NOT NULL);
CREATE TABLE list_members (list TEXT NOT NULL, member TEXT NOT NULL, PRIMARY KEY (list, member));
CREATE TABLE contacts (address TEXT PRIMARY KEY, remote TEXT NOT NULL);
INSERT INTO mailboxes VALUES ('{ALICE}', '$2b$12$unused', 0), ('{BOB}', '$2b$12$unused', 0);
INSERT INTO list_members VALUES ('{TEAM}', '{ALICE}'), ('{TEAM}', '{BOB}');
PRAGMA user_version = 1;
"""


@pytest.fixture(scope="module")
def quota(server_factory: ServerFactory) -> MailguardServer:
    """A server whose directory file predates quotas; [limits] mailbox_quota = 10000."""
    server = server_factory("quota", {"domains": {DOMAIN: {"route": "inbound"}},
                                      "limits": {"mailbox_quota": DEFAULT_QUOTA}}, start=False)
    server.data_dir.mkdir(parents=True)
    with sqlite3.connect(server.data_dir / "directory.sqlite") as db:
        db.executescript(VERSION_1)
    return server.start()


def used(server: MailguardServer, address: str) -> int:
    return sum(p.stat().st_size for p in server.message_files(address))


def send(server: MailguardServer, rcpt: str, subject: str, lines: int) -> str:
    with server.dialog() as d:
        d.cmd("EHLO client.example")
        assert d.cmd("MAIL FROM:<joe@sender.example>").code == 250
        reply = d.cmd(f"RCPT TO:<{rcpt}>")
        if reply.code != 250:
            return reply.last
        return d.data(make_message("joe@sender.example", rcpt, subject, ["q" * 98] * lines)).last


def test_an_old_directory_is_upgraded_at_start(quota: MailguardServer) -> None:
    """The version-1 file is at the current version once the server has started, its entries kept."""
    with sqlite3.connect(quota.data_dir / "directory.sqlite") as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)
    assert quota.cli_ok("user", "list").stdout == f"{ALICE}\n{BOB}\n"


def test_full_mailbox_452_and_the_ninety_percent_warning(quota: MailguardServer) -> None:
    """alice gets her own 20000-byte quota; deliveries take her past 90 % (one warning line, naming
    her), then to the quota: the next RCPT gets 452 4.2.2, and the server log says so."""
    assert quota.cli_ok("user", "quota", ALICE, str(ALICE_QUOTA)).stdout == f"quota of {ALICE}: 20000 bytes\n"
    assert send(quota, ALICE, "quota-1", 160).startswith("250 ")
    first = used(quota, ALICE)
    assert first < 0.9 * ALICE_QUOTA
    assert quota.log_lines("quota warning") == []
    assert send(quota, ALICE, "quota-2", 15).startswith("250 ")
    assert 0.9 * ALICE_QUOTA <= used(quota, ALICE) < ALICE_QUOTA
    line = quota.wait_for_log("mailguard quota warning")
    assert f"mailguard quota warning: mailbox={ALICE} used=" in line and f"quota={ALICE_QUOTA} percent=9" in line
    assert send(quota, ALICE, "quota-3", 20).startswith("250 ")
    assert used(quota, ALICE) >= ALICE_QUOTA
    assert send(quota, ALICE, "quota-4", 1) == "452 4.2.2 Mailbox full"
    assert len(quota.log_lines("quota warning")) == 1
    quota.wait_for_log(f'rcpt=<{ALICE}> rule=mailbox_quota reply="452 4.2.2 Mailbox full"')
    assert quota.cli_ok("user", "quota", ALICE).stdout == (
        f"{ALICE}: quota 20000 bytes (its own), {used(quota, ALICE)} bytes used\n")


def test_declared_size_over_quota_552(quota: MailguardServer) -> None:
    """bob (the 10000-byte default, empty): MAIL FROM with SIZE=10001 gets 552 5.2.2 at RCPT;
    SIZE=9000 is accepted."""
    with quota.dialog() as d:
        d.cmd("EHLO client.example")
        assert d.cmd("MAIL FROM:<joe@sender.example> SIZE=10001").code == 250
        assert d.cmd(f"RCPT TO:<{BOB}>").last == "552 5.2.2 Message would exceed the mailbox quota"
        d.cmd("RSET")
        assert d.cmd("MAIL FROM:<joe@sender.example> SIZE=9000").code == 250
        assert d.cmd(f"RCPT TO:<{BOB}>").last == "250 2.1.5 Recipient ok"


def test_a_list_skips_its_full_member_and_an_override_lifts_the_quota(quota: MailguardServer) -> None:
    """A list with full alice: accepted, stored for bob only, alice named in an over-quota line.
    ``user quota alice 0`` then lifts her quota on the running server."""
    assert send(quota, ALICE, "quota-5", 1) == "452 4.2.2 Mailbox full"
    before = len(quota.message_files(ALICE))
    assert send(quota, TEAM, "quota-team", 1).startswith("250 ")
    assert quota.messages_containing(BOB, b"quota-team@e2e.test")
    assert len(quota.message_files(ALICE)) == before
    quota.wait_for_log(f'mailguard smtp over-quota: client=127.0.0.1 rcpt={TEAM} mailbox={ALICE} '
                       f'reply="452 4.2.2 Mailbox full"')
    quota.cli_ok("user", "quota", ALICE, "0")
    assert send(quota, ALICE, "quota-6", 1).startswith("250 ")
    assert quota.cli_ok("user", "list").stdout == f"{ALICE} (quota none)\n{BOB}\n"
