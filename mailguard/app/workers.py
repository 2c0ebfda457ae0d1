"""``[server] workers = N``: N reactor processes serving the same listening sockets.

The first process (the one twistd runs) opens every listener as before, while it
may still be root, then starts N-1 workers: each is ``python -m
mailguard.app.worker`` given the listening sockets and one end of a socket pair as
inherited file descriptors.  The kernel hands each new connection to whichever
process accepts it first; the first process serves connections too, runs the queue,
and keeps what the processes share (:mod:`mailguard.app.state`).

A worker that ends is started again (one log line says so; one that keeps dying at
start waits longer each time, up to :data:`MAX_BACKOFF` seconds).  SIGHUP to the
first process reloads it and every worker; stopping it stops the workers first.
A worker's log lines come out in the first process's log, unchanged.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING, Callable

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorSocket, IReactorTime
from twisted.logger import Logger, LogLevel
from twisted.protocols import amp
from twisted.python.failure import Failure

from mailguard.app.limits import Limiter
from mailguard.app.state import Accepted, LoginFailed, PopLogin, StateServer

if TYPE_CHECKING:
    from mailguard.app.service import ListenerService
    from mailguard.auth.authenticator import Authenticator, PopBeforeSmtp

log = Logger(namespace="mailguard")

#: The worker's end of its socket pair to the first process.
STATE_FD = 3
#: The first inherited listening socket; the others follow in the order of ``[listen]``.
FIRST_LISTENER_FD = 4
#: The longest wait before starting again a worker that keeps dying.
MAX_BACKOFF = 30.0
#: A worker that lived this long had started well: the next one starts at once.
HEALTHY_AFTER = 10.0
#: Seconds a stopping worker gets before it is killed.
STOP_GRACE = 20.0


class Handing(protocol.ServerFactory):
    """Hands one ready protocol to ``adoptStreamConnection``."""

    def __init__(self, proto: protocol.Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: object) -> protocol.Protocol:
        return self.proto


class WorkerProcess(protocol.ProcessProtocol):
    """One worker: its log lines relayed, its end reported to the pool."""

    def __init__(self, pool: WorkerPool, slot: int) -> None:
        self.pool = pool
        self.slot = slot
        self.pid = 0
        self.started = 0.0
        self.ended: Deferred[None] = Deferred()
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        lines = (self._partial.get(childFD, b"") + data).split(b"\n")
        self._partial[childFD] = lines.pop()
        for line in lines:
            self._relay(childFD, line.decode("utf-8", "replace"))

    def _relay(self, fd: int, line: str) -> None:
        """A worker writes ``namespace#level text`` (see :mod:`mailguard.app.worker`); anything else is an error."""
        head, _, text = line.partition(" ")
        namespace, _, level_name = head.partition("#")
        try:
            level = LogLevel.levelWithName(level_name)
        except Exception:
            namespace, level, text = "mailguard", LogLevel.error, f"mailguard worker {self.pid}: {line}"
        Logger(namespace=namespace or "mailguard").emit(level, "{line}", line=text)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._relay(fd, rest.decode("utf-8", "replace"))
        self.ended.callback(None)
        self.pool.ended(self, reason)


