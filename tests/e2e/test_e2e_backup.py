"""``mailguard backup`` while mail flows, ``mailguard restore`` into a fresh data folder, and a server on it.

Every message stored before the backup began, every queued message, every mailbox,
alias and list is in the restored server, which accepts the old passwords; a message
that arrived during the backup is either whole in it or absent.
"""

from __future__ import annotations

import json
import poplib
import smtplib
import sqlite3
import threading
from pathlib import Path

from mailguard.directory.sqlschema import SCHEMA_VERSION

from .conftest import (ALLOWED_HOST, DOMAIN, OFFICE_CONFIG, OFFICE_USERS, ServerFactory, populate_office)
from .harness import MailguardServer, make_message

ALICE, BOB, CAROL = f"alice@{DOMAIN}", f"bob@{DOMAIN}", f"carol@{DOMAIN}"
USERS = sorted((*OFFICE_USERS, CAROL))
PASSWORD = "correct horse battery"          # what populate_office gives every user


def send(server: MailguardServer, rcpt: str, subject: str, source: str = "127.0.0.1") -> None:
    with server.smtp(source=source) as c:
        assert c.sendmail(f"sender@{DOMAIN}", [rcpt], make_message(f"sender@{DOMAIN}", rcpt, subject)) == {}


def pop3_count(server: MailguardServer, user: str) -> int:
    """Log in over POP3 (STLS) with the original password; the number of messages."""
    import ssl
    box = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        box.stls(ctx)
        box.user(user)
        box.pass_(PASSWORD)
        return int(box.stat()[0])
    finally:
        box.quit()


def test_backup_while_mail_flows_then_restore(fresh_server_factory: ServerFactory, tmp_path: Path) -> None:
    """Backup under load; restore into a fresh data folder; a server started on it has everything."""
    old = fresh_server_factory("backup-old", OFFICE_CONFIG)
    populate_office(old)
    for n in range(10):
        send(old, ALICE if n % 2 else "sales@realdomain.example", f"before-{n}")
    send(old, "someone@remote.example", "queued-1", source=ALLOWED_HOST)   # the smarthost is down: it waits
    # Added while the server holds the database open: the new rows sit in the -wal file,
    # which a plain file copy of directory.sqlite would leave behind.
    old.add_user(CAROL, PASSWORD)
    assert len(old.queue_lines()) == 1
    before = {p.name: p.read_bytes() for p in old.message_files(ALICE)}
    assert len(before) == 10

    stop = threading.Event()
    during: list[str] = []

    def flow() -> None:
        n = 0
        while not stop.is_set():
            subject = f"during-{n}"
            try:
                send(old, BOB, subject)
            except (OSError, smtplib.SMTPException):
                break
            during.append(subject)
            n += 1

    sender = threading.Thread(target=flow)
    sender.start()
    dest = tmp_path / "backup"
    try:
        while len(during) < 3:
            sender.join(0.05)
        out = old.cli_ok("backup", str(dest)).stdout
    finally:
        stop.set()
        sender.join(30)
    assert len(during) >= 3
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    assert manifest["schema"] == SCHEMA_VERSION and manifest["mailboxes"] == len(USERS)
    assert out == (f"backup in {dest}: {len(USERS)} mailbox(es), {manifest['messages']} message(s), "
                   f"1 queued, directory schema {SCHEMA_VERSION}\n")
    # The database copy is a whole, self-contained file (no -wal needed).
    assert not (dest / "directory.sqlite-wal").exists()
    with sqlite3.connect(dest / "directory.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    new = MailguardServer(tmp_path / "new", OFFICE_CONFIG)
    refused = new.cli("restore", str(dest))
    assert refused.returncode == 0, refused
    assert refused.stdout == (f"restored {dest} into {new.data_dir}: {len(USERS)} mailbox(es), "
                              f"{manifest['messages']} message(s), 1 queued\n")
    again = new.cli("restore", str(dest))
    assert (again.returncode, again.stderr) == (
        1, f"mailguard: {new.data_dir} is not empty: restore into a fresh data folder, or give --force\n")

    new.start()
    try:
        assert new.cli_ok("user", "list").stdout.split() == USERS
        assert {p.name: p.read_bytes() for p in new.message_files(ALICE)} == before
        bobs = new.messages(BOB)
        for stored in bobs:                           # a message from during the backup: whole or absent
            assert stored.endswith(b"Regards,\ne2e\n"), stored[-200:]
        assert len(bobs) == manifest["messages"] - 10
        assert [ln.split()[0] for ln in new.queue_lines()] == [ln.split()[0] for ln in old.queue_lines()]
        assert pop3_count(new, ALICE) == 10            # the password hashes came along
        assert pop3_count(new, CAROL) == 0
        send(new, "sales@realdomain.example", "after-restore")   # the alias too
        assert len(new.messages_containing(ALICE, b"after-restore")) == 1
        running = new.cli("restore", str(dest), "--force")
        assert (running.returncode, running.stderr) == (
            1, f"mailguard: mailguard is running on {new.data_dir} (process {new.process.pid if new.process else 0})"
               ": stop it first\n")
    finally:
        new.stop()
