"""Mailbox quotas: the pure decision, the maildir measure, RCPT replies, the 90 % warning and the CLI."""

from __future__ import annotations

import io
import os
import sqlite3
from pathlib import Path
from typing import Any, Callable

import pytest
from twisted.internet import defer

from mailguard.app import cli
from mailguard.core import policy, quota, replies
from mailguard.core.entries import Expansion
from mailguard.directory import sqlite as store_mod
from mailguard.directory import sqlschema
from mailguard.directory.sqlite import SQLiteStore
from mailguard.smtp.quota import MailboxQuotas
from mailguard.storage import maildir
from mailguard.storage.usage import Sizes

from conftest import OFFICE, FakeContext, LogCapture, Session, make_config

ALICE, BOB = "alice@office.example", "bob@office.example"


def accepted(*mailboxes: str, remote: tuple[str, ...] = ()) -> policy.Decision:
    return policy.Decision(replies.RECIPIENT_OK, "inbound", "staff@office.example", mailboxes, remote)


# -- the decision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("usage, declared, reply", [
    (quota.Usage(0, 10**9), 10**6, None),                     # 0: no quota
    (quota.Usage(1000, 999), 0, None),
    (quota.Usage(1000, 1000), 0, replies.MAILBOX_FULL),       # at the quota is full
    (quota.Usage(1000, 1500), 10, replies.MAILBOX_FULL),
    (quota.Usage(1000, 900), 100, None),                      # exactly fits
    (quota.Usage(1000, 900), 101, replies.OVER_QUOTA),
])
def test_refusal(usage: quota.Usage, declared: int, reply: replies.Reply | None) -> None:
    """Full (used >= quota) is 452 4.2.2; a declared SIZE that would not fit is 552 5.2.2; 0 is no quota."""
    assert quota.refusal(usage, declared) == reply


def test_reply_texts() -> None:
    """The replies a client sees."""
    assert str(replies.MAILBOX_FULL) == "452 4.2.2 Mailbox full"
    assert str(replies.OVER_QUOTA) == "552 5.2.2 Message would exceed the mailbox quota"


def test_effective_quota() -> None:
    """A mailbox's own quota (0 included) wins over the default; None means the default."""
    assert quota.effective(None, 5000) == 5000
    assert quota.effective(0, 5000) == 0
    assert quota.effective(70, 5000) == 70


def test_a_direct_recipient_is_refused() -> None:
    """One mailbox, full: the RCPT is refused with its reply and rule mailbox_quota."""
    judged = quota.judge(accepted(ALICE), {ALICE: quota.Usage(10, 10)}, 0)
    assert judged.decision == policy.Decision(replies.MAILBOX_FULL, "mailbox_quota", "staff@office.example")
    assert judged.dropped == ((ALICE, replies.MAILBOX_FULL),)


def test_a_list_loses_only_its_full_member() -> None:
    """A list with one full member: that member is dropped, the others and remote ones keep the mail."""
    judged = quota.judge(accepted(ALICE, BOB), {ALICE: quota.Usage(10, 10), BOB: quota.Usage(10, 1)}, 0)
    assert judged.decision == accepted(BOB)
    assert judged.dropped == ((ALICE, replies.MAILBOX_FULL),)
    only_remote = quota.judge(accepted(ALICE, remote=("x@far.example",)), {ALICE: quota.Usage(10, 10)}, 0)
    assert only_remote.decision == accepted(remote=("x@far.example",))


def test_every_member_full_refuses_with_the_first_reply_and_soft_bounce_softens() -> None:
    """All mailboxes refused, nothing remote: the RCPT is refused; soft_bounce makes 552 a 452."""
    usage = {ALICE: quota.Usage(10, 5), BOB: quota.Usage(10, 10)}
    assert quota.judge(accepted(ALICE, BOB), usage, 6).decision.reply == replies.OVER_QUOTA
    soft = quota.judge(accepted(ALICE, BOB), usage, 6, soft_bounce=True).decision.reply
    assert str(soft) == "452 4.2.2 Message would exceed the mailbox quota"


