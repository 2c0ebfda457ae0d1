"""Tests for mailguard.core.headers: Date: and Message-ID: added to submissions that lack them."""

from __future__ import annotations

import re

from mailguard.core.headers import add_missing, has_field

NOW = 1796100000.0


def test_both_added_at_the_end_of_the_header() -> None:
    out = add_missing(b"From: a@b.example\r\nSubject: x\r\n\r\nbody\r\n", "mx.office.example", "ID1", NOW)
    head, body = out.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    assert lines[:2] == [b"From: a@b.example", b"Subject: x"]
    assert re.match(rb"^Date: \w{3}, \d{1,2} \w{3} 2026 \d\d:\d\d:\d\d [+-]\d{4}$", lines[2])
    assert re.match(rb"^Message-ID: <ID1\.[0-9a-f]{12}@mx\.office\.example>$", lines[3])
    assert body == b"body\r\n"


def test_present_fields_are_kept() -> None:
    """Any case of the field name counts; the message is returned unchanged."""
    msg = b"DATE: Tue, 1 Dec 2026 10:00:00 +0000\r\nmessage-id: <x@y>\r\n\r\nbody\r\n"
    assert add_missing(msg, "h", "I", NOW) == msg


def test_a_field_in_the_body_does_not_count() -> None:
    msg = b"Subject: x\r\n\r\nDate: not a header\r\nMessage-ID: <no>\r\n"
    assert not has_field(msg, b"date")
    out = add_missing(msg, "h", "I", NOW)
    assert out.split(b"\r\n\r\n", 1)[1] == b"Date: not a header\r\nMessage-ID: <no>\r\n"
    assert has_field(out, b"date") and has_field(out, b"message-id")


def test_header_only_message() -> None:
    """A message without a body still gets the fields in its header."""
    out = add_missing(b"Subject: only", "h", "I", NOW)
    assert out.startswith(b"Subject: only\r\nDate: ") and b"\r\nMessage-ID: <I." in out
