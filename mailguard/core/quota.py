"""Mailbox quotas: the decision at RCPT and the 90 % warning after a delivery.

A mailbox's quota is its own (``mailguard user quota ADDRESS BYTES``) or else
``[limits] mailbox_quota``; 0 means none.  Its usage is the octets of the files in its
maildir's ``new/`` and ``cur/``.  At RCPT, for each local mailbox a recipient expands to:

- usage at or over the quota: ``452 4.2.2`` (:data:`~mailguard.core.replies.MAILBOX_FULL`);
  it may be emptied (POP3) before the client retries;
- else, with ``SIZE=`` declared at MAIL FROM, usage plus that size over the quota:
  ``552 5.2.2`` (:data:`~mailguard.core.replies.OVER_QUOTA`), since this message never fits
  (RFC 1870 section 6.1 names 552 for it).

A recipient that expands to several targets (a list, an alias of many) loses only
the mailboxes that are over quota: the others, and the remote targets, still get the
message.  Only when every target is refused is the RCPT refused, with the reply of
the first.  With ``soft_bounce`` the 552 goes out as 452.

This module imports only the standard library (and other pure core modules).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from mailguard.core import replies
from mailguard.core.policy import Decision

#: The share of its quota past which a delivery logs a warning for a mailbox.
WARN_SHARE = 0.9


@dataclass(frozen=True)
class Usage:
    """A mailbox's quota (0: none) and the octets it held when measured."""

    quota: int
    used: int


@dataclass(frozen=True)
class Judged:
    """The recipient's decision after the quota, and the mailboxes it dropped with each reply."""

    decision: Decision
    dropped: tuple[tuple[str, replies.Reply], ...] = ()


def effective(override: int | None, default: int) -> int:
    """The quota in force: the mailbox's own when it has one, else the configured default."""
    return default if override is None else override


def refusal(usage: Usage, declared: int) -> replies.Reply | None:
    """The reply that refuses one mailbox, or None when the message may go in."""
    if usage.quota <= 0:
        return None
    if usage.used >= usage.quota:
        return replies.MAILBOX_FULL
    if declared > 0 and usage.used + declared > usage.quota:
        return replies.OVER_QUOTA
    return None


def judge(decision: Decision, usage: Mapping[str, Usage], declared: int, soft_bounce: bool = False) -> Judged:
    """Apply the quotas to an accepted decision (see the module docstring).

    ``usage`` maps a mailbox to its :class:`Usage`; a mailbox not in it has no quota.
    """
    if not decision.accepted:
        return Judged(decision)
    kept: list[str] = []
    dropped: list[tuple[str, replies.Reply]] = []
    for mailbox in decision.mailboxes:
        u = usage.get(mailbox)
        reply = refusal(u, declared) if u is not None else None
        if reply is None:
            kept.append(mailbox)
        else:
            dropped.append((mailbox, reply.soften() if soft_bounce else reply))
    if not dropped:
        return Judged(decision)
    if kept or decision.remote:
        return Judged(replace(decision, mailboxes=tuple(kept)), tuple(dropped))
    return Judged(Decision(dropped[0][1], "mailbox_quota", decision.recipient), tuple(dropped))


def crossed(usage: Usage, added: int) -> bool:
    """True when ``added`` octets take the mailbox from under :data:`WARN_SHARE` of its quota to at or past it."""
    if usage.quota <= 0:
        return False
    mark = usage.quota * WARN_SHARE
    return usage.used < mark <= usage.used + added
