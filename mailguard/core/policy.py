"""The recipient policy: ordered, first-match rules that decide every RCPT.

A recipient is judged at RCPT time, never accepted and bounced later
(RFC 2505 section 2.6.1).  The rules, read top to bottom:

1. The address form is a relay trick (``%``, ``!``, quoted ``@``, several ``@``,
   ``IMCEA…``): refused (rule ``relay_trick``).
2. The domain's route in ``[domains]``:

   - ``reroute``: the domain is rewritten to ``to`` and the result is routed again;
     the decision names ``reroute`` (the administrator chose to carry it, so any
     client may use it).
   - ``inbound``: the recipient must exist in the directory (``postmaster@`` always
     does, RFC 5321 section 4.5.1): rule ``inbound``, or ``unknown_recipient``.
   - ``relay``: accepted from any client, except a host on the never list
     (rule ``relay_domain``).

3. Any other domain (or an address literal) is remote.  In order: the client is on
   the ``never`` list (rule ``never``); it did SMTP AUTH (``authenticated``); its
   address is in ``allow`` (``allow``); it connected to one of
   ``internal_addresses`` (``internal_address``); it logged in over POP3 recently
   (``pop_before_smtp``); otherwise ``relay_denied``.

Replies come from ``[replies]``; with ``soft_bounce`` every 5xx policy reply is
sent as its 4xx twin.  A directory that cannot answer gives ``directory_failure``
(always 4xx).

This module imports nothing from Twisted.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable

from mailguard.core import replies
from mailguard.core.address import Address, AddressError, parse_path
from mailguard.config import Config, IPAddress
from mailguard.core.entries import Expansion
from mailguard.directory.base import DirectoryError

Expand = Callable[[str], "Expansion | None"]
MAX_REROUTES = 8


@dataclass(frozen=True)
class Client:
    """What the policy knows about the connection."""

    ip: IPAddress
    local_ip: IPAddress | None = None
    authenticated: str | None = None      # the mailbox that did SMTP AUTH
    pop_before_smtp: bool = False         # a recent POP3 login from ip


@dataclass(frozen=True)
class Decision:
    """The answer for one recipient, and where an accepted one goes."""

    reply: replies.Reply
    rule: str
    recipient: str                        # the address as finally routed (after reroutes)
    mailboxes: tuple[str, ...] = ()       # local mailboxes to store into
    remote: tuple[str, ...] = ()          # addresses for the outbound queue

    @property
    def accepted(self) -> bool:
        return self.reply.code < 400


def client(ip: str, local_ip: str | None = None, authenticated: str | None = None,
           pop_before_smtp: bool = False) -> Client:
    """Build a :class:`Client` from address strings (IPv4-mapped IPv6 is unwrapped)."""
    return Client(parse_ip(ip), parse_ip(local_ip) if local_ip else None, authenticated, pop_before_smtp)


def parse_ip(text: str) -> IPAddress:
    """An IP address from a socket's text form (IPv4-mapped IPv6 and zone ids unwrapped)."""
    addr = ipaddress.ip_address(text.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _refuse(cfg: Config, reply: replies.Reply, rule: str, recipient: str) -> Decision:
    if cfg.replies.soft_bounce:
        reply = reply.soften()
    return Decision(reply, rule, recipient)


def relay_permission(cfg: Config, who: Client) -> tuple[bool, str]:
    """May this client relay to a remote domain?  Returns (allowed, rule)."""
    rl = cfg.relay
    if any(who.ip in net for net in rl.never):
        return False, "never"
    if rl.authenticated and who.authenticated:
        return True, "authenticated"
    if any(who.ip in net for net in rl.allow):
        return True, "allow"
    if who.local_ip is not None and who.local_ip in rl.internal_addresses:
        return True, "internal_address"
    if rl.pop_before_smtp and who.pop_before_smtp:
        return True, "pop_before_smtp"
    return False, "relay_denied"


def decide(cfg: Config, expand: Expand, who: Client, text: str) -> Decision:
    """Judge the forward-path ``text`` (as given after ``RCPT TO:``) for this client."""
    try:
        addr = parse_path(text, bare_ok=frozenset({"postmaster"}))
    except AddressError as e:
        shown = text.strip()
        if shown.startswith("<") and shown.endswith(">"):
            shown = shown[1:-1]
        if e.trick:
            return _refuse(cfg, replies.RELAY_TRICK, "relay_trick", shown)
        return Decision(replies.BAD_RCPT_SYNTAX, "syntax", shown)
    assert addr is not None
    return decide_address(cfg, expand, who, addr)


def decide_address(cfg: Config, expand: Expand, who: Client, addr: Address) -> Decision:
    """Judge a parsed recipient address for this client."""
    if not addr.domain:                       # bare "postmaster"
        inbound = cfg.inbound_domains()
        if not inbound:
            return _refuse(cfg, cfg.replies.unknown_recipient, "unknown_recipient", str(addr))
        addr = addr.with_domain(inbound[0])
    try:
        return _route(cfg, expand, who, addr, 0)
    except DirectoryError:
        return Decision(cfg.replies.directory_failure, "directory_failure", addr.key)


def _route(cfg: Config, expand: Expand, who: Client, addr: Address, hops: int) -> Decision:
    route = None if addr.is_literal else cfg.route_for(addr.domain)
    if route is not None and route.route == "reroute" and hops < MAX_REROUTES:
        d = _route(cfg, expand, who, addr.with_domain(route.to), hops + 1)
        return Decision(d.reply, "reroute" if d.accepted else d.rule, d.recipient, d.mailboxes, d.remote)
    if route is not None and route.route == "inbound":
        return _inbound(cfg, expand, addr)
    if route is not None and route.route == "relay":
        if any(who.ip in net for net in cfg.relay.never):
            return _refuse(cfg, cfg.replies.never_host, "never", addr.key)
        return Decision(replies.RECIPIENT_OK, "relay_domain", str(addr), remote=(str(addr),))
    if hops:                                  # a reroute to a remote domain: carried for anyone
        return Decision(replies.RECIPIENT_OK, "reroute", str(addr), remote=(str(addr),))
    allowed, rule = relay_permission(cfg, who)
    if allowed:
        return Decision(replies.RECIPIENT_OK, rule, str(addr), remote=(str(addr),))
    reply = cfg.replies.never_host if rule == "never" else cfg.replies.relay_denied
    return _refuse(cfg, reply, rule, addr.key)


def _inbound(cfg: Config, expand: Expand, addr: Address) -> Decision:
    key = addr.key
    found = expand(key)
    if found is None:
        if addr.local.lower() != "postmaster":
            return _refuse(cfg, cfg.replies.unknown_recipient, "unknown_recipient", key)
        mailbox = cfg.server.postmaster or key
        found = expand(mailbox) or Expansion(mailboxes=(mailbox,))
    mailboxes, remote = resolve_targets(cfg, expand, found)
    if not mailboxes and not remote:
        # An alias loop, a dangling alias, a list of stale members: a 250 here would
        # accept mail that is then stored nowhere.
        return _refuse(cfg, cfg.replies.unknown_recipient, "unknown_recipient", key)
    return Decision(replies.RECIPIENT_OK, "inbound", key, mailboxes, remote)


def resolve_targets(cfg: Config, expand: Expand, found: Expansion) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Route the addresses an expansion left outside the directory.

    Remote ones (and those in relay domains) go to the queue; those in an inbound
    domain are expanded once more, or dropped when unknown (a stale list member);
    reroutes are followed.
    """
    mailboxes = dict.fromkeys(found.mailboxes)
    remote: dict[str, None] = {}
    pending = list(found.others)
    seen: set[str] = set()
    while pending:
        text = pending.pop(0)
        if text in seen:
            continue
        seen.add(text)
        try:
            addr = parse_path(text)
        except AddressError:
            continue
        assert addr is not None
        for _ in range(MAX_REROUTES):
            route = None if addr.is_literal else cfg.route_for(addr.domain)
            if route is None or route.route != "reroute":
                break
            addr = addr.with_domain(route.to)
        if route is not None and route.route == "inbound":
            sub = expand(addr.key)
            if sub is not None:
                mailboxes.update(dict.fromkeys(sub.mailboxes))
                pending.extend(sub.others)
            elif addr.local.lower() == "postmaster":
                mailboxes[cfg.server.postmaster or addr.key] = None
        else:
            remote[str(addr)] = None
    return tuple(mailboxes), tuple(remote)


def explain_line(decision: Decision, text: str, verbose: bool = False) -> str:
    """The ``mailguard explain`` line: ``<rcpt>: <reply> (rule: <rule>)``.

    With ``verbose``, an accepted recipient's destinations follow:
    `` -> mailbox a@b, queue c@d``.
    """
    where = ""
    if verbose and decision.accepted:
        parts = [f"mailbox {m}" for m in decision.mailboxes] + [f"queue {r}" for r in decision.remote]
        where = f" -> {', '.join(parts)}" if parts else ""
    return f"{text}: {decision.reply} (rule: {decision.rule}){where}"
