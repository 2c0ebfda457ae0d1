"""DKIM signatures for mail the office sends (RFC 6376; Ed25519 per RFC 8463).

:func:`sign` returns the ``DKIM-Signature:`` header fields to put in front of a
message: one ``rsa-sha256`` signature, and a second ``ed25519-sha256`` one when the
selector also has an Ed25519 key (verifiers that do not know Ed25519 ignore it).
Canonicalization is relaxed/relaxed, which survives the header re-folding and
trailing-whitespace changes relays make; the header set is the one verifiers
expect (From, To, Cc, Subject, Date, Message-ID, MIME headers, …), with ``From``
signed once more than it occurs so that a second From cannot be added.

Signing hashes the whole body and does public-key arithmetic: callers run it in a
thread, never on the reactor.
"""

from __future__ import annotations

import email.utils
from typing import Sequence

import dkim

from mailguard.dkim.keys import Key, KeyFileError

CANONICALIZE = (b"relaxed", b"relaxed")
_HEADER_LIMIT = 1 << 20     # only the header block is looked at for From:


class SigningError(Exception):
    """The message could not be signed (a broken key, an unparsable message)."""


def from_domain(message: bytes) -> str | None:
    """The domain of the single address in the ``From:`` header, lower case, or None.

    ``message`` has CRLF line endings.  None when there is no From:, several From:
    fields, or a From: with more or fewer than one address.
    """
    end = message.find(b"\r\n\r\n", 0, _HEADER_LIMIT)
    head = message[: end if end >= 0 else min(len(message), _HEADER_LIMIT)].decode("utf-8", "replace")
    fields: list[str] = []
    for line in head.split("\r\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    values = [f.split(":", 1)[1] for f in fields if f.split(":", 1)[0].strip().lower() == "from" and ":" in f]
    if len(values) != 1:
        return None
    addresses = [a for _, a in email.utils.getaddresses(values) if a]
    if len(addresses) != 1 or "@" not in addresses[0]:
        return None
    return addresses[0].rpartition("@")[2].strip().lower().rstrip(".") or None


def sign(message: bytes, keys: Sequence[Key]) -> bytes:
    """The DKIM-Signature header fields (CRLF-terminated) for ``message``, one per key.

    :param message: the message as it will be sent, CRLF line endings.
    :raises SigningError: a key cannot be read or used, or the message cannot be parsed.
    """
    out = []
    for key in keys:
        try:
            header = dkim.sign(message, key.selector.encode("ascii"), key.domain.encode("ascii"),
                               key.private(), canonicalize=CANONICALIZE,
                               signature_algorithm=key.signature_algorithm)
        except KeyFileError as e:
            raise SigningError(str(e)) from None
        except (dkim.DKIMException, ValueError) as e:
            raise SigningError(f"{key.path}: {e}") from None
        out.append(header if header.endswith(b"\r\n") else header + b"\r\n")
    return b"".join(out)
