"""Tests for mailguard.core.dsn: RFC 3464 delivery status notifications."""

from __future__ import annotations

import email
import email.policy

import pytest

from mailguard.core.dsn import FailedRecipient, build_dsn, original_headers, status_of

ORIGINAL = (b"Received: from client (127.0.0.1)\r\nFrom: Joe <joe@here.example>\r\n"
            b"Subject: quarterly numbers\r\nMessage-ID: <abc@here.example>\r\n\r\nsecret body\r\n")


def dsn(failures: list[FailedRecipient], original: bytes = ORIGINAL) -> email.message.Message:
    raw = build_dsn("mail.here.example", "joe@here.example", "0123456789abcdef01234", 1_700_000_000.0,
                    failures, original, 1_700_000_600.0)
    assert b"\n" not in raw.replace(b"\r\n", b""), "not in CRLF form"
    return email.message_from_bytes(raw, policy=email.policy.default)


def test_report_structure_and_fields() -> None:
    """One multipart/report: text, delivery-status with per-recipient fields, original headers."""
    msg = dsn([FailedRecipient("ann@remote.example", "550 5.1.1 <ann@remote.example>: no such user",
                               "mx.remote.example[127.0.0.1]:25")])
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "joe@here.example"
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mail.here.example"
    assert msg["Auto-Submitted"] == "auto-replied"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status",
                                                      "text/rfc822-headers"]
    assert "ann@remote.example" in parts[0].get_content()
    per_message, per_rcpt = parts[1].get_payload()
    assert per_message["Reporting-MTA"] == "dns; mail.here.example"
    assert per_rcpt["Final-Recipient"] == "rfc822; ann@remote.example"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.remote.example"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 <ann@remote.example>: no such user"
    headers = parts[2].get_payload()
    assert "Subject: quarterly numbers" in headers
    assert "secret body" not in msg.as_string()


def test_several_recipients_one_report() -> None:
    """All failed recipients of one message share one report, a block each."""
    msg = dsn([FailedRecipient("a@r.example", "550 5.1.1 unknown"),
               FailedRecipient("b@r.example", "451 4.4.1 connection refused (gave up)")])
    blocks = msg.get_payload()[1].get_payload()
    assert [b["Final-Recipient"] for b in blocks[1:]] == ["rfc822; a@r.example", "rfc822; b@r.example"]
    assert [b["Status"] for b in blocks[1:]] == ["5.1.1", "4.4.1"]
    assert "Remote-MTA" not in blocks[1]


def test_remote_reply_cannot_inject_fields() -> None:
    """Control characters in a remote reply do not become new header fields."""
    msg = dsn([FailedRecipient("a@r.example", "550 5.0.0 x\r\nX-Injected: yes")])
    block = msg.get_payload()[1].get_payload()[1]
    assert "X-Injected" not in block
    assert block["Diagnostic-Code"].startswith("smtp; 550 5.0.0 x")


def test_eight_bit_headers_survive() -> None:
    """Original headers with 8-bit bytes are attached (encoded), not dropped."""
    msg = dsn([FailedRecipient("a@r.example", "550 no")], b"Subject: caf\xe9\r\n\r\nbody\r\n")
    part = msg.get_payload()[2]
    assert part.get_payload(decode=True).replace(b"\r\n", b"\n") == b"Subject: caf\xe9\n"


def test_helpers() -> None:
    """status_of reads the enhanced code; original_headers stops at the empty line."""
    assert status_of("550 5.7.1 denied") == "5.7.1"
    assert status_of("550 denied") == "5.0.0"
    assert status_of("452 4.2.2 full") == "4.2.2"
    assert status_of("550 4.2.2 class mismatch") == "5.0.0"
    assert original_headers(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == b"A: 1\nB: 2\n"
    with pytest.raises(ValueError):
        build_dsn("h", "s@x", "id", 0.0, [], ORIGINAL, 0.0)


def test_bounce_of_an_all_header_message_is_capped() -> None:
    """A 5.4 MB message that is all header (no empty line) comes back as at most 50,000 octets of
    it, cut at a line end, not whole (issue 17 item 7: bounces as an amplifier)."""
    huge = b"".join(b"X-Filler-%07d: %s\r\n" % (i, b"y" * 60) for i in range(72_000))
    assert len(huge) > 5_400_000
    raw = build_dsn("mail.here.example", "victim@forged.example", "0123456789abcdef01234", 1_700_000_000.0,
                    [FailedRecipient("ann@remote.example", "550 5.7.1 refused", "mx.remote.example")],
                    huge, 1_700_000_600.0)
    print(f"\n[bounce] largest bounce for a {len(huge)}-octet all-header message: {len(raw)} octets")
    assert len(raw) < 50_000 + 4_000
    returned = email.message_from_bytes(raw, policy=email.policy.default).get_payload()[2].get_payload()
    assert returned.endswith("\n") and "X-Filler-0000000" in returned and "X-Filler-0071999" not in returned
