"""Tests for ``[limits] memory_budget``: unfinished messages' octets in memory, all SMTP sessions together.

A message that would pass the budget waits in the spool file at once; with no spool to
take it the final dot is answered 452 4.3.1; every session's share comes back when its
message ends or its connection drops (issue 17 item 2).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest

from mailguard.core import replies

from conftest import FakeContext, LogCapture, Session, office_config

BUDGET = 100_000
PART = b"Subject: part\r\n\r\n" + (b"m" * 78 + b"\r\n") * 750       # 60,017 octets, under 256 KiB


def budget_host(budget: int = BUDGET) -> FakeContext:
    """The office configuration with a small memory budget, alice in the directory."""
    h = FakeContext(office_config(limits={"memory_budget": budget}))
    h.directory.add_mailbox("alice@office.example")
    return h


def in_data(host: FakeContext, spool: Path | None, client_ip: str = "203.0.113.9") -> Session:
    """A session from ``client_ip`` that got 354 to DATA, spooling under ``spool`` (None: no spool)."""
    s = Session(host, client_ip=client_ip)
    s.proto.spool_dir = spool
    for line in ("EHLO client.example", "MAIL FROM:<joe@sender.example>", "RCPT TO:<alice@office.example>"):
        assert s.cmd(line)[-1].startswith("250 "), s.lines()
    assert s.cmd("DATA")[0].startswith("354 ")
    return s


def test_budget_key_default_and_bounds() -> None:
    """The default budget is 64 MiB; a negative one is a configuration error naming the key."""
    assert office_config().limits.memory_budget == 64 * 1024 * 1024
    with pytest.raises(Exception, match="memory_budget"):
        office_config(limits={"memory_budget": -1})


def test_message_that_would_pass_the_budget_waits_on_disk_at_once(tmp_path: Path) -> None:
    """The first 60 KB message stays in memory; a second, which would pass the 100 KB budget,
    goes to the spool file though it is far under 256 KiB.  Both are stored whole, and the
    budget is back to zero with the spool folder empty."""
    host = budget_host()
    assert host.memory is not None
    first, second = in_data(host, tmp_path / "spool"), in_data(host, tmp_path / "spool", "203.0.113.10")
    first.send(PART)
    assert first.proto._spooled == 0 and host.memory.held == len(PART) + 2
    second.send(PART)
    assert second.proto._spooled > 59_000                       # spilled at once
    assert second.proto._body is not None and len(second.proto._body) <= 4
    assert host.memory.held <= len(PART) + 2 + 4
    for s in (first, second):
        s.send(b".\r\n")
        assert s.lines()[-1].startswith("250 "), s.lines()
    assert [c.message for c in host.store.calls] == [PART, PART]
    assert host.memory.held == 0
    assert list((tmp_path / "spool").iterdir()) == []


def refusing_disk(**kwargs: Any) -> Any:
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("spool", ["none", "disk full"])
def test_past_the_budget_without_a_spool_is_452_after_the_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             logs: LogCapture, spool: str) -> None:
    """No spool file can take the second message (none configured, or the disk refuses): it is
    read to its end and answered exactly 452 4.3.1, the connection stays open, nothing of it
    is stored, and its next, smaller message is accepted.  The first message is stored whole."""
    if spool == "disk full":
        monkeypatch.setattr(tempfile, "TemporaryFile", refusing_disk)
    spool_dir = None if spool == "none" else tmp_path / "spool"
    host = budget_host()
    assert host.memory is not None
    first, second = in_data(host, spool_dir), in_data(host, spool_dir, "203.0.113.10")
    first.send(PART)
    second.send(PART)
    second.send(PART)                                            # more after the refusal: read, dropped
    assert host.memory.held <= len(PART) + 2 + 4
    assert second.cmd(".") == ["452 4.3.1 Insufficient system storage, try again later"]
    assert second.lines()[-1] == str(replies.NO_ROOM)
    assert not second.closed
    assert logs.matching("mailguard smtp memory-budget-full: client=203.0.113.10")
    first.send(b".\r\n")
    assert first.lines()[-1].startswith("250 ")
    for line in ("MAIL FROM:<joe@sender.example>", "RCPT TO:<alice@office.example>"):
        assert second.cmd(line)[-1].startswith("250 ")
    assert second.cmd("DATA")[0].startswith("354 ")
    second.send(b"Subject: again\r\n\r\nsmall\r\n.\r\n")
    assert second.lines()[-1].startswith("250 ")
    assert [c.message for c in host.store.calls] == [PART, b"Subject: again\r\n\r\nsmall\r\n"]
    assert host.memory.held == 0


def test_connection_lost_mid_data_returns_its_share(tmp_path: Path) -> None:
    """Connections dropped in the middle of DATA, one holding its message in memory and one
    spooled, give back every octet: the budget is zero again and the spool folder empty."""
    host = budget_host()
    assert host.memory is not None
    first, second = in_data(host, tmp_path / "spool"), in_data(host, tmp_path / "spool", "203.0.113.10")
    first.send(PART)
    second.send(PART)
    assert host.memory.held > 60_000 and second.proto._spooled > 0
    first.lose()
    second.lose()
    assert host.memory.held == 0
    assert list((tmp_path / "spool").iterdir()) == []
    third = in_data(host, None, "203.0.113.11")                 # the whole budget is usable again
    third.send(PART + b".\r\n")
    assert third.lines()[-1].startswith("250 ")
    assert host.memory.held == 0


def test_data_line_too_long_returns_the_share() -> None:
    """A session closed for an over-long DATA line (500, closed) gives its share back at once."""
    host = budget_host()
    assert host.memory is not None
    s = in_data(host, None)
    s.send(PART)
    assert host.memory.held > 60_000
    s.send(b"x" * 70_000)
    assert s.closed and s.lines()[-1].startswith("500 ")
    assert host.memory.held == 0
    s.lose()
    assert host.memory.held == 0