def test_crossed() -> None:
    """The warning mark is 90 %: only a delivery from under it to at or past it crosses."""
    assert quota.crossed(quota.Usage(1000, 899), 1)
    assert not quota.crossed(quota.Usage(1000, 898), 1)
    assert not quota.crossed(quota.Usage(1000, 900), 50)     # already past it
    assert not quota.crossed(quota.Usage(0, 0), 10**9)


# -- measuring a maildir --------------------------------------------------------------------------


def deliver(box: Path, body: bytes) -> str:
    """Put one message into ``box/new`` as the store does (its name carries S=)."""
    lf, suffix = maildir.stored_form(body)
    name = maildir.unique_name(suffix)
    tmp = maildir.write_tmp(box, name, lf, fsync=False)
    os.rename(tmp, box / "new" / name)
    return name


def age(box: Path) -> None:
    """Make new/ and cur/ look changed two seconds ago (out of the racy window)."""
    for folder in ("new", "cur"):
        t = os.stat(box / folder).st_mtime - 2
        os.utime(box / folder, (t, t))


def test_sizes_counts_new_and_cur_not_tmp(tmp_path: Path) -> None:
    """new/ and cur/ are counted (S= from the name, stat for a foreign file); tmp/ and dot files are not."""
    box = tmp_path / "office.example" / "alice"
    assert Sizes().measure(box) == 0                    # no maildir yet
    deliver(box, b"Subject: a\r\n\r\n" + b"x" * 100 + b"\r\n")
    (box / "cur" / "foreign:2,S").write_bytes(b"y" * 50)
    (box / "cur" / ".hidden").write_bytes(b"z" * 7)
    (box / "tmp" / "half").write_bytes(b"w" * 1000)
    assert Sizes().measure(box) == len(b"Subject: a\n\n" + b"x" * 100 + b"\n") + 50


def test_sizes_remembers_an_unchanged_maildir_and_sees_a_change(tmp_path: Path) -> None:
    """An unchanged maildir is not listed again; a delivery (new/ changes) is seen at once."""
    box = tmp_path / "office.example" / "alice"
    deliver(box, b"a\r\n")
    age(box)
    sizes = Sizes()
    first = sizes.measure(box)
    kept = os.stat(box / "new").st_mtime_ns
    (box / "new" / "sneaked,S=1000").write_bytes(b"")        # written behind its back
    os.utime(box / "new", ns=(kept, kept))                   # ... with the old mtime kept
    assert sizes.measure(box) == first                       # the remembered total
    deliver(box, b"b\r\n")
    assert sizes.measure(box) == first + 1000 + 2


def test_deliveries_here_keep_the_total_without_listing_again(tmp_path: Path) -> None:
    """A busy mailbox: copies written by the store (CountedCopies through the group commit) add to
    the remembered total, so it is not listed again per message; a change made elsewhere, or a
    total older than MAX_AGE, is listed again."""
    from mailguard.storage.usage import MAX_AGE, CountedCopies

    clock = [0.0]
    sizes = Sizes(now=lambda: clock[0])
    box = tmp_path / "office.example" / "alice"
    deliver(box, b"first\r\n")
    assert sizes.measure(box) == 6 and sizes.listings == 1
    for n in range(3):                  # what the group commit does with each copy
        staged: list[tuple[str, str]] = []
        copies = CountedCopies(tmp_path, [os.fspath(box)], b"x" * 9 + b"\r\n", sizes)
        copies.stage(staged, sync=False)
        for tmp, final in staged:
            os.rename(tmp, final)
        if n == 2:                      # a listing between the rename and the count: counted once
            clock[0] += MAX_AGE
            assert sizes.measure(box) == 6 + 10 * n
        copies.finish(True)
        assert sizes.measure(box) == 6 + 10 * (n + 1)
    assert sizes.listings == 2
    os.unlink(next((box / "new").iterdir()))                 # a POP3 deletion: new/ changes ...
    later = os.stat(box / "new").st_mtime_ns + 10**9         # ... at a later tick of the clock
    os.utime(box / "new", ns=(later, later))
    assert sizes.measure(box) in (26, 30) and sizes.listings == 3       # one of the 4 files gone
    clock[0] += MAX_AGE
    sizes.measure(box)
    assert sizes.listings == 4


