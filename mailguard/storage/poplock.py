"""One POP3 session per mailbox, arbitrated by the kernel.

A session holds ``flock(LOCK_EX)`` on ``mailguard-pop3.lock`` in the maildir while it
has the mailbox open, so the lock holds across the processes of ``[server] workers``
and against a second mailguard on the same ``data_dir``; a process that dies drops
its locks with its file descriptors.  Within one process a table answers first
(``flock`` on a second open file would refuse too, but the table costs no system call).
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

#: The lock file's name in the maildir (maildir readers ignore files beside cur/new/tmp).
LOCK_NAME = "mailguard-pop3.lock"


class MailboxLocked(Exception):
    """Another session holds this mailbox (POP3 ``-ERR [IN-USE]``, RFC 2449 section 8.1.2)."""


class LockTable:
    """Exclusive locks on maildirs: one POP3 session per mailbox, in any process."""

    def __init__(self) -> None:
        self._held: dict[str, int] = {}
        self._mutex = threading.Lock()

    def acquire(self, maildir: Path) -> None:
        """Take the lock or raise :class:`MailboxLocked`; a missing maildir folder is made."""
        key = os.path.abspath(maildir)
        with self._mutex:
            if key in self._held:
                raise MailboxLocked(key)
            os.makedirs(key, mode=0o700, exist_ok=True)
            fd = os.open(os.path.join(key, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MailboxLocked(key) from None
            except BaseException:
                os.close(fd)
                raise
            self._held[key] = fd

    def release(self, maildir: Path) -> None:
        """Give the lock back; releasing a lock not held is harmless."""
        with self._mutex:
            fd = self._held.pop(os.path.abspath(maildir), None)
        if fd is not None:
            os.close(fd)

    def held(self, maildir: Path) -> bool:
        return os.path.abspath(maildir) in self._held
