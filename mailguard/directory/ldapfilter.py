"""LDAP search filters (RFC 4515): escaping an address into a template, and parsing.

The configured filters are templates with an ``{address}`` placeholder.  The address
comes from the network (``RCPT TO``, an AUTH login), so it is escaped per RFC 4515
section 3 before it is put in: ``*``, ``(``, ``)``, ``\\`` and NUL become ``\\2a``,
``\\28``, ``\\29``, ``\\5c`` and ``\\00``.  An address such as ``*)(uid=*`` then stays
one assertion value and cannot widen the search.

:func:`parse` turns the filter text into ldaptor's wire objects.  ldaptor has a parser
of its own, but it is built on deprecated pyparsing calls (warnings at import) and
costs about a millisecond per filter; this one is a small recursive descent over the
RFC 4515 grammar.  It imports nothing from Twisted.
"""

from __future__ import annotations

import re
from typing import Any

from ldaptor.protocols import pureldap

__all__ = ["FilterError", "PLACEHOLDER", "address_attributes", "escape", "fill", "parse"]

PLACEHOLDER = "{address}"
_SPECIAL = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\0": r"\00"}
_ATTR = re.compile(r"[A-Za-z][A-Za-z0-9-]*(;[A-Za-z0-9-]+)*|[0-9]+(\.[0-9]+)*(;[A-Za-z0-9-]+)*")
_SENTINEL = "\x01mailguard-address\x01"


class FilterError(ValueError):
    """A filter that does not follow RFC 4515."""


def escape(value: str) -> str:
    """``value`` as an RFC 4515 assertion value: the five special characters escaped."""
    return "".join(_SPECIAL.get(c, c) for c in value)


def fill(template: str, address: str) -> str:
    """The template with every ``{address}`` replaced by the escaped address."""
    return template.replace(PLACEHOLDER, escape(address))


def parse(text: str) -> Any:
    """The filter as an ldaptor ``LDAPFilter`` object.

    :raises FilterError: the text is not one well-formed filter.
    """
    parser = _Parser(text)
    result = parser.filter()
    if parser.pos != len(text):
        raise FilterError(f"unexpected {text[parser.pos:]!r} after the filter")
    return result


def address_attributes(template: str) -> tuple[str, ...]:
    """The attributes a template compares with ``{address}`` (``mail``, ``mailLocalAddress``).

    Their values on an entry are the addresses that lead to it.  A value prefixed as in
    ``(proxyAddresses=smtp:{address})`` counts too (Active Directory).
    """
    found: dict[str, None] = {}

    def walk(node: Any) -> None:
        if isinstance(node, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
            for child in node:
                walk(child)
        elif isinstance(node, pureldap.LDAPFilter_not):
            walk(node.value)
        elif isinstance(node, pureldap.LDAPAttributeValueAssertion):
            value = node.assertionValue.value
            if isinstance(value, bytes) and _SENTINEL.encode() in value:
                found[str(node.attributeDesc.value)] = None

    walk(parse(template.replace(PLACEHOLDER, _SENTINEL)))
    return tuple(found)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _expect(self, char: str) -> None:
        if self._peek() != char:
            got = repr(self._peek()) if self._peek() else "the end"
            raise FilterError(f"expected {char!r} at position {self.pos}, found {got}")
        self.pos += 1

    def filter(self) -> Any:
        self._expect("(")
        c = self._peek()
        if c in ("&", "|"):
            self.pos += 1
            children = [self.filter()]
            while self._peek() == "(":
                children.append(self.filter())
            node: Any = (pureldap.LDAPFilter_and if c == "&" else pureldap.LDAPFilter_or)(children)
        elif c == "!":
            self.pos += 1
            node = pureldap.LDAPFilter_not(self.filter())
        else:
            node = self._item()
        self._expect(")")
        return node

    def _item(self) -> Any:
        m = _ATTR.match(self.text, self.pos)
        if m is None:
            raise FilterError(f"expected an attribute name at position {self.pos}")
        attr = m.group(0)
        self.pos = m.end()
        rest = self.text[self.pos:self.pos + 2]
        for op, cls in ((">=", pureldap.LDAPFilter_greaterOrEqual), ("<=", pureldap.LDAPFilter_lessOrEqual),
                        ("~=", pureldap.LDAPFilter_approxMatch)):
            if rest == op:
                self.pos += 2
                return cls(attributeDesc=pureldap.LDAPAttributeDescription(attr),
                           assertionValue=pureldap.LDAPAttributeValue(self._value()))
        if rest.startswith(":"):
            raise FilterError(f"extensible matches are not supported (position {self.pos})")
        self._expect("=")
        parts = [self._value()]
        while self._peek() == "*":
            self.pos += 1
            parts.append(self._value())
        if len(parts) == 1:
            return pureldap.LDAPFilter_equalityMatch(
                attributeDesc=pureldap.LDAPAttributeDescription(attr),
                assertionValue=pureldap.LDAPAttributeValue(parts[0]))
        if parts == [b"", b""]:
            return pureldap.LDAPFilter_present(attr)
        subs: list[Any] = []
        if parts[0]:
            subs.append(pureldap.LDAPFilter_substrings_initial(parts[0]))
        subs += [pureldap.LDAPFilter_substrings_any(p) for p in parts[1:-1] if p]
        if parts[-1]:
            subs.append(pureldap.LDAPFilter_substrings_final(parts[-1]))
        return pureldap.LDAPFilter_substrings(type=attr, substrings=subs)

    def _value(self) -> bytes:
        out = bytearray()
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in "()*\0":
                break
            if c == "\\":
                pair = self.text[self.pos + 1:self.pos + 3]
                if len(pair) != 2 or any(h not in "0123456789abcdefABCDEF" for h in pair):
                    raise FilterError(f"bad escape at position {self.pos}: a backslash needs two hex digits")
                out.append(int(pair, 16))
                self.pos += 3
            else:
                out += c.encode()
                self.pos += 1
        return bytes(out)