# -- at RCPT ----------------------------------------------------------------------------------------


def quota_host(tmp_path: Path, default: int = 0, **own: int) -> FakeContext:
    """A FakeContext whose mail lives in tmp_path, with mailbox quotas measured inline."""
    cfg = make_config(tmp_path, **{**OFFICE, "server": {**OFFICE["server"], "data_dir": str(tmp_path)},
                                   "limits": {"mailbox_quota": default}})
    h = FakeContext(cfg, quotas=MailboxQuotas(lambda f: defer.maybeDeferred(f)))
    h.directory.add_mailbox(ALICE)
    h.directory.add_mailbox(BOB)
    h.directory.entries["staff@office.example"] = Expansion(mailboxes=(ALICE, BOB))
    h.directory.own_quotas.update({k.replace("_", "@") + ".example" if "_" in k else k: v for k, v in own.items()})
    return h


def fill(h: FakeContext, mailbox: str, octets: int) -> None:
    box = maildir.maildir_path(h.cfg.mail_dir, mailbox)
    deliver(box, b"x" * (octets - 1) + b"\r\n")


def session(h: FakeContext, mail: str = "MAIL FROM:<joe@sender.example>") -> Session:
    s = Session(h)
    s.cmd("EHLO client.example")
    assert s.cmd(mail)[0].startswith("250 ")
    return s


def test_full_mailbox_is_452_at_rcpt(tmp_path: Path, logs: LogCapture) -> None:
    """[limits] mailbox_quota: a mailbox at it gets 452 4.2.2 at RCPT, logged as rule mailbox_quota;
    one under it is accepted."""
    h = quota_host(tmp_path, default=1000)
    fill(h, ALICE, 1000)
    fill(h, BOB, 10)
    s = session(h)
    assert s.cmd(f"RCPT TO:<{ALICE}>") == ["452 4.2.2 Mailbox full"]
    assert s.cmd(f"RCPT TO:<{BOB}>") == ["250 2.1.5 Recipient ok"]
    [line] = logs.matching("rule=mailbox_quota")
    assert f'rcpt=<{ALICE}> rule=mailbox_quota reply="452 4.2.2 Mailbox full" id=' in line


def test_declared_size_over_quota_is_552_at_rcpt(tmp_path: Path) -> None:
    """SIZE= at MAIL FROM that would take the mailbox past its quota: 552 5.2.2 at RCPT."""
    h = quota_host(tmp_path, default=1000)
    fill(h, ALICE, 500)
    s = session(h, "MAIL FROM:<joe@sender.example> SIZE=501")
    assert s.cmd(f"RCPT TO:<{ALICE}>") == ["552 5.2.2 Message would exceed the mailbox quota"]
    s.cmd("RSET")
    s.cmd("MAIL FROM:<joe@sender.example> SIZE=500")
    assert s.cmd(f"RCPT TO:<{ALICE}>") == ["250 2.1.5 Recipient ok"]


def test_own_quota_overrides_the_default(tmp_path: Path) -> None:
    """A mailbox's own quota wins: 0 lifts the default for it, a number sets it."""
    h = quota_host(tmp_path, default=100)
    h.directory.own_quotas.update({ALICE: 0, BOB: 10_000})
    fill(h, ALICE, 5000)
    fill(h, BOB, 5000)
    s = session(h)
    assert s.cmd(f"RCPT TO:<{ALICE}>") == ["250 2.1.5 Recipient ok"]
    assert s.cmd(f"RCPT TO:<{BOB}>") == ["250 2.1.5 Recipient ok"]
    h.directory.own_quotas[BOB] = 5000
    assert s.cmd(f"RCPT TO:<{BOB}>") == ["452 4.2.2 Mailbox full"]


