"""The log file of ``twistd --logfile``, rotated as ``[log]`` says.

twistd's own ``--logfile`` renames the file at 1 MB and keeps every rotated file
forever (``twistd.log.1``, ``.2``, ... without end).  When twistd would write to a
file, the plugin opens that same file itself as a
:class:`twisted.python.logfile.LogFile` with ``[log] rotate_length`` and
``[log] max_rotated_files`` and hands twistd the observer through the
application's ``ILogObserver`` component (which twistd prefers to its own).
``SIGUSR1`` still rotates at once, as under twistd.  Standard output under ``-n``
(without ``--logfile``, or ``--logfile=-``) is taken over the same way, unrotated.
Both write through a :class:`~mailguard.app.logwriter.LineWriter`: twistd's lines,
unchanged, one write per reactor turn.  ``--syslog`` and ``--logger`` are left to
twistd.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any, Callable

from twisted.logger import ILogObserver
from twisted.python.logfile import LogFile

from mailguard.app.logwriter import LineWriter
from mailguard.config.log import LogConfig


def twistd_log_path(option: Callable[[str], object]) -> str | None:
    """The file twistd would log to, from its options (``option(name)``), or None (not a file)."""
    if option("syslog") or option("logger"):
        return None
    name = option("logfile")
    if name == "-" or (option("nodaemon") and not name):
        return None
    return os.path.abspath(str(name) if name else "twistd.log")


def twistd_logs_to_stdout(option: Callable[[str], object]) -> bool:
    """Would twistd write its log to standard output (``-n`` without a log file, or ``--logfile=-``)?"""
    if option("syslog") or option("logger") or not option("nodaemon"):
        return False
    return option("logfile") in (None, "", "-")


def open_log(path: str, cfg: LogConfig) -> LogFile:
    """The log file at ``path``, rotating at ``cfg.rotate_length`` and keeping ``cfg.max_rotated_files``."""
    return LogFile(os.path.basename(path), os.path.dirname(path),  # type: ignore[no-untyped-call]
                   rotateLength=cfg.rotate_length or None, maxRotatedFiles=cfg.max_rotated_files or None)


def observer(path: str, cfg: LogConfig, reactor: Any) -> ILogObserver:
    """An observer writing twistd's text lines to the rotating file; ``SIGUSR1`` rotates it."""
    log_file = open_log(path, cfg)
    if not signal.getsignal(signal.SIGUSR1):
        signal.signal(signal.SIGUSR1, lambda _sig, _frame: reactor.callFromThread(log_file.rotate))
    return LineWriter(log_file, reactor)  # type: ignore[arg-type]  # a file-like object


def stdout_observer(reactor: Any) -> ILogObserver:
    """An observer writing twistd's text lines to standard output."""
    return LineWriter(sys.stdout, reactor)
