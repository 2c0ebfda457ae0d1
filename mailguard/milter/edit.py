"""A message as milters see it, and the header and body changes they ask for.

Pure functions over CRLF message bytes (the form the SMTP server holds a message in).
The rules follow Sendmail and Postfix:

- a header is sent to a milter as its name and its value with the leading blanks
  removed, folded lines joined by a bare LF, unless the milter negotiated
  ``SMFIP_HDR_LEADSPC`` (then the value is sent exactly as it follows the colon);
- an added or changed header is written ``Name: value`` (``Name:value`` under
  ``SMFIP_HDR_LEADSPC``); line breaks in the value become CRLF, and a line break
  not followed by a blank gets a TAB, so a value can never start a new header;
- ``SMFIR_ADDHEADER`` appends; ``SMFIR_INSHEADER`` inserts before the header at a
  0-based position among all headers (past the end: appends); ``SMFIR_CHGHEADER``
  changes the n-th (1-based) header of that name, an empty value deletes it, and a
  change of an n-th that does not exist adds the header (Sendmail 8.14 behaviour);
- ``SMFIR_REPLBODY`` chunks replace the whole body; line ends become CRLF.

This module imports only the standard library and the pure codec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from mailguard.milter.codec import ProtocolError

_NAME = re.compile(r"^[!-9;-~]+$")          # RFC 5322 ftext: printable ASCII except ':'
_BREAK = re.compile(r"\r\n|\r|\n")


@dataclass
class Header:
    """One header field: its name and everything after the colon (folds kept, CRLF)."""

    name: str
    raw: str

    def line(self) -> bytes:
        return f"{self.name}:{self.raw}\r\n".encode("utf-8", "surrogateescape")


@dataclass
class Message:
    """A message split into its header fields and its body (both CRLF)."""

    headers: list[Header] = field(default_factory=list)
    body: bytes = b""
    had_separator: bool = True

    @classmethod
    def parse(cls, message: bytes) -> Message:
        """Split a CRLF message.  A leading line that is not a header starts the body."""
        headers: list[Header] = []
        pos = 0
        size = len(message)
        while pos < size:
            end = message.find(b"\r\n", pos)
            line_end = size if end < 0 else end
            line = message[pos:line_end]
            nxt = size if end < 0 else end + 2
            if not line:
                return cls(headers, message[nxt:], True)
            if line[:1] in (b" ", b"\t") and headers:
                headers[-1].raw += "\r\n" + line.decode("utf-8", "surrogateescape")
                pos = nxt
                continue
            name, colon, value = line.partition(b":")
            if not colon or not name or not _NAME.match(name.decode("latin-1")):
                return cls(headers, message[pos:], False)
            headers.append(Header(name.decode("ascii"), value.decode("utf-8", "surrogateescape")))
            pos = nxt
        return cls(headers, b"", False)

    def to_bytes(self) -> bytes:
        head = b"".join(h.line() for h in self.headers)
        return head + b"\r\n" + self.body if self.had_separator else head + self.body


def value_for_milter(h: Header, leading_space: bool) -> str:
    """The header value a milter is sent (see the module docstring)."""
    value = h.raw.replace("\r\n", "\n")
    return value if leading_space else value.lstrip(" \t")


def _clean_value(value: str) -> str:
    lines = _BREAK.split(value)
    out = lines[0]
    for ln in lines[1:]:
        out += "\r\n" + (ln if ln[:1] in (" ", "\t") else "\t" + ln)
    return out


def _new_header(name: str, value: str, leading_space: bool) -> Header:
    if not _NAME.match(name):
        raise ProtocolError(f"bad header name {name[:60]!r}")
    value = _clean_value(value)
    return Header(name, value if leading_space else " " + value)


def add_header(msg: Message, name: str, value: str, leading_space: bool) -> None:
    """SMFIR_ADDHEADER: append the header."""
    msg.headers.append(_new_header(name, value, leading_space))


def insert_header(msg: Message, index: int, name: str, value: str, leading_space: bool) -> None:
    """SMFIR_INSHEADER: insert before the header at 0-based ``index``."""
    msg.headers.insert(min(index, len(msg.headers)), _new_header(name, value, leading_space))


def change_header(msg: Message, index: int, name: str, value: str, leading_space: bool) -> None:
    """SMFIR_CHGHEADER: change (or, with an empty value, delete) the ``index``-th ``name`` header."""
    wanted = max(index, 1)
    seen = 0
    for pos, h in enumerate(msg.headers):
        if h.name.lower() == name.lower():
            seen += 1
            if seen == wanted:
                if value:
                    msg.headers[pos] = _new_header(h.name, value, leading_space)
                else:
                    del msg.headers[pos]
                return
    if value:
        add_header(msg, name, value, leading_space)


def crlf(data: bytes) -> bytes:
    """Every line end (CRLF, bare CR, bare LF) as CRLF."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def body_chunks(body: bytes, size: int) -> list[bytes]:
    """The body cut into chunks of at most ``size`` octets (none for an empty body)."""
    return [body[i:i + size] for i in range(0, len(body), size)]