def test_a_list_delivers_to_its_members_that_are_not_full(tmp_path: Path, logs: LogCapture) -> None:
    """A list with a full member: accepted, stored for the others, the full one named in a log line."""
    h = quota_host(tmp_path, default=1000)
    fill(h, ALICE, 1000)
    s = session(h)
    assert s.cmd("RCPT TO:<staff@office.example>") == ["250 2.1.5 Recipient ok"]
    s.cmd("DATA")
    s.send("Subject: hi\r\n\r\nhello\r\n.\r\n")
    [call] = h.store.calls
    assert [d.mailboxes for d in call.decisions] == [(BOB,)]
    assert logs.matching("over-quota") == [
        f'mailguard smtp over-quota: client=203.0.113.9 rcpt=staff@office.example mailbox={ALICE} '
        f'reply="452 4.2.2 Mailbox full"']


def test_no_quota_measures_nothing(tmp_path: Path) -> None:
    """With no quota anywhere no maildir is measured (nothing runs in a thread)."""
    h = quota_host(tmp_path)
    ran: list[Any] = []
    assert h.quotas is not None
    h.quotas.run_in_thread = lambda f: ran.append(f) or defer.maybeDeferred(f)    # type: ignore[func-returns-value]
    fill(h, ALICE, 10**6)
    s = session(h)
    assert s.cmd(f"RCPT TO:<{ALICE}>") == ["250 2.1.5 Recipient ok"]
    assert ran == []


def test_quota_lookup_failure_is_4xx(tmp_path: Path) -> None:
    """The directory cannot say the quotas: the directory_failure 4xx, never a pass."""
    h = quota_host(tmp_path, default=1000)
    h.directory.quotas = lambda m: defer.fail(store_mod.DirectoryError("locked"))    # type: ignore[method-assign]
    s = session(h)
    assert s.cmd(f"RCPT TO:<{ALICE}>") == ["451 4.3.0 Directory temporarily unavailable"]


def test_warning_once_past_ninety_percent(tmp_path: Path, logs: LogCapture) -> None:
    """A delivery that takes a mailbox past 90 % of its quota logs one warning; the next does not."""
    h = quota_host(tmp_path, default=10_000)
    fill(h, ALICE, 8500)
    for _ in range(2):
        s = session(h)
        assert s.cmd(f"RCPT TO:<{ALICE}>") == ["250 2.1.5 Recipient ok"]
        s.cmd("DATA")
        s.send("Subject: hi\r\n\r\n" + "y" * 600 + "\r\n.\r\n")
        fill(h, ALICE, 700)            # what the (fake) store would have written
    [line] = logs.matching("quota warning")
    assert line.startswith(f"mailguard quota warning: mailbox={ALICE} used=")
    assert " quota=10000 percent=9" in line


# -- the directory and the CLI ----------------------------------------------------------------------


def test_a_version_1_directory_is_migrated_and_keeps_its_mailboxes(tmp_path: Path) -> None:
    """A directory written before quotas (version 1) gets the quota column at start; mailboxes stay."""
    path = tmp_path / "directory.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(sqlschema._SCHEMA + "INSERT INTO mailboxes VALUES ('a@x.example', 'h', 0);"
                         "PRAGMA user_version = 1;")
    store = SQLiteStore(path)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (3,)
    assert store.mailboxes() == ["a@x.example"]
    assert store.quotas() == {}
    store.set_quota("a@x.example", 5)
    assert store.quotas(("a@x.example", "b@x.example")) == {"a@x.example": 5}


CONF = ('[server]\nhostname = "mx.office.example"\ndata_dir = "data"\n'
        '[domains."office.example"]\nroute = "inbound"\n[limits]\nmailbox_quota = 2000\n')


