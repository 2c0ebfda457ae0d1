"""Aliases, lists and contacts that point at nothing: the admin command line's warnings.

An entry points at nothing when an address it names (an alias's target, a list
member, a contact's remote address), its domain's reroutes followed, is in an
inbound domain and is no entry of the directory (``postmaster@`` aside, which every
inbound domain has).  The server loses such mail quietly: an alias, or a list of
nothing else, is refused at RCPT as an unknown recipient; a stale list member is
dropped.  Addresses in relay and remote domains are never judged: only their own
server knows them.

- ``alias add``, ``list add``, ``contact add``: a warning on stderr for a target that
  points at nothing; the entry is saved all the same (the target may be made next).
- ``user del``, ``alias del``, ``list del``, ``contact del``: a warning for each entry
  that pointed at the address removed.
- ``check-config`` warns about every such entry, ``status`` lists them.

The lines read::

    alias sales@office.example -> bob@office.example points at nothing: no mailbox, alias, list or contact bob@office.example
    list staff@office.example: member bob@office.example points at nothing: no mailbox, ...
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from mailguard import config
from mailguard.core import policy
from mailguard.core.address import AddressError, parse_path
from mailguard.directory.sqlite import SQLiteStore


@dataclass(frozen=True)
class Dangling:
    """``entry`` (a ``kind``: alias, list, contact) names ``target``, which leads to ``missing``,
    an address in an inbound domain that is no entry."""

    entry: str
    kind: str
    target: str
    missing: str

    def line(self) -> str:
        """The one-line description (see the module's docstring)."""
        head = f"list {self.entry}: member {self.target}" if self.kind == "list" else \
            f"{self.kind} {self.entry} -> {self.target}"
        return f"{head} points at nothing: no mailbox, alias, list or contact {self.missing}"


def missing(cfg: config.Config, store: SQLiteStore, target: str) -> str | None:
    """The inbound address ``target`` leads to when the directory has no entry for it, else None.

    A target that does not parse (written past the command line's checks) is left to the
    server, which logs it when it meets it.
    """
    try:
        parsed = parse_path(target)
    except AddressError:
        return None
    if parsed is None:
        return None
    addr, _ = policy.final_domain(cfg, parsed)
    route = None if addr.is_literal else cfg.route_for(addr.domain)
    if route is None or route.route != "inbound" or addr.local.lower() == "postmaster":
        return None
    return None if store.kind(addr.key) is not None else addr.key


def find(cfg: config.Config, store: SQLiteStore) -> list[Dangling]:
    """Every alias target, list member and contact in the directory that points at nothing, sorted."""
    found = []
    for entry, kind, target in store.references():
        gone = missing(cfg, store, target)
        if gone is not None:
            found.append(Dangling(entry, kind, target, gone))
    return found


def warn_targets(cfg: config.Config, store: SQLiteStore, kind: str, entry: str, targets: list[str]) -> None:
    """Warn about each new target of ``entry`` that points at nothing (the entry is saved all the same)."""
    for target in targets:
        gone = missing(cfg, store, target)
        if gone is not None:
            warn([Dangling(entry, kind, target, gone)])


def left_by(cfg: config.Config, store: SQLiteStore, removed: str) -> list[Dangling]:
    """The entries that point at nothing now that ``removed`` is gone from the directory."""
    return [d for d in find(cfg, store) if d.missing == removed.lower()]


def warn(found: list[Dangling]) -> None:
    """One ``mailguard: warning: ...`` line on stderr per entry."""
    for d in found:
        print(f"mailguard: warning: {d.line()}", file=sys.stderr)
