"""A worker process of ``[server] workers``: ``python -m mailguard.app.worker``.

Started by :class:`mailguard.app.workers.WorkerPool` only, never by hand: it finds its
listening sockets and its connection to the first process as inherited file
descriptors, builds the same mail host from the same configuration file (without
the queue runner, which runs once, in the first process), and serves until it is
told to stop or the first process goes away.  Its log lines go to standard output
as ``namespace#level text``, which the first process writes to its own log.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any

from twisted.logger import formatEvent, globalLogBeginner


def _worker_line(event: dict[str, Any]) -> str:
    """``namespace#level text``, one line per line of the event (and of its traceback)."""
    level = event.get("log_level")
    head = f"{event.get('log_namespace') or 'mailguard'}#{getattr(level, 'name', 'info')}"
    text = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        text += "\n" + failure.getTraceback()
    return "".join(f"{head} {line}\n" for line in text.splitlines() or [""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mailguard.app.worker")
    parser.add_argument("--config")
    parser.add_argument("--listeners", type=int, required=True)
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    from mailguard.app.logwriter import LineWriter
    globalLogBeginner.beginLoggingTo([LineWriter(sys.stdout, reactor, _worker_line)],
                                     redirectStandardIO=False, discardBuffer=True)

    from mailguard import config
    from mailguard.app.service import Mailhost
    from mailguard.app.state import StateClient
    from mailguard.app.workers import STATE_FD, Handing, listener_fds

    cfg = config.find(args.config)

    def parent_gone() -> None:
        if reactor.running:                           
            reactor.stop()                            

    client = StateClient(parent_gone)
    reactor.adoptStreamConnection(STATE_FD, socket.AF_UNIX, Handing(client))  # type: ignore[attr-defined]
    os.close(STATE_FD)
    host = Mailhost(cfg, reactor, worker=(client, listener_fds(args.listeners)))
    host.privilegedStartService()             # type: ignore[no-untyped-call]
    host.startService()
    reactor.addSystemEventTrigger("before", "shutdown", host.stopService)
    # Ctrl-C under ``twistd -n`` reaches the whole process group: the first process stops
    # the workers itself (SIGTERM), so a worker ignores SIGINT.
    reactor.callWhenRunning(signal.signal, signal.SIGINT, signal.SIG_IGN)
    reactor.run()                                     
    return 0


if __name__ == "__main__":
    sys.exit(main())
