"""SASL PLAIN (RFC 4616) and LOGIN decoding, one implementation for SMTP AUTH and POP3 AUTH.

Both mechanisms carry base64 text.  PLAIN is ``authzid NUL authcid NUL passwd``;
mailguard allows no proxy logins, so the authorization identity must be empty or
the login itself, compared without regard to case (RFC 4616 section 2 leaves the
comparison to the server; logins are case-insensitive here, as addresses are).
LOGIN (draft-murchison-sasl-login) sends the user name and the password in two
base64 steps after the challenges ``Username:`` and ``Password:``.

This module imports only the standard library.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

#: The LOGIN challenges, base64 ("Username:", "Password:").
LOGIN_USER_CHALLENGE = "VXNlcm5hbWU6"
LOGIN_PASSWORD_CHALLENGE = "UGFzc3dvcmQ6"


@dataclass(frozen=True)
class PlainCredentials:
    """A decoded PLAIN response."""

    authzid: str
    authcid: str
    password: str

    @property
    def proxy(self) -> bool:
        """True when it asks to act as someone else (an authzid other than the login)."""
        return bool(self.authzid) and self.authzid.lower() != self.authcid.lower()


def decode_text(token: str | bytes) -> str | None:
    """A base64 SASL token as UTF-8 text, or None when malformed."""
    try:
        raw = token.encode("ascii") if isinstance(token, str) else token
        return base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        return None


def decode_plain(token: str | bytes) -> PlainCredentials | None:
    """The PLAIN response ``token`` (``=`` is the empty response), or None when malformed.

    Malformed: not base64, not UTF-8, not three NUL-separated fields, or an empty
    login.  A proxy request is well-formed: check :attr:`PlainCredentials.proxy`.
    """
    text = "" if token in ("=", b"=") else decode_text(token)
    if text is None:
        return None
    parts = text.split("\0")
    if len(parts) != 3 or not parts[1]:
        return None
    return PlainCredentials(*parts)
