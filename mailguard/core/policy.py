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
     A list (or an alias of one) also has a sender policy (:func:`list_gate`):
     ``authenticated`` takes mail only from a client that did SMTP AUTH or may relay,
     ``members`` only from an envelope sender that is a member; others get
     ``550 5.7.1 <list@domain>: only ... may post to this list`` (rule ``list_senders``).
   - ``relay``: accepted from any client, except a host on the never list
     (rule ``relay_domain``).

3. Any other domain (or an address literal) is remote.  In order: the client is on
   the ``never`` list (rule ``never``); it did SMTP AUTH (``authenticated``); its
   address is in ``allow`` (``allow``); it connected to one of
   ``internal_addresses`` (``internal_address``); it logged in over POP3 recently
   (``pop_before_smtp``); otherwise ``relay_denied``.

Replies come from ``[replies]``; with ``soft_bounce`` every 5xx policy reply is
sent as its 4xx twin.  A directory that cannot answer gives ``directory_failure``
(always 4xx): the adapter that asked the directory says so with
:func:`directory_failure`.

Facts, not calls
================
The policy never asks the directory.  :func:`decide` and :func:`resolve_targets`
take ``facts``, a mapping from a lower-case address to its :class:`Expansion` (None:
not in the directory).  When they need an address that is not in ``facts`` they
return :class:`Missing` naming it; the caller fetches it (the adapters through a
Directory, asynchronously; a blocking caller with :func:`settle`) and calls again.  The
answer for the same facts is always the same.

This module imports only the standard library (and the pure config values).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, TypeVar

from mailguard.core import replies
from mailguard.core.srs import SRS, SRSError, is_srs
from mailguard.core.address import Address, AddressError, parse_path
from mailguard.core.entries import Expansion

if TYPE_CHECKING:                      # core imports only the standard library at run time
    from mailguard.config import Config, IPAddress

Facts = Mapping[str, "Expansion | None"]
T = TypeVar("T")


@dataclass(frozen=True)
class Missing:
    """The policy needs the directory's answer for ``key`` (a lower-case address) first."""

    key: str


