"""What the processes of ``[server] workers`` share, kept by the first process.

The first process (the one twistd started) owns the connection counts of every
listener kind and the POP-before-SMTP record; each worker talks to it over one AMP
connection on a socket pair made when the worker is started (:class:`StateServer`
at the first process's end, :class:`StateClient` at the worker's).

- Connection limits: a worker's :class:`RemoteLimiter` asks ``Admit`` and tells
  ``Release``; the first process counts in the same
  :class:`~mailguard.app.limits.ConnectionLimiter` its own listeners use, so the
  limits hold over all processes together.  What a worker held is released when its
  connection to the first process ends (the worker died).
- POP-before-SMTP, login throttling and rate control: a POP3 login, a failed
  login or a message counted by ``[limits] messages_per_*`` in any process is told to the first one, which tells every other worker; each process
  then decides from its own copy, at once, as with one process.
- Queue: a worker that queued a message wakes the queue runner, which runs in the
  first process only.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from mailguard.app.limits import TOTAL, Limiter

if TYPE_CHECKING:
    from mailguard.auth.authenticator import Authenticator, PopBeforeSmtp

log = Logger(namespace="mailguard")


class Admit(amp.Command):
    """Count a connection of listener ``kind`` from ``ip``; ``over`` names the limit that refuses it, or is empty."""

    arguments = [(b"kind", amp.Unicode()), (b"ip", amp.Unicode())]
    response = [(b"over", amp.Unicode())]


class Release(amp.Command):
    """One connection admitted by :class:`Admit` ended."""

    arguments = [(b"kind", amp.Unicode()), (b"ip", amp.Unicode())]
    requiresAnswer = False


class Wake(amp.Command):
    """A message was queued: run the queue now."""

    requiresAnswer = False


class PopLogin(amp.Command):
    """A POP3 login from ``ip`` (POP-before-SMTP), told to the first process and from it to the others."""

    arguments = [(b"ip", amp.Unicode())]
    requiresAnswer = False


class LoginFailed(amp.Command):
    """A failed login of ``login`` from ``client`` (login throttling), told like :class:`PopLogin`."""

    arguments = [(b"client", amp.Unicode()), (b"login", amp.Unicode())]
    requiresAnswer = False


class Accepted(amp.Command):
    """A message counted by rate control: ``window`` is ``ip`` or ``user``; told like :class:`PopLogin`."""

    arguments = [(b"window", amp.Unicode()), (b"key", amp.Unicode())]
    requiresAnswer = False


#: Told by one process to all: the commands that :meth:`StateServer.told` passes on.
Told = Callable[["StateServer | None", type[amp.Command], dict[str, str]], None]


class StateServer(amp.AMP):
    """The first process's end of one worker's connection."""

    def __init__(self, limiter_for: Callable[[str], Limiter], wake: Callable[[], None], told: Told,
                 gone: Callable[[StateServer], None]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.limiter_for = limiter_for
        self.wake = wake
        self.told = told
        self.gone = gone
        self.held: Counter[tuple[str, str]] = Counter()

    @Admit.responder
    def admit(self, kind: str, ip: str) -> dict[str, Any]:
        over = self.limiter_for(kind).admit(ip)
        if isinstance(over, Deferred):       # only local limiters live here
            raise TypeError("the first process counts locally")
        if over is None:
            self.held[(kind, ip)] += 1
        return {"over": over or ""}

    @Release.responder
    def release(self, kind: str, ip: str) -> dict[str, Any]:
        if self.held[(kind, ip)] > 0:
            self.held[(kind, ip)] -= 1
            if not self.held[(kind, ip)]:
                del self.held[(kind, ip)]
            self.limiter_for(kind).release(ip)
        return {}

    @Wake.responder
    def wake_runner(self) -> dict[str, Any]:
        self.wake()
        return {}

    @PopLogin.responder
    def pop_logged_in(self, ip: str) -> dict[str, Any]:
        self.told(self, PopLogin, {"ip": ip})
        return {}

    @LoginFailed.responder
    def login_failed(self, client: str, login: str) -> dict[str, Any]:
        self.told(self, LoginFailed, {"client": client, "login": login})
        return {}

    @Accepted.responder
    def message_accepted(self, window: str, key: str) -> dict[str, Any]:
        self.told(self, Accepted, {"window": window, "key": key})
        return {}

    def connectionLost(self, reason: Failure) -> None:      # type: ignore[override]
        held, self.held = self.held, Counter()
        for (kind, ip), n in held.items():
            for _ in range(n):
                self.limiter_for(kind).release(ip)
        self.gone(self)
        super().connectionLost(reason)  # type: ignore[no-untyped-call]


class StateClient(amp.AMP):
    """A worker's end: asks the first process, and learns the POP3 logins of the others."""

    def __init__(self, lost: Callable[[], None]) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.lost = lost
        self.pop_before_smtp: PopBeforeSmtp | None = None
        self.authenticator: Authenticator | None = None
        #: Counts a message another process accepted (rate control).
        self.accepted: Callable[[str, str], None] | None = None

    @PopLogin.responder
    def pop_logged_in(self, ip: str) -> dict[str, Any]:
        if self.pop_before_smtp is not None:
            self.pop_before_smtp.learn(ip)
        return {}

    @LoginFailed.responder
    def login_failed(self, client: str, login: str) -> dict[str, Any]:
        if self.authenticator is not None:
            self.authenticator.learn_failure(client, login)
        return {}

    @Accepted.responder
    def message_accepted(self, window: str, key: str) -> dict[str, Any]:
        if self.accepted is not None:
            self.accepted(window, key)
        return {}

    def tell(self, command: type[amp.Command], **arguments: str) -> None:
        """Send a command that has no answer; a worker cut off from the first process stops anyway."""
        if self.transport is not None:
            self.callRemote(command, **arguments)  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:      # type: ignore[override]
        super().connectionLost(reason)  # type: ignore[no-untyped-call]
        self.lost()


class RemoteLimiter:
    """A listener kind's connection counts, kept by the first process."""

    def __init__(self, client: StateClient, kind: str) -> None:
        self.client = client
        self.kind = kind

    def admit(self, ip: str) -> Deferred[str | None]:
        d: Deferred[dict[str, Any]] = self.client.callRemote(Admit, kind=self.kind, ip=ip)  # type: ignore[no-untyped-call]

        def answered(result: dict[str, Any]) -> str | None:
            return str(result["over"]) or None

        def failed(failure: Failure) -> str:
            log.error("mailguard worker: the first process did not count a connection: {why}",
                      why=failure.getErrorMessage())
            return TOTAL
        return d.addCallbacks(answered, failed)

    def release(self, ip: str) -> None:
        self.client.tell(Release, kind=self.kind, ip=ip)
