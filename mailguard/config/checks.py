"""The ``[checks]`` section, the inbound checks' ``[replies]`` keys and ``[limits]`` rate keys.

Format
======
::

    [checks]
    reject_clients = []    # addresses/networks refused whatever the recipient (RFC 2505 2.5)
    reject_senders = []    # "user@domain", "@domain", "@.domain" (its subdomains) (2.7)
    sender_domain = false  # MAIL FROM's domain must have MX, A or AAAA (2.9)
    reverse_dns = "log"    # "log" | "require" (2.2)
    dnsbl = []             # RFC 5782 zones queried for the client address
    spf = "off"            # "off" | "check" | "reject"
    dkim_verify = false
    dmarc = "off"          # "off" | "check" | "reject"
    greylist = 0           # seconds a first-seen triplet is deferred; 0 = off

    [limits]
    messages_per_ip_per_minute = 0   # 0 = off
    messages_per_user_per_hour = 0   # 0 = off

``[replies]`` gains one key per check (:data:`REPLY_DEFAULTS`); ``greylisted`` and
``rate_limited`` must stay 4xx.  This module imports nothing from Twisted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailguard.config.reader import Reader, network
from mailguard.core import replies
from mailguard.core.address import AddressError, normalize_domain

DEFAULTS: dict[str, Any] = {
    "reject_clients": [],
    "reject_senders": [],
    "sender_domain": False,
    "reverse_dns": "log",
    "dnsbl": [],
    "spf": "off",
    "dkim_verify": False,
    "dmarc": "off",
    "greylist": 0,
}
REPLY_DEFAULTS: dict[str, str] = {
    "client_rejected": "554 5.7.1 Access denied",
    "sender_rejected": "550 5.7.1 Sender address rejected",
    "sender_domain_unknown": "550 5.1.8 Sender address rejected: domain not found",
    "no_reverse_dns": "450 4.7.25 Client host has no verified reverse DNS name",
    "dnsbl_listed": "554 5.7.1 Client host blocked by a DNS block list",
    "spf_fail": "550 5.7.23 SPF validation failed",
    "dmarc_reject": "550 5.7.1 Rejected by the sender domain's DMARC policy",
    "greylisted": "451 4.7.1 Greylisted, please try again later",
    "rate_limited": "451 4.7.0 Too much mail, slow down",
}
TRANSIENT_REPLIES = ("greylisted", "rate_limited")
LIMIT_DEFAULTS: dict[str, Any] = {"messages_per_ip_per_minute": 0, "messages_per_user_per_hour": 0}
REVERSE_DNS = ("log", "require")
MODES = ("off", "check", "reject")


@dataclass(frozen=True)
class CheckReplies:
    """The reply of each check (``[replies]``), parsed."""

    client_rejected: replies.Reply
    sender_rejected: replies.Reply
    sender_domain_unknown: replies.Reply
    no_reverse_dns: replies.Reply
    dnsbl_listed: replies.Reply
    spf_fail: replies.Reply
    dmarc_reject: replies.Reply
    greylisted: replies.Reply
    rate_limited: replies.Reply


@dataclass(frozen=True)
class ChecksConfig:
    """``[checks]`` plus the rate limits and the replies, validated."""

    reject_clients: tuple[Any, ...]          # ip_network values
    reject_senders: tuple[str, ...]          # lower-case "user@domain" | "@domain" | "@.domain"
    sender_domain: bool
    reverse_dns: str
    dnsbl: tuple[str, ...]                   # zone names, lower-case, no trailing dot
    spf: str
    dkim_verify: bool
    dmarc: str
    greylist: int
    messages_per_ip_per_minute: int
    messages_per_user_per_hour: int
    replies: CheckReplies


def sender_pattern(text: str) -> str:
    """Validate and normalise one ``reject_senders`` entry.

    :raises ValueError: not ``user@domain``, ``@domain`` or ``@.domain``.
    """
    entry = text.strip().lower()
    local, at, domain = entry.rpartition("@")
    if not at or not domain:
        raise ValueError("must be 'user@domain', '@domain' or '@.domain'")
    sub = domain.startswith(".") and not local
    try:
        domain = normalize_domain(domain[1:] if sub else domain)
    except AddressError as e:
        raise ValueError(f"not a domain: {e}") from None
    if local and any(c.isspace() or c in '<>"' for c in local):
        raise ValueError("not a mailbox local part")
    return f"{local}@{'.' if sub else ''}{domain}"


def zone(text: str) -> str:
    """Validate and normalise one DNSBL zone name."""
    try:
        return normalize_domain(text.strip())
    except AddressError as e:
        raise ValueError(f"not a DNS zone: {e}") from None


def parse(checks: Reader, limits: Reader, reply_reader: Reader) -> ChecksConfig:
    """Read ``[checks]``, the rate keys of ``[limits]`` and the check replies of ``[replies]``.

    Each argument is the section reader of the main configuration parser.
    """
    parsed: dict[str, replies.Reply] = {}
    for key in REPLY_DEFAULTS:
        try:
            parsed[key] = replies.parse(reply_reader.string(key))
        except replies.ReplyError as e:
            raise reply_reader.fail(key, str(e)) from None
        if parsed[key].code < 400:
            raise reply_reader.fail(key, f"a refusal must be 4xx or 5xx, not {parsed[key].code}")
        if key in TRANSIENT_REPLIES and not parsed[key].transient:
            raise reply_reader.fail(key, f"must stay 4xx (temporary), not {parsed[key].code}")
    reverse = checks.string("reverse_dns")
    if reverse not in REVERSE_DNS:
        raise checks.fail("reverse_dns", f"must be one of {', '.join(REVERSE_DNS)}, not {reverse!r}")
    modes = {}
    for key in ("spf", "dmarc"):
        modes[key] = checks.string(key)
        if modes[key] not in MODES:
            raise checks.fail(key, f"must be one of {', '.join(MODES)}, not {modes[key]!r}")
    return ChecksConfig(
        reject_clients=checks.each("reject_clients", network),
        reject_senders=tuple(dict.fromkeys(checks.each("reject_senders", sender_pattern))),
        sender_domain=checks.boolean("sender_domain"),
        reverse_dns=reverse,
        dnsbl=tuple(dict.fromkeys(checks.each("dnsbl", zone))),
        spf=modes["spf"],
        dkim_verify=checks.boolean("dkim_verify"),
        dmarc=modes["dmarc"],
        greylist=checks.integer("greylist", 0),
        messages_per_ip_per_minute=limits.integer("messages_per_ip_per_minute", 0),
        messages_per_user_per_hour=limits.integer("messages_per_user_per_hour", 0),
        replies=CheckReplies(**parsed),
    )


#: Every check off, the SPEC's replies: what a configuration without these keys means.
OFF = ChecksConfig((), (), False, "log", (), "off", False, "off", 0, 0, 0,
                   CheckReplies(**{k: replies.parse(v) for k, v in REPLY_DEFAULTS.items()}))
