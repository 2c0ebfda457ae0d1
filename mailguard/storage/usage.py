"""How many octets a mailbox holds: the files in its maildir's ``new/`` and ``cur/``.

Blocking (a ``stat`` or a directory listing): the SMTP adapter runs :meth:`Sizes.measure`
in a thread.  A file name mailguard or Dovecot wrote carries its size (``,S=<octets>``,
see :mod:`mailguard.storage.maildir`), so a listing needs no ``stat`` per message; any
other file is ``stat``-ed.  ``tmp/`` is not counted (nothing there is delivered yet).

The total of each maildir is remembered while ``new/`` and ``cur/`` keep their
modification times, so asking again for an unchanged mailbox costs two ``stat`` calls.
A total is kept only when both folders last changed more than a second before the
listing began, so no change can share a timestamp with it (as the POP3 scan cache does).
"""

from __future__ import annotations

import os
import re
import threading
import time

_SIZE = re.compile(r",S=(\d+)")
RACY_NS = 1_000_000_000
CACHED = 4096


class Sizes:
    """Measures maildirs; safe to use from several threads."""

    def __init__(self) -> None:
        self._totals: dict[str, tuple[tuple[int, int], int]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _stamp(maildir: str) -> tuple[int, int]:
        out = []
        for folder in ("new", "cur"):
            try:
                out.append(os.stat(os.path.join(maildir, folder)).st_mtime_ns)
            except OSError:
                out.append(-1)
        return out[0], out[1]

    def measure(self, maildir: str | os.PathLike[str]) -> int:
        """The octets in ``maildir``'s ``new/`` and ``cur/``; 0 for a maildir not made yet."""
        path = os.fspath(maildir)
        started = time.time_ns()
        stamp = self._stamp(path)
        with self._lock:
            known = self._totals.get(path)
        if known is not None and known[0] == stamp:
            return known[1]
        total = sum(self._folder(os.path.join(path, folder)) for folder in ("new", "cur"))
        if max(stamp) <= started - RACY_NS and self._stamp(path) == stamp:
            with self._lock:
                self._totals.pop(path, None)
                self._totals[path] = (stamp, total)
                while len(self._totals) > CACHED:
                    del self._totals[next(iter(self._totals))]
        return total

    @staticmethod
    def _folder(folder: str) -> int:
        try:
            names = os.listdir(folder)
        except OSError:
            return 0
        total = 0
        for name in names:
            m = _SIZE.search(name)
            if m is not None:
                total += int(m.group(1))
            elif not name.startswith("."):
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except OSError:
                    pass              # gone meanwhile (a POP3 deletion)
        return total
