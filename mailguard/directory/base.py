"""The directory (the GAL) as the protocols see it: one interface, any backend.

Every lookup returns a Deferred, so a backend may answer from a thread (SQLite) or
over the network (LDAP) without ever blocking the reactor.  A backend that cannot
answer now fails the Deferred with :class:`DirectoryError`; callers turn that into
a 4xx reply (``directory_failure``), never a 5xx and never a pass.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.defer import Deferred

from mailguard.core.entries import Expansion

__all__ = ["Directory", "DirectoryError", "EntryError", "Expansion"]


class DirectoryError(Exception):
    """The directory cannot answer now (locked, missing, unreachable): a temporary failure."""


class EntryError(ValueError):
    """An administrative change that cannot be made (exists already, no such entry)."""


class Directory(Protocol):
    """What the SMTP and POP3 adapters ask of a directory backend."""

    def expand(self, address: str) -> Deferred[Expansion | None]:
        """Expand an address through aliases, lists and contacts; None when unknown."""

    def verify_password(self, login: str, password: str) -> Deferred[str | None]:
        """The mailbox address when ``password`` is right for ``login``, else None."""

    def addresses_of(self, mailbox: str) -> Deferred[frozenset[str]]:
        """The mailbox's own address and every alias that leads only to it."""

    def quotas(self, mailboxes: tuple[str, ...]) -> Deferred[dict[str, int]]:
        """Those of ``mailboxes`` that have their own quota (octets, 0: none), with it.

        A mailbox left out gets the configured ``[limits] mailbox_quota``.
        """

    def close(self) -> None:
        """Release connections (before twistd forks, and at shutdown)."""
