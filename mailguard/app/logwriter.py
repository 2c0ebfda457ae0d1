"""Log lines written in batches: one write per reactor turn instead of two system calls per line.

Twisted's file observer writes and flushes every event on its own, so each message
(its RCPT decision line and its ``stored`` line) cost four system calls on the
reactor thread, and formatting the time stamp builds a time zone and a datetime per
line.  :class:`LineWriter` formats a line as that observer would (the same text),
keeps it, and writes everything kept at the end of the reactor's turn, in one write
and one flush.  Nothing waits longer than that turn: before the reactor runs, when
it has stopped, from the shutdown's last step and at exit, lines go out at once.
Only a process killed outright (``kill -9``) can lose the lines of its last turn.
"""

from __future__ import annotations

import atexit
import threading
from typing import IO, Any, Callable

from twisted.logger import ILogObserver, LogEvent, formatEventAsClassicLogText, formatTime
from twisted.python import threadable
from zope.interface import implementer

Format = Callable[[LogEvent], "str | None"]


class _Stamps:
    """The RFC 3339 time stamp of twistd's lines, made once per second (the format's resolution)."""

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._text = formatTime(second)
            self._second = second
        return self._text


def classic_format() -> Format:
    """twistd's ``time [namespace#level] text`` lines, with a fast path for ``log.info("{line}", line=...)``."""
    stamps = _Stamps()

    def format_event(event: LogEvent) -> str | None:
        if (event.get("log_format") == "{line}" and "log_failure" not in event
                and "log_system" not in event and "line" in event):
            level = event.get("log_level")
            text = f"{stamps(event.get('log_time'))} [{event.get('log_namespace') or '-'}#" \
                   f"{level.name if level is not None else '-'}] {event['line']}"
            return (text.replace("\n", "\n\t") if "\n" in text else text) + "\n"
        return formatEventAsClassicLogText(event, formatTime=stamps)
    return format_event


@implementer(ILogObserver)
class LineWriter:
    """An observer writing ``format_event``'s lines to ``out``, gathered over a reactor turn."""

    def __init__(self, out: IO[Any], reactor: Any, format_event: Format | None = None) -> None:
        self.out = out
        self.reactor = reactor
        self.format_event = format_event or classic_format()
        self._kept: list[str] = []
        self._lock = threading.Lock()
        self._due = False
        reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        atexit.register(self.flush)

    def __call__(self, event: LogEvent) -> None:
        text = self.format_event(event)
        if not text:
            return
        with self._lock:
            self._kept.append(text)
            if self._due:
                return
            self._due = True
        if not self.reactor.running:
            self.flush()
        elif threadable.isInIOThread():  # type: ignore[no-untyped-call]
            self.reactor.callLater(0, self.flush)
        else:
            self.reactor.callFromThread(self.flush)

    def flush(self) -> None:
        """Write every line kept so far, in one write."""
        with self._lock:
            kept, self._kept, self._due = self._kept, [], False
            if not kept:
                return
            try:
                self.out.write("".join(kept))
                self.out.flush()
            except (OSError, ValueError):       # a closed or full output: the lines are lost, not the process
                pass
