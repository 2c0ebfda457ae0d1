"""RFC 5321 mailbox paths: parsing, normalisation, and refusal of relay tricks.

A path is what stands after ``MAIL FROM:`` or ``RCPT TO:`` (RFC 5321 section 4.1.2):
``<local@domain>``, optionally with a source route (``<@a,@b:local@domain>``, whose
route is ignored as section 4.1.1.3 / appendix C allow: the final address is judged),
or ``<>`` for the null sender.  Angle brackets may be left out, as people typing into
telnet do (Postfix accepts that too).

Normalisation: the domain is lower-cased, one trailing dot is removed, and an
internationalised domain is converted to its IDNA (``xn--``) form.  The local part
keeps its case (it belongs to the receiving host, RFC 5321 section 2.4) and
:attr:`Address.key` gives the lower-case form the directory is keyed by.

Refused as relay tricks, never routed (RFC 2505 section 2.1.2 and the open-relay
catalogues): ``%`` and ``!`` in the local part (``user%remote@local``,
``remote!user@local``), a quoted local part holding ``@``, more than one ``@``, and
Exchange-encapsulated addresses (local parts starting with ``IMCEA``).

This module imports nothing from Twisted.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_LOCAL = 64          # RFC 5321 section 4.5.3.1.1
MAX_DOMAIN = 255        # section 4.5.3.1.2
MAX_PATH = 256          # section 4.5.3.1.3

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"^{_ATEXT}+(?:\.{_ATEXT}+)*$")
_QUOTED = re.compile(r'^"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"$')
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_PARAM = re.compile(r"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]*))?$")


class AddressError(ValueError):
    """A path that cannot be accepted.

    ``trick`` is true when the form is a known relay trick (answer 550 5.7.1) rather
    than plain bad syntax (answer 501).
    """

    def __init__(self, message: str, trick: bool = False) -> None:
        super().__init__(message)
        self.trick = trick


@dataclass(frozen=True)
class Address:
    """A normalised ``local@domain``; ``domain`` may be an address literal ``[…]``."""

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local

    @property
    def key(self) -> str:
        """The lower-case form the directory is keyed by."""
        return str(self).lower()

    @property
    def is_literal(self) -> bool:
        """True when the domain is an address literal such as ``[192.0.2.1]``."""
        return self.domain.startswith("[")

    def with_domain(self, domain: str) -> Address:
        """The same local part at another domain (a reroute)."""
        return Address(self.local, domain)


def normalize_domain(domain: str) -> str:
    """Lower-case, strip one trailing dot, IDNA-encode, and check a domain name.

    :raises AddressError: not a valid domain name.
    """
    d = domain.strip()
    if d.endswith("."):
        d = d[:-1]
    if not d:
        raise AddressError("empty domain")
    if not d.isascii():
        try:
            d = d.encode("idna").decode("ascii")
        except UnicodeError:
            raise AddressError(f"domain {domain!r} is not a valid internationalised name") from None
    d = d.lower()
    if len(d) > MAX_DOMAIN:
        raise AddressError("domain too long")
    for label in d.split("."):
        if not _LABEL.match(label):
            raise AddressError(f"bad domain {domain!r}")
    return d


def normalize_literal(literal: str) -> str:
    """Check an address literal ``[1.2.3.4]`` or ``[IPv6:…]`` (RFC 5321 section 4.1.3)."""
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            if "%" in inner:            # a scope id (fe80::1%eth0) names no host on the internet
                raise ValueError("scoped address")
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise AddressError(f"bad address literal {literal!r}") from None


def _split_route(path: str) -> str:
    """Drop a source route ``@a,@b:`` and return the final mailbox."""
    if not path.startswith("@"):
        return path
    route, colon, rest = path.partition(":")
    if not colon:
        raise AddressError("source route without ':'")
    for hop in route.split(","):
        if not hop.startswith("@") or len(hop) < 2:
            raise AddressError("bad source route")
    return rest


def _split_mailbox(mailbox: str) -> tuple[str, str]:
    """Split ``local@domain`` at the right ``@``, honouring a quoted local part."""
    if mailbox.startswith('"'):
        end = 1
        while end < len(mailbox):
            c = mailbox[end]
            if c == "\\":
                end += 2
                continue
            if c == '"':
                break
            end += 1
        else:
            raise AddressError("unterminated quoted local part")
        local, rest = mailbox[: end + 1], mailbox[end + 1:]
        if rest and not rest.startswith("@"):
            raise AddressError("garbage after quoted local part")
        domain = rest[1:] if rest else ""
        if rest and not domain:
            raise AddressError("empty domain after '@'")
        if "@" in domain:
            raise AddressError("more than one '@'", trick=True)
        return local, domain
    if mailbox.count("@") > 1:
        raise AddressError("more than one '@'", trick=True)
    local, at, domain = mailbox.partition("@")
    if at and not domain:
        raise AddressError("empty domain after '@'")
    return local, domain


def _check_local(local: str) -> str:
    if not local:
        raise AddressError("empty local part")
    if not local.isascii():
        raise AddressError("8-bit local part without SMTPUTF8")
    m = _QUOTED.match(local)
    if m:
        content = re.sub(r"\\(.)", r"\1", m.group(1))
        if "@" in content or "%" in content or "!" in content:
            raise AddressError("quoted local part holding a routing character", trick=True)
        if _DOT_ATOM.match(content):
            local = content          # "joe" is the same mailbox as joe
    elif not _DOT_ATOM.match(local):
        raise AddressError(f"bad local part {local!r}")
    if "%" in local or "!" in local:
        raise AddressError("'%' or '!' routing in the local part", trick=True)
    if local.lstrip('"')[:5].upper() == "IMCEA":
        raise AddressError("Exchange-encapsulated address", trick=True)
    if len(local) > MAX_LOCAL:
        raise AddressError("local part too long")
    return local


def parse_path(text: str, *, null_ok: bool = False, bare_ok: frozenset[str] = frozenset()) -> Address | None:
    """Parse a reverse- or forward-path.

    :param null_ok: ``<>`` is allowed (MAIL FROM) and returns None.
    :param bare_ok: lower-case local parts accepted without a domain (``postmaster``,
        RFC 5321 section 4.1.1.3); they come back with an empty domain.
    :raises AddressError: bad syntax, or a relay trick (``err.trick``).
    """
    t = text.strip()
    if t.startswith("<") or t.endswith(">"):
        if not (t.startswith("<") and t.endswith(">")) or len(t) < 2:
            raise AddressError("unbalanced angle brackets")
        t = t[1:-1].strip()
    if t == "":
        if null_ok:
            return None
        raise AddressError("empty path")
    if len(t) + 2 > MAX_PATH:         # the limit counts the angle brackets
        raise AddressError("path too long")
    if any(c in t for c in "<>\x00\r\n\t ") and not t.startswith('"'):
        raise AddressError("bad character in path")
    mailbox = _split_route(t)
    local, domain = _split_mailbox(mailbox)
    local = _check_local(local)
    if not domain:
        if local.lower() in bare_ok:
            return Address(local, "")
        raise AddressError("address must be fully qualified (local@domain)")
    if domain.startswith("[") and domain.endswith("]"):
        return Address(local, normalize_literal(domain))
    if not domain.isascii():
        # SMTPUTF8 (RFC 6531) is not offered: an 8-bit domain is refused, not IDNA-folded
        # (NFKC would turn 'realdomain\uff0eexample' into the local 'realdomain.example').
        raise AddressError("8-bit domain without SMTPUTF8")
    return Address(local, normalize_domain(domain))


def parse_mail_arg(arg: str, keyword: str) -> tuple[str, dict[str, str | None]]:
    """Split ``FROM:<a@b> SIZE=10 BODY=8BITMIME`` into the path and its ESMTP parameters.

    :param keyword: ``FROM`` or ``TO``.
    :raises AddressError: the keyword or a parameter is malformed.
    """
    head, colon, rest = arg.partition(":")
    if not colon or head.strip().upper() != keyword:
        raise AddressError(f"expected {keyword}:<address>")
    rest = rest.strip()
    if rest.startswith("<"):
        # A quoted local part may hold '>': look for the closing bracket after it,
        # and only after it (a quote in a parameter value is not part of the path).
        start = 1
        q1 = rest.find('"')
        if 0 <= q1 < rest.find(">"):
            start = q1 + 1
            while start < len(rest) and rest[start] != '"':
                start += 2 if rest[start] == "\\" else 1
        end = rest.find(">", start)
        if end < 0:
            raise AddressError("unbalanced angle brackets")
        path, params_text = rest[: end + 1], rest[end + 1:]
    else:
        path, _, params_text = rest.partition(" ")
    params: dict[str, str | None] = {}
    for word in params_text.split():
        m = _PARAM.match(word)
        if not m:
            raise AddressError(f"bad parameter {word!r}")
        params[m.group(1).upper()] = m.group(2)
    return path, params
