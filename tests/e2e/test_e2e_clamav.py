"""End to end: clamav-milter (with clamd and one local signature) refuses the EICAR test file.

The signature database is a single ``.hdb`` line, the MD5 of the 68-byte EICAR test
file, so nothing is downloaded.  Clean mail is stored with clamav-milter's headers.
"""

from __future__ import annotations

import base64
import uuid
from typing import Iterator

import pytest

from .conftest import DOMAIN, OFFICE_CONFIG, OUTSIDER, ServerFactory
from .harness import MailguardServer, Reply, deep_merge, make_message
from .milters import EICAR, ClamAV

ALICE = f"alice@{DOMAIN}"


@pytest.fixture(scope="module")
def clamav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClamAV]:
    c = ClamAV(tmp_path_factory.mktemp("clamav"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def server(server_factory: ServerFactory, clamav: ClamAV) -> MailguardServer:
    s = server_factory("clamav", deep_merge(OFFICE_CONFIG, {"filters": {"milters": [clamav.address]}}))
    s.add_user(ALICE)
    return s


def with_attachment(tag: str, content: bytes) -> bytes:
    message = make_message("joe@outside.example", ALICE, tag, [
        "--b", "Content-Type: text/plain", "", "See the attached file.",
        "--b", "Content-Type: application/octet-stream; name=eicar.com", "Content-Transfer-Encoding: base64",
        "Content-Disposition: attachment; filename=eicar.com", "", base64.b64encode(content).decode(), "--b--"])
    return message.replace(b"Content-Type: text/plain; charset=us-ascii\r\n",
                           b"Content-Type: multipart/mixed; boundary=b\r\n", 1)


def send(server: MailguardServer, message: bytes) -> Reply:
    with server.dialog(source=OUTSIDER) as d:
        assert d.cmd("EHLO client.outside.example").code == 250
        assert d.cmd("MAIL FROM:<joe@outside.example>").code == 250
        assert d.cmd(f"RCPT TO:<{ALICE}>").code == 250
        reply = d.data(message)
        assert d.cmd("NOOP").code == 250
    return reply


def test_eicar_attachment_refused(server: MailguardServer) -> None:
    """The EICAR test file as an attachment: clamav-milter's reject reply, nothing stored."""
    tag = "clamav-" + uuid.uuid4().hex
    reply = send(server, with_attachment(tag, EICAR))
    assert reply.last == "550 5.7.1 Virus found: Eicar-Test-Signature.UNOFFICIAL"
    assert server.messages_containing(ALICE, tag.encode()) == []


def test_clean_attachment_scanned_and_stored(server: MailguardServer) -> None:
    """A harmless attachment is stored, marked by clamav-milter as scanned and clean."""
    tag = "clamav-" + uuid.uuid4().hex
    reply = send(server, with_attachment(tag, b"just a text file\n"))
    assert reply.code == 250
    (got,) = server.messages_containing(ALICE, tag.encode())
    head = got.split(b"\n\n", 1)[0]
    assert b"\nX-Virus-Scanned: clamav-milter " in head and b"\nX-Virus-Status: Clean" in head