class _Need(Exception):
    """Raised inside the rules when a fact is missing; the public functions return it."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _look(facts: Facts, key: str) -> Expansion | None:
    if key not in facts:
        raise _Need(key)
    return facts[key]


def settle(step: Callable[[Facts], "T | Missing"], lookup: Callable[[str], "Expansion | None"]) -> T:
    """Run ``step`` until it stops asking, answering each :class:`Missing` with ``lookup``.

    For callers that may block (tests, scripts over the blocking SQLite store); the
    servers and the CLI fetch facts through a Directory with
    :func:`mailguard.directory.facts.gather`.  Whatever ``lookup`` raises (a directory
    error) propagates.
    """
    facts: dict[str, Expansion | None] = {}
    while True:
        result = step(facts)
        if not isinstance(result, Missing):
            return result
        facts[result.key] = lookup(result.key)


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
    list_senders: str = ""                # a list recipient: its sender policy and why this sender passed or not

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


def _recipient(cfg: Config, text: str) -> Address | Decision:
    """The recipient address of ``text`` (bare postmaster made local), or the refusal."""
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
    if not addr.domain:                       # bare "postmaster"
        inbound = cfg.inbound_domains()
        if not inbound:
            return _refuse(cfg, cfg.replies.unknown_recipient, "unknown_recipient", str(addr))
        addr = addr.with_domain(inbound[0])
    return addr


def decide(cfg: Config, facts: Facts, who: Client, text: str, *, srs: SRS | None = None,
           now: float = 0.0, sender: str = "") -> Decision | Missing:
    """Judge the forward-path ``text`` (as given after ``RCPT TO:``) for this client.

    ``sender`` is the envelope sender of the transaction (``""``: the null sender), for
    the sender policy of lists.

    With ``srs`` (the server's SRS secret) an SRS0/SRS1 address in an inbound domain
    is a bounce to forwarded mail: it verifies (at time ``now``) and goes back to the
    original sender (rule ``srs``), or is refused as unknown (``srs_invalid``).

    Returns :class:`Missing` while ``facts`` lacks an expansion the rules need.
    """
    addr = _recipient(cfg, text)
    if isinstance(addr, Decision):
        return addr
    try:
        if srs is not None and is_srs(addr.local):
            route = cfg.route_for(addr.domain)
            if route is not None and route.route == "inbound":
                return _srs_bounce(cfg, facts, srs, addr, now)
        return _route(cfg, facts, who, addr, sender)
    except _Need as need:
        return Missing(need.key)


def _srs_bounce(cfg: Config, facts: Facts, srs: SRS, addr: Address, now: float) -> Decision:
    """A reply to mail forwarded with an SRS sender: back to the original sender, for anyone.

    A forged or expired SRS address is unknown (the ``unknown_recipient`` reply).  The
    bounce goes back whatever the original sender's sender policy (it is a list only
    when a list sent the forwarded mail).
    """
    try:
        original = parse_path(srs.reverse(addr.local, now))
    except (SRSError, AddressError):
        return _refuse(cfg, cfg.replies.unknown_recipient, "srs_invalid", addr.key)
    assert original is not None
    final, _ = final_domain(cfg, original)
    route = None if final.is_literal else cfg.route_for(final.domain)
    if route is not None and route.route == "inbound":
        return _inbound(cfg, facts, final, None, "")
    return Decision(replies.RECIPIENT_OK, "srs", addr.key, remote=(str(final),))


def directory_failure(cfg: Config, text: str) -> Decision:
    """The decision for ``text`` when the directory could not answer: always 4xx."""
    addr = _recipient(cfg, text)
    key = addr.recipient if isinstance(addr, Decision) else addr.key
    return Decision(cfg.replies.directory_failure, "directory_failure", key)


def final_domain(cfg: Config, addr: Address) -> tuple[Address, int]:
    """Follow every reroute of ``addr``'s domain: the final address and the number of hops.

    The configuration refuses reroute loops, so the chain ends; it is followed to its
    end however long (a chain cut short would route mail as if for a remote domain).
    """
    hops = 0
    while not addr.is_literal:
        route = cfg.route_for(addr.domain)
        if route is None or route.route != "reroute":
            break
        hops += 1
        if hops > len(cfg.domains):
            raise ValueError(f"reroute loop at {addr.domain} (the configuration should refuse it)")
        addr = addr.with_domain(route.to)
    return addr, hops


def _route(cfg: Config, facts: Facts, who: Client, addr: Address, sender: str) -> Decision:
    addr, hops = final_domain(cfg, addr)
    d = _route_final(cfg, facts, who, addr, sender, rerouted=hops > 0)
    if hops and d.accepted:
        return Decision(d.reply, "reroute", d.recipient, d.mailboxes, d.remote, d.list_senders)
    return d


def _route_final(cfg: Config, facts: Facts, who: Client, addr: Address, sender: str, rerouted: bool) -> Decision:
    route = None if addr.is_literal else cfg.route_for(addr.domain)
    if route is not None and route.route == "inbound":
        return _inbound(cfg, facts, addr, who, sender)
    if route is not None and route.route == "relay":
        if any(who.ip in net for net in cfg.relay.never):
            return _refuse(cfg, cfg.replies.never_host, "never", addr.key)
        return Decision(replies.RECIPIENT_OK, "relay_domain", str(addr), remote=(str(addr),))
    if rerouted:                              # a reroute to a remote domain: carried for anyone
        return Decision(replies.RECIPIENT_OK, "reroute", str(addr), remote=(str(addr),))
    allowed, rule = relay_permission(cfg, who)
    if allowed:
        return Decision(replies.RECIPIENT_OK, rule, str(addr), remote=(str(addr),))
    reply = cfg.replies.never_host if rule == "never" else cfg.replies.relay_denied
    return _refuse(cfg, reply, rule, addr.key)


def _inbound(cfg: Config, facts: Facts, addr: Address, who: Client | None, sender: str) -> Decision:
    """A recipient in an inbound domain; ``who`` None: no sender policy applies (an SRS bounce)."""
    key = addr.key
    found = _look(facts, key)
    gate = ""
    if found is None:
        if addr.local.lower() != "postmaster":
            return _refuse(cfg, cfg.replies.unknown_recipient, "unknown_recipient", key)
        mailbox = (cfg.server.postmaster or key).lower()
        found = _look(facts, mailbox) or Expansion(mailboxes=(mailbox,))
    elif found.senders is not None and who is not None and addr.local.lower() != "postmaster":
        allowed, why = list_gate(cfg, facts, found, who, sender)
        gate = f"{found.senders}; {why}" if why else found.senders
        if not allowed:
            d = _refuse(cfg, list_refusal(key, found.senders), "list_senders", key)
            return Decision(d.reply, d.rule, d.recipient, list_senders=gate)
    mailboxes, remote = _targets(cfg, facts, found)
    if not mailboxes and not remote:
        # An alias loop, a dangling alias, a list of stale members: a 250 here would
        # accept mail that is then stored nowhere.
        return _refuse(cfg, cfg.replies.unknown_recipient, "unknown_recipient", key)
    return Decision(replies.RECIPIENT_OK, "inbound", key, mailboxes, remote, gate)


def list_refusal(key: str, senders: str) -> replies.Reply:
    """The reply to a sender a list's policy ``senders`` refuses."""
    who = "members" if senders == "members" else "authenticated senders"
    return replies.Reply(550, "5.7.1", f"<{key}>: only {who} may post to this list")