class WorkerPool(service.Service):
    """Starts ``count`` workers on the sockets of ``listeners`` and keeps them running.

    :param limiter_for: the first process's limiter of a listener kind.
    :param wake: runs the queue now.
    :param pop_before_smtp: records logins; its ``share`` is set to tell the workers.
    :param config_path: the configuration file the workers read (None: the built-in defaults).
    """

    def __init__(self, reactor: object, count: int, listeners: list[ListenerService],
                 limiter_for: Callable[[str], Limiter], wake: Callable[[], None],
                 config_path: str | None) -> None:
        self.reactor = reactor
        self.count = count
        self.listeners = listeners
        self.limiter_for = limiter_for
        self.wake = wake
        self.config_path = config_path
        self.cwd = os.getcwd()              # a relative data_dir means the same folder in every process
        self.workers: dict[int, tuple[WorkerProcess, IProcessTransport]] = {}
        self.servers: list[StateServer] = []
        self.backoff = [0.0] * count

    def startService(self) -> None:
        service.Service.startService(self)
        IReactorTime(self.reactor).callLater(0, self._start_all)

    def _start_all(self) -> None:
        for slot in range(self.count):
            if self.running and slot not in self.workers:
                self.spawn(slot)

    def spawn(self, slot: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds: dict[int, int | str] = {0: "w", 1: "r", 2: "r", STATE_FD: theirs.fileno()}
        for i, listener in enumerate(self.listeners):
            if listener.port is None:
                raise RuntimeError(f"{listener.description} is not open")
            child_fds[FIRST_LISTENER_FD + i] = listener.port.fileno()     # type: ignore[attr-defined]
        args = [sys.executable, "-m", "mailguard.app.worker", "--listeners", str(len(self.listeners))]
        if self.config_path is not None:
            args += ["--config", self.config_path]
        proc = WorkerProcess(self, slot)
        proc.started = IReactorTime(self.reactor).seconds()
        try:
            transport = IReactorProcess(self.reactor).spawnProcess(
                proc, sys.executable, args, env=self.environment(), path=self.cwd, childFDs=child_fds)
        finally:
            theirs.close()
        proc.pid = transport.pid or 0
        self.workers[slot] = (proc, transport)
        server = StateServer(self.limiter_for, self.wake, self.told, self.servers.remove)
        self.servers.append(server)
        IReactorSocket(self.reactor).adoptStreamConnection(ours.fileno(), socket.AF_UNIX, Handing(server))
        ours.close()
        log.info("mailguard worker started: pid={pid}", pid=proc.pid)

    @staticmethod
    def environment() -> dict[str, str]:
        """This process's environment, less systemd's socket variables (a worker's sockets are its own)."""
        return {k: v for k, v in os.environ.items() if k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}

    def ended(self, proc: WorkerProcess, reason: Failure) -> None:
        if self.workers.get(proc.slot, (None,))[0] is proc:
            del self.workers[proc.slot]
        if not self.running:
            return
        lived = IReactorTime(self.reactor).seconds() - proc.started
        wait = 0.0 if lived >= HEALTHY_AFTER else min(MAX_BACKOFF, max(0.5, self.backoff[proc.slot] * 2))
        self.backoff[proc.slot] = wait
        log.error("mailguard worker ended: pid={pid} ({why}); starting another in {wait:g} s",
                  pid=proc.pid, why=reason.getErrorMessage(), wait=wait)
        IReactorTime(self.reactor).callLater(wait, self._start_all)

    def told(self, source: StateServer | None, command: type[amp.Command], arguments: dict[str, str]) -> None:
        """One process's POP3 login, failed login or rate-counted message: recorded here (unless it happened here),
        and told to every worker but the one it came from."""
        if source is not None and self.host_auth is not None and self.host_pop is not None:
            if command is PopLogin:
                self.host_pop.learn(arguments["ip"])
            elif command is LoginFailed:
                self.host_auth.learn_failure(arguments["client"], arguments["login"])
            elif command is Accepted and self.host_accepted is not None:
                self.host_accepted(arguments["window"], arguments["key"])
        for server in self.servers:
            if server is not source:
                server.callRemote(command, **arguments)  # type: ignore[no-untyped-call]

    #: The first process's own records (set by the host).
    host_pop: PopBeforeSmtp | None = None
    host_auth: Authenticator | None = None
    host_accepted: Callable[[str, str], None] | None = None

    def signal_all(self, name: str) -> None:
        for _proc, transport in list(self.workers.values()):
            try:
                transport.signalProcess(name)
            except OSError:
                pass
            except Exception:            # ProcessExitedAlready
                pass

    def stopService(self) -> Deferred[object]:
        service.Service.stopService(self)
        waiting = [proc.ended for proc, _t in self.workers.values()]
        self.signal_all("TERM")
        late = IReactorTime(self.reactor).callLater(STOP_GRACE, self.signal_all, "KILL")

        def done(result: object) -> object:
            if late.active():
                late.cancel()
            return result
        return DeferredList(waiting).addBoth(done)


def listener_fds(count: int) -> list[int]:
    """The inherited listening sockets of a worker, in the order of ``[listen]``."""
    return [FIRST_LISTENER_FD + i for i in range(count)]
