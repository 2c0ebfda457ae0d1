"""``mailguard explain``: what the server would answer this client, sender and recipients, and why.

One line per recipient, ``<rcpt>: <reply> (rule: <rule>)``, decided in the order the
server decides (with ``-v`` the line ends with what decided it: the destinations of an
accepted recipient, or the network, pattern, zone and code, record of a refusal):

1. ``[submission] enforce_sender``: with ``--auth`` and ``--from``, a sender the account
   does not own gets ``553 5.7.1`` (rule ``enforce_sender``), as MAIL does.
2. The inbound checks of MAIL (:mod:`mailguard.checks`), DNS included, for the client
   as the server sees it (trusted or not).
3. The recipient policy (:mod:`mailguard.core.policy`), facts from the directory.  A
   list's line adds its sender policy and what it made of this client and ``--from``
   (without ``--from``, the null sender): ``[list senders: members; <a@b> is a member]``.
   Then the mailbox quotas (:mod:`mailguard.core.quota`: a full mailbox is ``452 4.2.2``,
   rule ``mailbox_quota``; with ``-v`` a list's full members are named after ``over quota:``).
4. The inbound checks of RCPT (greylisting, read only: explain changes no state).

Rate control counts live in the running server, so explain always finds them clear.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

from twisted.internet import defer

from mailguard import config
from mailguard.checks.pipeline import InboundChecks, trusted
from mailguard.core.srs import SRS
from mailguard.core import policy, replies
from mailguard.core.address import AddressError, parse_path
from mailguard.core.checks import Refusal
from mailguard.directory.base import DirectoryError, Directory
from mailguard.directory.facts import gather
from mailguard.dns.resolver import from_config
from mailguard.smtp.quota import MailboxQuotas


class ExplainError(Exception):
    """Bad arguments; the text is printed on one line."""


class _StoreDirectory:
    """The SQLite store read directly (the CLI has no thread pools to run it on)."""

    def __init__(self, cfg: config.Config) -> None:
        from mailguard.directory.sqlite import SQLiteStore

        self.store = SQLiteStore(cfg.directory.path)
        self.ready = True

    def expand(self, address: str) -> defer.Deferred[Any]:
        return defer.maybeDeferred(self.store.expand, address)

    def verify_password(self, login: str, password: str) -> defer.Deferred[Any]:
        return defer.maybeDeferred(self.store.verify_password, login, password)

    def addresses_of(self, mailbox: str) -> defer.Deferred[Any]:
        return defer.maybeDeferred(lambda: frozenset(self.store.addresses_of(mailbox)))

    def quotas(self, mailboxes: tuple[str, ...]) -> defer.Deferred[Any]:
        return defer.maybeDeferred(self.store.quotas, mailboxes)

    def close(self) -> None:
        self.store.close()


def _line(rcpt: str, refusal: Refusal, verbose: bool) -> str:
    detail = f" -> {refusal.detail}" if verbose and refusal.detail else ""
    return f"{rcpt}: {refusal.reply} (rule: {refusal.rule}){detail}"


def parse_args(args: argparse.Namespace) -> tuple[policy.Client, Any]:
    """The client and the parsed sender (None without ``--from``).

    :raises ExplainError: an argument that is not an address.
    """
    auth = args.auth.strip().lower() or None if args.auth else None
    try:
        who = policy.client(args.client, args.local, auth, pop_before_smtp=args.pop_before_smtp)
    except ValueError as e:
        raise ExplainError(str(e)) from None
    if args.sender is None:
        return who, None
    try:
        return who, parse_path(args.sender, null_ok=True)
    except AddressError as e:
        raise ExplainError(f"--from {args.sender!r}: {e}") from None


async def lines(cfg: config.Config, args: argparse.Namespace, reactor: Any) -> list[str]:
    """The explain lines for ``args`` (see the module docstring)."""
    who, sender = parse_args(args)
    sender_text = str(sender) if sender is not None else ""
    directory: Directory | _StoreDirectory
    if cfg.directory.backend == "ldap":
        from mailguard.app.dircli import ldap_directory
        directory = ldap_directory(cfg, reactor)
    else:
        directory = _StoreDirectory(cfg)
    checks = InboundChecks(cfg, from_config(cfg.dns.servers, cfg.dns.timeout, reactor), reactor,
                           run_in_thread=lambda f, *a: defer.maybeDeferred(f, *a))
    try:
        return await _decide(cfg, args, checks, directory, who, sender, sender_text)
    finally:
        checks.close()
        directory.close()


async def _decide(cfg: config.Config, args: argparse.Namespace, checks: InboundChecks, directory: Any,
                  who: policy.Client, sender: Any, sender_text: str) -> list[str]:
    rcpts: list[str] = args.rcpt
    if who.authenticated and sender is not None and cfg.submission.enforce_sender:
        try:
            owned = await directory.addresses_of(who.authenticated)
        except DirectoryError:
            return [_line(r, Refusal("directory_failure", cfg.replies.directory_failure), False) for r in rcpts]
        if sender.key not in owned:
            not_owned = Refusal("enforce_sender", replies.SENDER_NOT_OWNED, f"user={who.authenticated}")
            return [_line(r, not_owned, args.verbose) for r in rcpts]
    is_trusted = trusted(cfg, who)
    by_address = trusted(cfg, policy.Client(who.ip, who.local_ip, None, who.pop_before_smtp))
    conn = checks.connected(args.client, args.local or "", trusted_by_address=by_address)
    conn.helo = args.helo
    refusal = await checks.at_mail(checks.facts(conn, is_trusted, who.authenticated, sender_text, dry_run=True))
    if refusal is not None:
        return [_line(r, refusal, args.verbose) for r in rcpts]
    out = []
    quotas = MailboxQuotas(lambda f: defer.maybeDeferred(f))
    key = cfg.server.data_dir / "srs.key"
    srs = SRS(key.read_bytes()) if key.is_file() else None     # the CLI never makes one
    for rcpt in rcpts:
        step = functools.partial(policy.decide, cfg, who=who, text=rcpt, srs=srs, now=time.time(),
                                 sender=sender_text)
        dropped: tuple[tuple[str, replies.Reply], ...] = ()
        try:
            decision = await gather(step, directory)
            judged, _ = await quotas.judge(cfg, directory, decision, 0)
            decision, dropped = judged.decision, judged.dropped
        except DirectoryError:
            decision = policy.directory_failure(cfg, rcpt)
        if decision.accepted:
            refusal = await checks.at_rcpt(checks.facts(conn, is_trusted, who.authenticated, sender_text,
                                                        decision.recipient, dry_run=True))
            if refusal is not None:
                out.append(_line(rcpt, refusal, args.verbose))
                continue
        full = ("; over quota: " + ", ".join(f"{m} ({r})" for m, r in dropped)
                if args.verbose and dropped and decision.accepted else "")
        out.append(policy.explain_line(decision, rcpt, args.verbose) + full)
    return out


def run(cfg: config.Config, args: argparse.Namespace) -> int:
    """``mailguard explain``: print the lines; exit 0.

    :raises ExplainError: bad arguments (checked before anything starts).
    """
    from mailguard.app.dircli import run as run_on_reactor

    parse_args(args)

    for line in run_on_reactor(lambda reactor: defer.ensureDeferred(lines(cfg, args, reactor))):
        print(line)
    return 0
