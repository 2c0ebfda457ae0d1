"""What the directory answers, as plain values the policy decides on."""

from __future__ import annotations

from dataclasses import dataclass

#: Who may send to a list (``mailguard list senders LIST POLICY``): anybody; only clients
#: that did SMTP AUTH or may relay; only envelope senders that are members of the list.
SENDER_POLICIES = ("anyone", "authenticated", "members")


@dataclass(frozen=True)
class Expansion:
    """What a directory address delivers to.

    ``mailboxes``: local mailbox addresses, each once.  ``others``: addresses not in
    the directory (remote list members, contact targets, alias targets), each once;
    the router decides whether they are remote or in a local domain.

    ``senders``: when the address is a list (or an alias of one), who may send to it,
    one of :data:`SENDER_POLICIES`; None for any other entry.  ``members``: with
    ``senders == "members"``, every address that is a member (the list's own members
    and every address reached through them: aliases, nested lists, contacts and their
    targets, mailboxes), lower-case; empty otherwise.
    """

    mailboxes: tuple[str, ...] = ()
    others: tuple[str, ...] = ()
    senders: str | None = None
    members: frozenset[str] = frozenset()
