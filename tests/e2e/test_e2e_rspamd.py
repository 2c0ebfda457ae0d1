"""End to end: rspamd from Debian as a milter (its proxy worker, ``milter = yes``).

GTUBE, the spam test pattern, is refused with rspamd's own reply; clean mail is
stored with the headers rspamd added (its verdict, and the queue id it was given in
the ``i`` macro).
"""

from __future__ import annotations

import uuid
from typing import Iterator

import pytest

from .conftest import DOMAIN, OFFICE_CONFIG, OUTSIDER, ServerFactory
from .harness import MailguardServer, deep_merge, make_message
from .milters import Process, rspamd

ALICE = f"alice@{DOMAIN}"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


@pytest.fixture(scope="module")
def rspamd_milter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    r = rspamd(tmp_path_factory.mktemp("rspamd"))
    yield r
    r.stop()


@pytest.fixture(scope="module")
def server(server_factory: ServerFactory, rspamd_milter: Process) -> MailguardServer:
    cfg = deep_merge(OFFICE_CONFIG, {"filters": {"milters": [rspamd_milter.address]}})
    s = server_factory("rspamd", cfg)
    s.add_user(ALICE)
    return s


def send(server: MailguardServer, body: list[str]) -> tuple[str, bytes, object]:
    tag = "rspamd-" + uuid.uuid4().hex
    message = make_message("joe@outside.example", ALICE, tag, body)
    with server.dialog(source=OUTSIDER) as d:
        assert d.cmd("EHLO client.outside.example").code == 250
        assert d.cmd("MAIL FROM:<joe@outside.example>").code == 250
        assert d.cmd(f"RCPT TO:<{ALICE}>").code == 250
        reply = d.data(message)
        assert d.cmd("NOOP").code == 250
    return tag, message, reply


def test_gtube_is_rejected(server: MailguardServer) -> None:
    """The GTUBE pattern gets rspamd's reject reply; nothing is stored."""
    tag, _, reply = send(server, ["This is spam, says the test pattern:", GTUBE])
    assert reply.last == "554 5.7.1 Gtube pattern"
    assert server.messages_containing(ALICE, tag.encode()) == []
    server.wait_for_log(r"mailguard milter reject: client=127.0.0.5 .*reply=554 5.7.1 Gtube pattern")


def test_clean_mail_gets_rspamds_headers(server: MailguardServer) -> None:
    """Clean mail is stored with rspamd's headers after the original ones; the body is unchanged."""
    tag, sent, reply = send(server, ["Hello Alice,", "lunch on Friday?", "Joe"])
    assert reply.code == 250, reply
    queue_id = reply.last.split()[-1]
    (got,) = server.messages_containing(ALICE, tag.encode())
    head, _, body = got.partition(b"\n\n")
    assert body == sent.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n")
    original = sent.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"\n")
    assert original in head
    added = head.split(original, 1)[1].decode() + "\n"     # rspamd's header order varies
    assert f"\nX-Rspamd-Queue-Id: {queue_id}\n" in added
    assert "\nX-Spamd-Result: default: False [" in added
    assert "\nX-Spam-Status: No, score=" in added