def list_gate(cfg: Config, facts: Facts, found: Expansion, who: Client, sender: str) -> tuple[bool, str]:
    """May ``sender`` (the envelope sender) from ``who`` send to the list ``found``?

    Returns (allowed, why) for ``mailguard explain``.  ``authenticated``: the client did
    SMTP AUTH, or may relay (``allow``, ``internal_addresses``, POP-before-SMTP: the
    office's own hosts).  ``members``: the envelope sender is one of ``found.members``,
    or an alias in an inbound domain of exactly one member mailbox.  Only the envelope
    sender is judged, never the ``From:`` header; both are easy to forge, so
    ``members`` keeps out mistakes and spam to guessed addresses, not a determined
    forger (``authenticated`` does).  Raises :class:`_Need` for the sender's alias.
    """
    if found.senders == "authenticated":
        if who.authenticated:
            return True, f"authenticated as {who.authenticated}"
        allowed, rule = relay_permission(cfg, who)
        return (True, f"trusted client ({rule})") if allowed else (False, "not authenticated")
    if found.senders == "members":
        shown = f"<{sender}>"
        if _is_member(cfg, facts, found, sender):
            return True, f"{shown} is a member"
        return False, f"{shown} is not a member"
    return True, ""


def _is_member(cfg: Config, facts: Facts, found: Expansion, sender: str) -> bool:
    try:
        addr = parse_path(sender, null_ok=True)
    except AddressError:
        return False
    if addr is None:
        return False                                   # the null sender is nobody's address
    if addr.key in found.members:
        return True
    route = None if addr.is_literal else cfg.route_for(addr.domain)
    if route is None or route.route != "inbound":
        return False
    own = _look(facts, addr.key)
    return (own is not None and own.senders is None and len(own.mailboxes) == 1 and not own.others
            and own.mailboxes[0] in found.members)


Targets = tuple[tuple[str, ...], tuple[str, ...]]


def resolve_targets(cfg: Config, facts: Facts, found: Expansion) -> Targets | Missing:
    """Route the addresses an expansion left outside the directory: (mailboxes, remote).

    Remote ones (and those in relay domains) go to the queue; those in an inbound
    domain are expanded once more, or dropped when unknown (a stale list member);
    reroutes are followed.  Returns :class:`Missing` while ``facts`` lacks an expansion.
    """
    try:
        return _targets(cfg, facts, found)
    except _Need as need:
        return Missing(need.key)


def _targets(cfg: Config, facts: Facts, found: Expansion) -> Targets:
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
            parsed = parse_path(text)
        except AddressError:
            continue
        assert parsed is not None
        addr, _ = final_domain(cfg, parsed)
        route = None if addr.is_literal else cfg.route_for(addr.domain)
        if route is not None and route.route == "inbound":
            sub = _look(facts, addr.key)
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

    A list recipient's sender policy follows, with what decided it for this sender:
    `` [list senders: members; <a@b> is a member]``.  With ``verbose``, an accepted
    recipient's destinations follow: `` -> mailbox a@b, queue c@d``.
    """
    gate = f" [list senders: {decision.list_senders}]" if decision.list_senders else ""
    where = ""
    if verbose and decision.accepted:
        parts = [f"mailbox {m}" for m in decision.mailboxes] + [f"queue {r}" for r in decision.remote]
        where = f" -> {', '.join(parts)}" if parts else ""
    return f"{text}: {decision.reply} (rule: {decision.rule}){gate}{where}"
