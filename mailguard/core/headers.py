"""Header fields a submitted message must carry (RFC 6409 section 8; RFC 5322 section 3.6).

A mail program that submits without ``Date:`` or ``Message-ID:`` gets them added,
at the end of the header section, as Postfix does for its trusted clients.
"""

from __future__ import annotations

import secrets
from email.utils import formatdate


def header_end(message: bytes) -> int:
    """The offset of the CRLF that ends the header section (the message's length when none)."""
    if message.startswith(b"\r\n"):
        return 0
    end = message.find(b"\r\n\r\n")
    return len(message) if end < 0 else end + 2


def has_field(message: bytes, name: bytes) -> bool:
    """True when the header section has a field called ``name`` (any case)."""
    head = b"\r\n" + message[: header_end(message)].lower()
    return b"\r\n" + name.lower() + b":" in head


def add_missing(message: bytes, hostname: str, msg_id: str, now: float) -> bytes:
    """``message`` with ``Date:`` and ``Message-ID:`` added when it lacks them (CRLF line endings)."""
    added = b""
    if not has_field(message, b"date"):
        added += f"Date: {formatdate(now, localtime=True)}\r\n".encode("ascii")
    if not has_field(message, b"message-id"):
        added += f"Message-ID: <{msg_id}.{secrets.token_hex(6)}@{hostname}>\r\n".encode("utf-8", "replace")
    if not added:
        return message
    end = header_end(message)
    if end == len(message) and message and not message.endswith(b"\r\n"):
        message += b"\r\n"
        end = len(message)
    return message[:end] + added + message[end:]
