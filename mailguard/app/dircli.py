"""The CLI's directory commands that work on any backend, and its LDAP guard.

- ``mailguard directory test ADDRESS``: what the directory answers for an address.
  Under ``ldap``: the filters as sent, every entry found (its DN, whether it is a
  mailbox, contact or list, the mailbox's maildir) and the expansion, for an
  administrator setting up the filters.  Exit 0 when the address is known, 1 when not.
- :func:`managed_elsewhere`: under ``ldap``, ``user``/``alias``/``list``/``contact``
  refuse with one line (the entries are managed in LDAP) and exit 1.
- :func:`check_ldap`: ``check-config`` binds once as the service account.
- :func:`settle_all_ldap`: ``explain`` with facts from LDAP.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from mailguard import config
from mailguard.core.address import AddressError, parse_path
from mailguard.core.policy import Facts, Missing
from mailguard.directory import ldapfilter
from mailguard.directory.base import DirectoryError, Expansion
from mailguard.directory.facts import gather
from mailguard.storage.maildir import maildir_path

T = TypeVar("T")
MANAGED_COMMANDS = ("user", "alias", "list", "contact")


class DirectoryCommandError(Exception):
    """A directory command that failed; its text is printed on one line."""


def managed_elsewhere(cfg: config.Config, command: str) -> str | None:
    """The refusal for ``command`` when the directory is not mailguard's to change."""
    if cfg.directory.backend == "ldap" and command in MANAGED_COMMANDS and cfg.directory.ldap is not None:
        return (f"the directory is managed in LDAP ({cfg.directory.ldap.url}, base {cfg.directory.ldap.base}); "
                f"change users, aliases, lists and contacts there")
    return None


def run(work: Callable[[Any], defer.Deferred[T]]) -> T:
    """Run ``work(reactor)`` to completion on the reactor and return its result (or raise)."""
    from twisted.internet import reactor

    box: list[Any] = []

    def start() -> None:
        d = defer.maybeDeferred(work, reactor)
        d.addBoth(box.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run(installSignalHandlers=False)  # type: ignore[call-arg]
    result = box[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result  # type: ignore[no-any-return]


def ldap_directory(cfg: config.Config, reactor: Any) -> Any:
    from mailguard.directory.ldap import LDAPDirectory

    assert cfg.directory.ldap is not None
    return LDAPDirectory(cfg.directory.ldap, reactor, cfg.inbound_domains())


def check_ldap(cfg: config.Config) -> str:
    """Bind once as the service account and read the base; the line to print.

    :raises DirectoryError: the server cannot be reached, TLS or the bind failed.
    """
    def work(reactor: Any) -> defer.Deferred[str]:
        return defer.ensureDeferred(ldap_directory(cfg, reactor).check())
    return run(work)


def cmd_directory(cfg: config.Config, args: argparse.Namespace) -> int:
    """``mailguard directory test ADDRESS``."""
    try:
        addr = parse_path(args.address)
    except AddressError as e:
        raise DirectoryCommandError(f"{args.address!r} is not a mail address: {e}") from None
    assert addr is not None
    address = addr.key
    if cfg.directory.backend == "ldap":
        lines, known = run(lambda reactor: defer.ensureDeferred(_ldap_report(cfg, reactor, address)))
    else:
        lines, known = _sqlite_report(cfg, address)
    for line in lines:
        print(line)
    return 0 if known else 1


async def _ldap_report(cfg: config.Config, reactor: Any, address: str) -> tuple[list[str], bool]:
    lc = cfg.directory.ldap
    assert lc is not None
    d = ldap_directory(cfg, reactor)
    lines = [f"{lc.url} ({lc.tls}), base {lc.base}, schema {lc.schema}",
             f"mailbox_filter: {ldapfilter.fill(lc.mailbox_filter, address)}",
             f"list_filter: {ldapfilter.fill(lc.list_filter, address)}"]
    try:
        return await _describe(cfg, d, address, lines)
    finally:
        d.close()


async def _describe(cfg: config.Config, d: Any, address: str, lines: list[str]) -> tuple[list[str], bool]:
    lc = cfg.directory.ldap
    assert lc is not None
    found = await d.find(address)
    for entry in found.mailboxes:
        own = d.own_address(entry)
        path = maildir_path(cfg.mail_dir, own)
        lines.append(f"mailbox {entry.dn}: {own} (maildir {path})")
    for entry in found.contacts:
        lines.append(f"contact {entry.dn}: forwards to {d.target_of(entry)}")
    for entry in found.lists:
        lines.append(f"list {entry.dn}: {len(await d.member_values(entry))} direct member(s)")
    if found.expansion is None:
        lines.append(f"no entry matches: {address} is an unknown recipient")
        return lines, False
    lines.append("expands to: " + _expansion_text(found.expansion))
    return lines, True


def _sqlite_report(cfg: config.Config, address: str) -> tuple[list[str], bool]:
    from mailguard.directory.sqlite import SQLiteStore

    store = SQLiteStore(cfg.directory.path)
    lines = [f"sqlite {cfg.directory.path}"]
    got = store.expand(address)
    if got is None:
        lines.append(f"no entry: {address} is an unknown recipient")
        return lines, False
    lines.append(f"{store.kind(address)} {address}")
    lines.append("expands to: " + _expansion_text(got))
    return lines, True


def settle_all_ldap(cfg: config.Config, steps: Sequence[Callable[[Facts], T | Missing]]) -> list[T | DirectoryError]:
    """Run each policy step to its answer with facts from LDAP (``explain``); a DirectoryError for each that failed."""
    async def work(reactor: Any) -> list[T | DirectoryError]:
        d = ldap_directory(cfg, reactor)
        answers: list[T | DirectoryError] = []
        try:
            for step in steps:
                try:
                    answers.append(await gather(step, d))
                except DirectoryError as e:
                    answers.append(e)
        finally:
            d.close()
        return answers
    return run(lambda reactor: defer.ensureDeferred(work(reactor)))


def _expansion_text(exp: Expansion) -> str:
    parts = [f"mailbox {m}" for m in exp.mailboxes] + [f"forward {o}" for o in exp.others]
    return ", ".join(parts) or "(nothing)"


def add_parser(sub: Any) -> None:
    """The ``directory`` command's argument parser."""
    p = sub.add_parser("directory", help="what the directory (SQLite or LDAP) answers for an address")
    p.add_argument("action", choices=["test"])
    p.add_argument("address")
    p.set_defaults(func=cmd_directory)


__all__ = ["DirectoryCommandError", "DirectoryError", "add_parser", "check_ldap", "cmd_directory",
           "managed_elsewhere", "run", "settle_all_ldap"]
