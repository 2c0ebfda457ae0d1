"""What the directory answers, as plain values the policy decides on."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Expansion:
    """What a directory address delivers to.

    ``mailboxes``: local mailbox addresses, each once.  ``others``: addresses not in
    the directory (remote list members, contact targets, alias targets), each once;
    the router decides whether they are remote or in a local domain.
    """

    mailboxes: tuple[str, ...] = ()
    others: tuple[str, ...] = ()
