"""Content filtering of one SMTP transaction, between the final dot and the disk.

The SMTP server hands :func:`filter_transaction` the transaction (sender, the accepted
recipients' decisions, its own ``Received:`` header and the message) once the final
dot has arrived and before anything is stored.  The milters of ``[filters]`` run in
order (:class:`~mailguard.milter.chain.MilterChain`), by default only for clients
that may not relay (``for_trusted = true`` includes them).  The answer,
a :class:`Filtered`, says what to store — the message exactly as the milters left
it, for the sender and recipients they left — or what to reply instead.

Recipients a milter adds are routed like local mail (the directory expands those in
inbound domains, others are queued); recipients it removes are dropped.

A milter's exchange replays the whole transaction at the final dot (connect, HELO,
MAIL, RCPT, DATA ...), so a refusal a milter gives at an earlier step reaches the
client as the reply to the final dot; a recipient a milter refuses is dropped while
the others are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer

from mailguard.app import maillog
from mailguard.config import Config
from mailguard.core import policy, replies
from mailguard.core.entries import Expansion
from mailguard.directory.base import Directory
from mailguard.directory.facts import gather
from mailguard.milter.chain import MilterChain
from mailguard.milter.client import Facts


@dataclass
class Filtered:
    """What to do with the message after the filters.

    ``action``: ``store`` (``message``, which already holds the ``Received:`` header,
    for ``sender`` and ``decisions``; held when ``held`` is not empty), ``refuse``
    (answer ``reply``, store nothing) or ``discard`` (answer as if queued, store nothing).
    """

    action: str
    sender: str
    decisions: list[policy.Decision] = field(default_factory=list)
    message: bytes = b""
    held: str = ""
    reply: replies.Reply | None = None


def applies(cfg: Config, who: policy.Client) -> bool:
    """True when this client's mail goes through the milters."""
    if not cfg.filters.milters:
        return False
    return cfg.filters.for_trusted or not policy.relay_permission(cfg, who)[0]


def tls_version(transport: Any) -> str:
    """The TLS protocol version of an encrypted transport (``TLSv1.3``), or "".

    An implicit-TLS listener's transport is Twisted's TLS protocol itself; after
    STARTTLS it is the TCP connection, whose ``protocol`` is the TLS layer.
    """
    for layer in (transport, getattr(transport, "protocol", None)):
        conn = getattr(layer, "_tlsConnection", None)
        if conn is not None:
            try:
                return str(conn.get_protocol_version_name())
            except Exception:
                return ""
    return ""


async def filter_transaction(cfg: Config, chain: MilterChain, directory: Directory, facts: Facts,
                             decisions: list[policy.Decision], received: bytes, message: bytes) -> Filtered:
    """Run the milters over one transaction; see the module docstring.

    ``facts.recipients`` must be the decisions' recipients, in order.
    """
    out = await chain.check(facts, received + message)
    if out.action == "discard":
        return Filtered("discard", facts.sender)
    if out.action in ("reject", "tempfail"):
        reply = out.reply or replies.MILTER_TEMPFAIL
        if cfg.replies.soft_bounce:
            reply = reply.soften()
        return Filtered("refuse", facts.sender, reply=reply)
    kept_names = {r.lower() for r in out.recipients}
    kept = [d for d in decisions if d.recipient.lower() in kept_names]
    known = {d.recipient.lower() for d in decisions}
    for address in out.recipients:
        if address.lower() not in known:
            added = await _route(cfg, directory, address)
            if added is not None:
                kept.append(added)
    if not kept:
        maillog.event("milter", "no-recipients", facts.client_addr, id=facts.queue_id,
                      **{"from": f"<{facts.sender}>"})
        return Filtered("discard", facts.sender)
    return Filtered("store", out.sender, kept, out.message, out.quarantine)


async def _route(cfg: Config, directory: Directory, address: str) -> policy.Decision | None:
    """A recipient a milter added, routed like local mail; None when it leads nowhere."""
    found = Expansion(others=(address.lower(),))
    mailboxes, remote = await gather(lambda facts: policy.resolve_targets(cfg, facts, found), directory)
    if not mailboxes and not remote:
        return None
    return policy.Decision(replies.RECIPIENT_OK, "milter", address, mailboxes, remote)
