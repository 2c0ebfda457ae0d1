"""``[directory.ldap]``: where the directory lives when ``[directory] backend = "ldap"``.

Format
======
::

    [directory.ldap]
    url = "ldap://dc1.realdomain.example"   # ldap:// or ldaps://
    starttls = true                         # ldap:// only; ldaps:// is TLS from the start
    ca_file = ""                            # CA certificates (PEM); "" = the system's
    bind_dn = ""                            # service account for searches; "" = anonymous
    bind_password = ""
    base = "dc=realdomain,dc=example"
    schema = "rfc"                          # "rfc" | "ad" (Active Directory defaults)
    mailbox_filter = "..."                  # {address} is replaced, escaped per RFC 4515
    list_filter = "..."
    mail_attribute = "mail"                 # a mailbox's own address: its maildir
    member_attribute = "member"             # DNs of a list's members
    cache_ttl = 60                          # seconds an answer (or "no such entry") is reused

``schema`` picks the defaults of the two filters (and, for ``ad``, reads
``proxyAddresses`` and ``userAccountControl``); a filter set in the file wins.

This module imports nothing from Twisted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from mailguard.directory import ldapfilter

SCHEMAS = ("rfc", "ad")

#: The filters and attributes each schema starts from.
SCHEMA_DEFAULTS: dict[str, dict[str, str]] = {
    "rfc": {
        "mailbox_filter": "(&(objectClass=inetOrgPerson)(|(mail={address})(mailLocalAddress={address})))",
        "list_filter": "(&(objectClass=groupOfNames)(mail={address}))",
    },
    "ad": {
        "mailbox_filter": "(&(|(objectClass=user)(objectClass=contact))"
                          "(|(mail={address})(proxyAddresses=smtp:{address})))",
        "list_filter": "(&(objectClass=group)(|(mail={address})(proxyAddresses=smtp:{address})))",
    },
}

#: Every key with its default (the filters: the ``rfc`` schema's).
DEFAULTS: dict[str, Any] = {
    "url": "ldap://localhost",
    "starttls": True,
    "ca_file": "",
    "bind_dn": "",
    "bind_password": "",
    "base": "",
    "schema": "rfc",
    **SCHEMA_DEFAULTS["rfc"],
    "mail_attribute": "mail",
    "member_attribute": "member",
    "cache_ttl": 60,
}

_ATTRIBUTE = re.compile(r"[A-Za-z][A-Za-z0-9-]*\Z")


@dataclass(frozen=True)
class LDAPConfig:
    """The validated ``[directory.ldap]`` table.

    ``tls`` is ``"ldaps"`` (TLS from the first byte), ``"starttls"`` or ``"none"``.
    """

    url: str
    host: str
    port: int
    tls: str
    ca_file: Path | None
    bind_dn: str
    bind_password: str
    base: str
    schema: str
    mailbox_filter: str
    list_filter: str
    mail_attribute: str
    member_attribute: str
    cache_ttl: int


def parse(table: Any, fail: Callable[[str, str], Exception], base_dir: Path, required: bool) -> LDAPConfig:
    """Validate the ``[directory.ldap]`` table.

    :param fail: makes the error for a key (``"url"`` -> ``directory.ldap.url: ...``).
    :param required: the backend is ``ldap``: ``base`` must then be set.
    """
    if not isinstance(table, dict):
        raise fail("", "must be a table")
    for key in table:
        if key not in DEFAULTS:
            raise fail(key, "unknown key")

    def get(key: str, kind: type) -> Any:
        default = DEFAULTS[key]
        if key in SCHEMA_DEFAULTS["rfc"]:
            default = SCHEMA_DEFAULTS.get(str(table.get("schema")), SCHEMA_DEFAULTS["rfc"])[key]
        value = table.get(key, default)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            name = {bool: "true or false", int: "an integer", str: "a string"}[kind]
            raise fail(key, f"must be {name}, not {value!r}")
        return value

    url = get("url", str).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("ldap", "ldaps"):
        raise fail("url", f"must start with ldap:// or ldaps://, not {url!r}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError as e:
        raise fail("url", f"{url!r}: {e}") from None
    if not host:
        raise fail("url", f"{url!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise fail("url", f"{url!r}: only ldap[s]://host[:port] is understood")
    starttls = get("starttls", bool)
    tls = "ldaps" if parts.scheme == "ldaps" else ("starttls" if starttls else "none")

    ca_text = get("ca_file", str)
    ca_file = None
    if ca_text:
        ca_file = Path(ca_text).expanduser()
        if not ca_file.is_absolute():
            ca_file = base_dir / ca_file
        if not ca_file.is_file():
            raise fail("ca_file", f"no such file: {ca_file}")

    bind_dn, bind_password = get("bind_dn", str).strip(), get("bind_password", str)
    if bind_dn and not bind_password:
        raise fail("bind_password", "is empty but bind_dn is set (that would be an unauthenticated bind)")
    base = get("base", str).strip()
    if required and not base:
        raise fail("base", "must name the subtree to search, e.g. \"dc=realdomain,dc=example\"")
    schema = get("schema", str)
    if schema not in SCHEMAS:
        raise fail("schema", f"must be one of {', '.join(SCHEMAS)}, not {schema!r}")

    filters = {}
    for key in ("mailbox_filter", "list_filter"):
        text = get(key, str).strip()
        if ldapfilter.PLACEHOLDER not in text:
            raise fail(key, f"must contain {ldapfilter.PLACEHOLDER} (where the address goes)")
        try:
            ldapfilter.parse(ldapfilter.fill(text, "postmaster@example.org"))
        except ldapfilter.FilterError as e:
            raise fail(key, f"not an LDAP filter: {e}") from None
        filters[key] = text

    attrs = {}
    for key in ("mail_attribute", "member_attribute"):
        attrs[key] = get(key, str).strip()
        if not _ATTRIBUTE.match(attrs[key]):
            raise fail(key, f"must be an attribute name, not {attrs[key]!r}")
    cache_ttl = get("cache_ttl", int)
    if cache_ttl < 0:
        raise fail("cache_ttl", f"must be at least 0, not {cache_ttl}")
    return LDAPConfig(url, host, port or (636 if tls == "ldaps" else 389), tls, ca_file, bind_dn,
                      bind_password, base, schema, filters["mailbox_filter"], filters["list_filter"],
                      attrs["mail_attribute"], attrs["member_attribute"], cache_ttl)
