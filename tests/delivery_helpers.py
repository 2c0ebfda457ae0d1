"""Deliver into a maildir the way the server does: through the group commit, in line.

Tests that need messages in a mailbox use :func:`deliver`, so they exercise the one
delivery path production has (stage in ``tmp/``, sync, rename into ``new/``, sync),
not a second one kept for them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer
from twisted.python.failure import Failure

from mailguard.storage.groupcommit import GroupCommit, Part, _Job
from mailguard.storage.maildir import Copies


class InlineReactor:
    """``callFromThread`` that calls at once: the group commit answers in this thread."""

    def callFromThread(self, f: Callable[..., Any], *args: Any) -> None:
        f(*args)


def commit_inline(parts: list[Part], use_syncfs: bool = True) -> Any:
    """Commit ``parts`` as one transaction in this thread; the result, or raise its error."""
    d: defer.Deferred[Any] = defer.Deferred()
    GroupCommit(InlineReactor(), ".", use_syncfs=use_syncfs)._commit([_Job(parts, d)])
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the group commit did not answer"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def deliver(box: Path, message: bytes, use_syncfs: bool = True) -> str:
    """Store one copy of the CRLF ``message`` in maildir ``box``; its file name in ``new/``."""
    copies = Copies(box.parent, [str(box)], message)
    commit_inline([copies], use_syncfs)
    return copies.names[0]
