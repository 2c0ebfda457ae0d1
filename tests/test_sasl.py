"""Tests for mailguard.auth.sasl: the one PLAIN/LOGIN decoder SMTP and POP3 share."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailguard.auth import sasl


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize("authzid, proxy", [("", False), ("alice@office.example", False),
                                            ("ALICE@Office.Example", False), ("bob@office.example", True)])
def test_plain_authzid_rule(authzid: str, proxy: bool) -> None:
    """RFC 4616: an authzid that is empty or the login (any case) is no proxy request."""
    creds = sasl.decode_plain(b64(f"{authzid}\0alice@office.example\0pw".encode()))
    assert creds == sasl.PlainCredentials(authzid, "alice@office.example", "pw")
    assert creds.proxy is proxy


@pytest.mark.parametrize("token", ["=", "", "not base64!", b64(b"no separators"), b64(b"a\0b"),
                                   b64(b"a\0b\0c\0d"), b64(b"\0\0pw"), b64(b"\0user\xff\0pw"),
                                   b64(b"\0user\0pw")[:-1]])
def test_plain_malformed(token: str) -> None:
    """Not base64, not UTF-8, not three fields, or an empty login: None (a 501 / -ERR malformed)."""
    assert sasl.decode_plain(token) is None


def test_plain_accepts_bytes_and_keeps_spaces_in_passwords() -> None:
    """POP3 hands bytes; a password keeps its spaces and non-ASCII characters."""
    creds = sasl.decode_plain(b64("\0alice\0pässwörd with spaces".encode()).encode())
    assert creds is not None and creds.password == "pässwörd with spaces"


def test_login_challenges_and_text() -> None:
    """The LOGIN challenges are base64 'Username:' and 'Password:'; tokens decode to text."""
    assert base64.b64decode(sasl.LOGIN_USER_CHALLENGE) == b"Username:"
    assert base64.b64decode(sasl.LOGIN_PASSWORD_CHALLENGE) == b"Password:"
    assert sasl.decode_text(b64(b"alice")) == "alice"
    assert sasl.decode_text("***") is None


@given(st.text(), st.text(min_size=1), st.text())
def test_plain_round_trip(authzid: str, authcid: str, password: str) -> None:
    """Any three NUL-free fields with a login decode to themselves."""
    if "\0" in authzid + authcid + password:
        return
    creds = sasl.decode_plain(b64(f"{authzid}\0{authcid}\0{password}".encode()))
    assert creds == sasl.PlainCredentials(authzid, authcid, password)
