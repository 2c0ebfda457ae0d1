"""The Authentication-Results header (RFC 8601): writing ours, removing forged ones.

:func:`header` writes one field naming this host (the authserv-id) with a ``spf``,
``dkim`` (one per signature; ``dkim=none`` when unsigned) and ``dmarc`` result, each only
when that check ran.  :func:`remove_ours` drops every incoming Authentication-Results field
whose authserv-id is this host (RFC 8601 section 5): only results we write ourselves may
carry our name, so a sender cannot forge a "pass" from us.
"""

from __future__ import annotations

import re
from typing import Sequence

from mailguard.senderauth.dkimverify import DKIMResult
from mailguard.senderauth.dmarc import DMARCResult
from mailguard.senderauth.spf import SPFResult

_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.@]+$")
_FIELD = re.compile(rb"^authentication-results[ \t]*:", re.I)
_ANY_FIELD = re.compile(rb"^authentication-results[ \t]*:", re.I | re.M)


def _value(text: str) -> str:
    """A property value: as it is when it is a token or an address, else a quoted-string."""
    if _TOKEN.match(text):
        return text
    cleaned = "".join(c for c in text if c.isprintable())
    return '"' + cleaned.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    cleaned = "".join(c for c in text if c.isprintable() and c not in "()\\")
    return f" ({cleaned})" if cleaned else ""


def header(hostname: str, spf: SPFResult | None = None, dkim: Sequence[DKIMResult] | None = None,
           dmarc: DMARCResult | None = None) -> bytes:
    """``Authentication-Results: hostname; spf=...; dkim=...; dmarc=...`` with CRLF line ends.

    A check that did not run is None and left out; with none at all the result is
    ``none`` (RFC 8601 section 2.2).
    """
    parts: list[str] = []
    if spf is not None:
        prop = (f"smtp.mailfrom={_value(spf.sender)}" if spf.identity == "mailfrom"
                else f"smtp.helo={_value(spf.domain)}")
        parts.append(f"spf={spf.result}{_comment(spf.reason)} {prop}")
    if dkim is not None:
        if not dkim:
            parts.append("dkim=none (no signature)")
        for r in dkim:
            props = "".join(f" header.{k}={_value(v)}" for k, v in
                            (("d", r.domain), ("s", r.selector), ("i", r.identity), ("a", r.algorithm)) if v)
            parts.append(f"dkim={r.result}{_comment(r.reason)}{props}")
    if dmarc is not None:
        policy = _comment(dmarc.reason)
        if dmarc.requested:
            applied = f" applied={dmarc.policy}" if dmarc.policy != dmarc.requested else ""
            policy = f" (p={dmarc.requested}{applied})"
        author = f" header.from={_value(dmarc.domain)}" if dmarc.domain else ""
        parts.append(f"dmarc={dmarc.result}{policy}{author}")
    body = ";\r\n\t".join([hostname] + (parts or ["none"]))
    return f"Authentication-Results: {body}\r\n".encode("utf-8", "replace")


def authserv_id(value: bytes) -> str:
    """The authserv-id of an Authentication-Results value (comments and folding skipped)."""
    text = value.decode("utf-8", "replace")
    text = re.sub(r"\([^()]*\)", " ", text)          # CFWS comments (one level is enough here)
    return text.split(";", 1)[0].strip().split()[0].lower().rstrip(".") if text.strip() else ""


def remove_ours(message: bytes, hostname: str) -> tuple[bytes, int]:
    """``message`` without the Authentication-Results fields naming ``hostname``; and how many."""
    end = message.find(b"\r\n\r\n")
    head, rest = (message, b"") if end < 0 else (message[:end + 2], message[end + 2:])
    if not _ANY_FIELD.search(head):
        return message, 0
    lines = head.split(b"\r\n")
    ours = hostname.lower().rstrip(".")
    kept: list[bytes] = []
    removed = 0
    i = 0
    while i < len(lines):
        j = i + 1
        while j < len(lines) and lines[j][:1] in (b" ", b"\t"):
            j += 1
        field = lines[i:j]
        if _FIELD.match(lines[i]):
            value = b" ".join(field).split(b":", 1)[1]
            if authserv_id(value) == ours:
                removed += 1
                i = j
                continue
        kept.extend(field)
        i = j
    if not removed:
        return message, 0
    return b"\r\n".join(kept) + rest, removed
