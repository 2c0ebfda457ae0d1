"""Directory answers kept while the directory file is unchanged.

Every RCPT asks the directory to expand its address, and each question was a trip to
the lookup thread and two SQLite queries, for an answer that changes only when an
administrator runs ``mailguard user``/``alias``/``list``/``contact``.  Those commands
write the file (in WAL mode, its ``-wal`` file), so :class:`StampedAnswers` keeps
each answer beside a *stamp* of both files (inode, size and modification time) taken
before the question was asked, and gives it again only while the stamp is the same.
A change made while a question is on its way gives a new stamp, so its answer is
never kept past it.  Taking a stamp is two ``stat`` calls answered from the kernel's
inode cache; no file is read on the reactor thread.  Failures are not kept.
"""

from __future__ import annotations

import os
from typing import Callable, Generic, Hashable, TypeVar

V = TypeVar("V")

Stamp = tuple[tuple[int, int, int] | None, ...]

#: Answers kept at most; past this the table starts again (lookups are cheap to redo).
MAX_ANSWERS = 10_000


def file_stamp(path: str, stat: Callable[[str], os.stat_result] = os.stat) -> tuple[int, int, int] | None:
    """(inode, size, modification time in ns) of ``path``; None when it does not exist."""
    try:
        st = stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class StampedAnswers(Generic[V]):
    """Answers by key, valid while the stamp of ``paths`` (the first must exist) is unchanged."""

    def __init__(self, paths: tuple[str, ...], stat: Callable[[str], os.stat_result] = os.stat) -> None:
        self.paths = paths
        self.stat = stat
        self._stamp: Stamp | None = None
        self._answers: dict[Hashable, V] = {}

    def stamp(self) -> Stamp | None:
        """The files' stamp now, or None when answers must not be kept (the file is gone, unreadable)."""
        try:
            stamp = tuple(file_stamp(p, self.stat) for p in self.paths)
        except OSError:
            return None
        return stamp if stamp[0] is not None else None

    def get(self, key: Hashable, stamp: Stamp | None) -> tuple[bool, V | None]:
        """(found, answer) for ``key`` as of ``stamp``; answers of other stamps are dropped."""
        if stamp is None:
            return False, None
        if stamp != self._stamp:
            self._answers.clear()
            self._stamp = stamp
            return False, None
        if key in self._answers:
            return True, self._answers[key]
        return False, None

    def put(self, key: Hashable, stamp: Stamp | None, answer: V) -> None:
        """Keep ``answer`` if ``stamp`` (taken before it was asked for) is still the current one."""
        if stamp is None or stamp != self._stamp:
            return
        if len(self._answers) >= MAX_ANSWERS:
            self._answers.clear()
        self._answers[key] = answer
