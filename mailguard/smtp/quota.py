"""Mailbox quotas at RCPT, and the warning a delivery logs past 90 % of one.

The decision is :mod:`mailguard.core.quota`'s; this module gathers its facts without
blocking the reactor: each mailbox's own quota from the directory
(:meth:`~mailguard.directory.base.Directory.quotas`), then, for the mailboxes that have
one, their usage measured in a thread (:class:`~mailguard.storage.usage.Sizes`).
Mailboxes without a quota cost nothing more than the directory's answer.

Log lines::

    mailguard smtp over-quota: client=192.0.2.7 rcpt=staff@example.com mailbox=ann@example.com reply="452 4.2.2 Mailbox full"
    mailguard quota warning: mailbox=ann@example.com used=950211 quota=1000000 percent=95

The first when a list or alias loses one full mailbox while the rest still get the
message; the second once when a delivery takes a mailbox past
:data:`~mailguard.core.quota.WARN_SHARE` of its quota (again only after it has been
measured below that mark).
"""

from __future__ import annotations

import os
from typing import Callable, Mapping

from twisted.internet import threads
from twisted.internet.defer import Deferred

from mailguard.app import maillog
from mailguard.config import Config
from mailguard.core import policy, quota
from mailguard.directory.base import Directory
from mailguard.storage.maildir import maildir_path
from mailguard.storage.usage import Sizes

RunInThread = Callable[[Callable[[], list[int]]], "Deferred[list[int]]"]


class MailboxQuotas:
    """Measures mailboxes for the quota decision; one per server, shared by its sessions."""

    def __init__(self, run_in_thread: RunInThread = threads.deferToThread, sizes: Sizes | None = None) -> None:
        self.run_in_thread = run_in_thread
        self.sizes = sizes if sizes is not None else Sizes()
        self._warned: set[str] = set()

    async def usage(self, cfg: Config, directory: Directory, mailboxes: tuple[str, ...]) -> dict[str, quota.Usage]:
        """The :class:`~mailguard.core.quota.Usage` of each of ``mailboxes`` that has a quota.

        :raises DirectoryError: the directory cannot say which quotas are set.
        """
        own = await directory.quotas(mailboxes)
        limits = {m: quota.effective(own.get(m), cfg.limits.mailbox_quota) for m in mailboxes}
        paths: dict[str, str] = {}
        for m, q in limits.items():
            if q > 0:
                try:
                    paths[m] = os.fspath(maildir_path(cfg.mail_dir, m))
                except ValueError:
                    continue                      # no maildir can exist for it: delivery says so
        if not paths:
            return {}
        folders = list(paths.values())
        used = await self.run_in_thread(lambda: [self.sizes.measure(p) for p in folders])
        out = {m: quota.Usage(limits[m], u) for m, u in zip(paths, used)}
        for m, u in out.items():
            if u.used < u.quota * quota.WARN_SHARE:
                self._warned.discard(m)
        return out

    async def judge(self, cfg: Config, directory: Directory, decision: policy.Decision,
                    declared: int) -> tuple[quota.Judged, dict[str, quota.Usage]]:
        """The decision after the quotas of its mailboxes, and their usage (for :meth:`delivered`)."""
        if not decision.accepted or not decision.mailboxes:
            return quota.Judged(decision), {}
        usage = await self.usage(cfg, directory, decision.mailboxes)
        if not usage:
            return quota.Judged(decision), {}
        return quota.judge(decision, usage, declared, cfg.replies.soft_bounce), usage

    def delivered(self, usage: Mapping[str, quota.Usage], mailboxes: tuple[str, ...] | list[str],
                  size: int) -> None:
        """A message of ``size`` octets went into ``mailboxes``: warn for those it took past the mark."""
        for m in mailboxes:
            u = usage.get(m)
            if u is None or m in self._warned or not quota.crossed(u, size):
                continue
            self._warned.add(m)
            if len(self._warned) > 10_000:
                self._warned.clear()
            after = u.used + size
            maillog.log.warn("{line}", line=(
                f"mailguard quota warning: mailbox={maillog.clean(m)} used={after} quota={u.quota} "
                f"percent={after * 100 // u.quota}"))