def test_cli_user_quota(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """``user quota ADDRESS BYTES|0|default`` sets, lifts and resets; without BYTES it shows the quota
    and the usage; ``user list`` names the mailboxes' own quotas; bad input is one line, exit 1."""
    conf = tmp_path / "mailguard.toml"
    conf.write_text(CONF)
    run: Callable[..., int] = lambda *a: cli.main(["--config", str(conf), *a])
    monkeypatch.setattr("sys.stdin", io.StringIO("long enough\nlong enough\n"))
    assert run("user", "add", ALICE, "--password-stdin") == 0
    assert run("user", "add", BOB, "--password-stdin") == 0
    deliver(tmp_path / "data" / "mail" / "office.example" / "alice", b"x" * 99 + b"\r\n")
    capsys.readouterr()
    assert run("user", "quota", ALICE) == 0
    assert run("user", "quota", ALICE, "1048576") == 0
    assert run("user", "quota", ALICE) == 0
    assert run("user", "quota", BOB, "0") == 0
    assert run("user", "list") == 0
    assert run("user", "quota", ALICE, "default") == 0
    assert run("user", "list") == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{ALICE}: quota 2000 bytes ([limits] mailbox_quota), 100 bytes used",
        f"quota of {ALICE}: 1048576 bytes",
        f"{ALICE}: quota 1048576 bytes (its own), 100 bytes used",
        f"quota of {BOB}: none",
        f"{ALICE} (quota 1048576 bytes)",
        f"{BOB} (quota none)",
        f"quota of {ALICE}: the default (2000 bytes, [limits] mailbox_quota)",
        ALICE,
        f"{BOB} (quota none)",
    ]
    for args, err in [(("user", "quota", ALICE, "-5"),
                       "quota '-5': give a number of bytes (0: no quota) or 'default'"),
                      (("user", "quota", ALICE, "1e6"),
                       "quota '1e6': give a number of bytes (0: no quota) or 'default'"),
                      (("user", "quota", "nobody@office.example", "5"), "no mailbox nobody@office.example"),
                      (("user", "quota", "nobody@office.example"), "no mailbox nobody@office.example"),
                      (("user", "del", ALICE, "5"), f"user del takes one ADDRESS, not '5' too")]:
        assert run(*args) == 1, args
        assert capsys.readouterr() == ("", f"mailguard: {err}\n")


def test_explain_shows_a_full_mailbox(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``mailguard explain`` answers what RCPT would: 452 4.2.2 for a full mailbox, and with -v a
    list names its full member after the mailboxes that still get the mail."""
    conf = tmp_path / "mailguard.toml"
    conf.write_text(CONF)
    run: Callable[..., int] = lambda *a: cli.main(["--config", str(conf), *a])
    monkeypatch.setattr("sys.stdin", io.StringIO("long enough\nlong enough\n"))
    assert run("user", "add", ALICE, "--password-stdin") == 0
    assert run("user", "add", BOB, "--password-stdin") == 0
    assert run("list", "add", "staff@office.example", ALICE, BOB) == 0
    assert run("user", "quota", ALICE, "100") == 0
    deliver(tmp_path / "data" / "mail" / "office.example" / "alice", b"x" * 99 + b"\r\n")
    import subprocess
    import sys
    repo = Path(__file__).resolve().parent.parent
    explained = subprocess.run(      # explain runs a reactor: in a process of its own
        [sys.executable, "-m", "mailguard", "--config", str(conf), "explain", "--client", "203.0.113.9", "-v",
         ALICE, BOB, "staff@office.example"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(repo)}, cwd=tmp_path)
    assert explained.returncode == 0, explained.stderr
    assert explained.stdout.splitlines() == [
        f"{ALICE}: 452 4.2.2 Mailbox full (rule: mailbox_quota)",
        f"{BOB}: 250 2.1.5 Recipient ok (rule: inbound) -> mailbox {BOB}",
        f"staff@office.example: 250 2.1.5 Recipient ok (rule: inbound) [list senders: anyone] -> mailbox {BOB}; "
        f"over quota: {ALICE} (452 4.2.2 Mailbox full)",
    ]
