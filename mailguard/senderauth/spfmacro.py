"""SPF macro strings (RFC 7208 section 7): syntax check and expansion.

A macro string mixes literal text with ``%{letter[digits][r][delimiters]}`` expansions
and the escapes ``%%``, ``%_`` and ``%-``.  :func:`check` rejects bad syntax (the record
is then a ``permerror``); :func:`expand` substitutes the values of one evaluation.
This module is pure: it asks no DNS (the ``p`` value is passed in, already looked up).
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass

_MACRO = re.compile(r"%(?:\{([a-zA-Z])([0-9]*)(r?)([.\-+,/_=]*)\}|(.))", re.DOTALL)
LETTERS = frozenset("slodiphv")
EXP_LETTERS = frozenset("crt")


class MacroError(ValueError):
    """A malformed macro string (permerror)."""


@dataclass(frozen=True)
class Facts:
    """The values macros expand to, for one check_host() call."""

    ip: str             # the client address, as given
    sender: str         # local-part@domain (local-part "postmaster" when it had none)
    domain: str         # the current domain (changes through include/redirect)
    helo: str
    receiver: str = "unknown"
    timestamp: int = 0

    @property
    def local(self) -> str:
        return self.sender.rpartition("@")[0]

    @property
    def sender_domain(self) -> str:
        return self.sender.rpartition("@")[2]


def check(text: str, explanation: bool = False) -> list[str]:
    """Raise :class:`MacroError` unless ``text`` is a valid macro string; return its letters."""
    letters = []
    pos = 0
    for m in _MACRO.finditer(text):
        _literal(text[pos:m.start()])
        pos = m.end()
        if m.group(5) is not None:
            if m.group(5) not in "%_-":
                raise MacroError(f"bad macro escape %{m.group(5)}")
            continue
        letter = m.group(1).lower()
        if letter not in LETTERS and not (explanation and letter in EXP_LETTERS):
            raise MacroError(f"unknown macro letter {m.group(1)}")
        if m.group(2) and int(m.group(2)) == 0:
            raise MacroError("a macro keeps at least one part")
        letters.append(letter)
    _literal(text[pos:])
    return letters


def _literal(text: str) -> None:
    """Macro literals are the visible ASCII characters except '%' (and space in explanations)."""
    for ch in text:
        if not (" " <= ch <= "~") or ch == "%":
            raise MacroError(f"bad character {ch!r} in macro string")


def _ip_value(ip: str) -> tuple[str, str]:
    """The ``i`` value and the ``v`` value of an address (IPv6: dotted nibbles, RFC 7208 7.3)."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return str(addr), "in-addr"
    # Upper-case nibbles, as RFC 7208's examples and the community test suite write them.
    return ".".join(addr.exploded.replace(":", "").upper()), "ip6"


def expand(text: str, facts: Facts, validated: str = "unknown") -> str:
    """Expand ``text`` (already :func:`check`-ed) for ``facts``; ``validated`` is the ``p`` value."""
    def one(m: re.Match[str]) -> str:
        if m.group(5) is not None:
            return {"%": "%", "_": " ", "-": "%20"}[m.group(5)]
        letter = m.group(1)
        value = _value(letter.lower(), facts, validated)
        delimiters = m.group(4) or "."
        parts = re.split("[" + re.escape(delimiters) + "]", value)
        if m.group(3):
            parts.reverse()
        if m.group(2):
            parts = parts[-int(m.group(2)):]
        result = ".".join(parts)
        if letter.isupper():
            result = urllib.parse.quote(result, safe="-._~")
        return result
    return _MACRO.sub(one, text)


def _value(letter: str, facts: Facts, validated: str) -> str:
    ip, version = _ip_value(facts.ip)
    if letter == "s":
        return facts.sender
    if letter == "l":
        return facts.local
    if letter == "o":
        return facts.sender_domain
    if letter == "d":
        return facts.domain
    if letter == "i":
        return ip
    if letter == "p":
        return validated
    if letter == "h":
        return facts.helo
    if letter == "v":
        return version
    if letter == "c":
        return str(ipaddress.ip_address(facts.ip))
    if letter == "r":
        return facts.receiver
    return str(facts.timestamp)  # "t"
