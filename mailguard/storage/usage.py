"""How many octets a mailbox holds: the files in its maildir's ``new/`` and ``cur/``.

Blocking (a ``stat`` or a directory listing): the SMTP adapter runs :meth:`Sizes.measure`
in a thread.  A file name mailguard or Dovecot wrote carries its size (``,S=<octets>``,
see :mod:`mailguard.storage.maildir`), so a listing needs no ``stat`` per message; any
other file is ``stat``-ed.  ``tmp/`` is not counted (nothing there is delivered yet).

The total of each maildir is remembered with the modification times of ``new/`` and
``cur/``.  Asking again costs two ``stat`` calls while they are unchanged.  A delivery
made here (:class:`CountedCopies`, in the group commit's threads) is announced before
its files are renamed into ``new/`` and counted once they are: a listing leaves out the
files still announced, the count adds them, and while a maildir has deliveries in
flight its changed times are taken for theirs, so a mailbox that keeps receiving mail
is not listed again for every message.  A change made elsewhere (a POP3 deletion,
another worker's delivery, a mail reader) changes the times and the next question
lists the maildir again, except while deliveries are in flight or when it falls in
the same tick of the file system's clock as one of ours: no total is trusted longer
than :data:`MAX_AGE` seconds without a fresh listing.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from mailguard.storage.maildir import Copies

_SIZE = re.compile(r",S=(\d+)")
#: Seconds a total is used before the maildir is listed again, changed or not.
MAX_AGE = 60.0
CACHED = 4096

Stamp = tuple[int, int]


class Sizes:
    """Measures maildirs; safe to use from several threads."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        self.now = now
        self._totals: dict[str, tuple[Stamp, int, float]] = {}    # path -> (stamp, octets, listed at)
        self._flying: dict[str, set[str]] = {}                    # path -> names announced, not counted
        self._lock = threading.Lock()
        self.listings = 0

    @staticmethod
    def _stamp(maildir: str) -> Stamp:
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
        stamp = self._stamp(path)
        now = self.now()
        with self._lock:
            known = self._totals.get(path)
            if known is not None and now - known[2] < MAX_AGE and (known[0] == stamp or path in self._flying):
                return known[1]
            # Listed under the lock, so that no announced delivery is counted between the
            # listing and the remembering: each is counted by one of the two, once.
            self.listings += 1
            skip = self._flying.get(path, set())
            total = sum(self._folder(os.path.join(path, folder), skip) for folder in ("new", "cur"))
            self._totals.pop(path, None)
            self._totals[path] = (stamp, total, now)
            while len(self._totals) > CACHED:
                del self._totals[next(iter(self._totals))]
        return total

    def announce(self, maildir: str | os.PathLike[str], name: str) -> None:
        """A file ``name`` is about to be renamed into ``maildir/new`` here."""
        with self._lock:
            self._flying.setdefault(os.fspath(maildir), set()).add(name)

    def landed(self, maildir: str | os.PathLike[str], name: str, octets: int | None) -> None:
        """The announced file is in ``new/`` (``octets``), or was not delivered (None).  Blocking."""
        path = os.fspath(maildir)
        stamp = self._stamp(path)
        with self._lock:
            names = self._flying.get(path, set())
            names.discard(name)
            if not names:
                self._flying.pop(path, None)
            known = self._totals.get(path)
            if known is not None:
                if octets is None:
                    del self._totals[path]
                else:
                    self._totals[path] = (stamp, known[1] + octets, known[2])

    @staticmethod
    def _folder(folder: str, skip: set[str]) -> int:
        try:
            names = os.listdir(folder)
        except OSError:
            return 0
        total = 0
        for name in names:
            if name in skip:
                continue
            m = _SIZE.search(name)
            if m is not None:
                total += int(m.group(1))
            elif not name.startswith("."):
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except OSError:
                    pass              # gone meanwhile (a POP3 deletion)
        return total


class CountedCopies(Copies):
    """:class:`~mailguard.storage.maildir.Copies` that tell :class:`Sizes` what they added."""

    def __init__(self, root: str | Path, maildirs: Sequence[str | Path], message: bytes, sizes: Sizes) -> None:
        super().__init__(root, maildirs, message)
        self.sizes = sizes

    def stage(self, staged: list[tuple[str, str]], sync: bool) -> None:
        first = len(staged)
        try:
            super().stage(staged, sync)
        finally:
            for _, final in staged[first:]:
                self.sizes.announce(os.path.dirname(os.path.dirname(final)), os.path.basename(final))

    def finish(self, published: bool) -> None:
        for box, name in zip(self.maildirs, self.names):
            m = _SIZE.search(name)
            self.sizes.landed(box, name, int(m.group(1)) if published and m is not None else None)
