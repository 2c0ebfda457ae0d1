"""SIGHUP (or ``mailguard reload``): the whole configuration read again and used for new connections.

A reload is atomic.  First the file is parsed and validated, and everything built
from it (the TLS certificate, the DKIM signer, the milter chain) is made; a
configuration that fails any of this is refused with one log line, and the running
one stays as it was.  Then, in one reactor turn, the listeners' factories get a new
:class:`~mailguard.smtp.context.SMTPContext` and the shared parts (store, queue
runner, login throttling, connection limits, POP-before-SMTP, TLS) the new values.

A session keeps the context it started with: a client in the middle of a transaction
is judged by one configuration from its banner to its QUIT.  Counters (connections,
failed logins, POP-before-SMTP windows) carry over.

What a reload cannot change without dropping connections or moving data keeps its
running value and is logged as needing a restart: ``[listen]``, ``[directory]``,
``[dns]``, ``[metrics]`` and ``[log]``.  A changed ``server.data_dir`` refuses the reload.

The running server's process id is in ``data_dir/mailguard.pid`` (written at start,
removed at a clean stop), which is how ``mailguard reload`` finds it.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from OpenSSL import SSL
from twisted.logger import Logger

from mailguard import config
from mailguard.app.limits import ConnectionLimiter
from mailguard.checks.pipeline import InboundChecks
from mailguard.config import Config
from mailguard.dkim.outgoing import Outgoing
from mailguard.milter.chain import MilterChain

if TYPE_CHECKING:
    from mailguard.app.service import Mailhost

log = Logger(namespace="mailguard")

PIDFILE = "mailguard.pid"

#: Sections a running server keeps until it restarts (listening sockets, the open directory, the resolver).
NEEDS_RESTART = ("listen", "directory", "dns", "metrics", "log")


class ReloadError(Exception):
    """A new configuration that cannot be used; ``str()`` is the one-line reason."""


def restart_keys(old: Config, new: Config) -> list[str]:
    """The sections of :data:`NEEDS_RESTART` whose values differ between ``old`` and ``new``."""
    return [name for name in NEEDS_RESTART if getattr(old, name) != getattr(new, name)]


@dataclasses.dataclass
class Staged:
    """A new configuration and what was built from it, ready to be put in place at once."""

    cfg: Config
    restart: list[str]
    tls: Any
    outgoing: Outgoing
    milters: MilterChain | None
    checks: InboundChecks | None = None


class Reloader:
    """Reloads ``source`` into ``host`` (a :class:`~mailguard.app.service.Mailhost`).

    :param source: the configuration file the server started from, or None for the
        built-in defaults (then only the certificate files are read again).
    """

    def __init__(self, host: Mailhost, source: Path | None,
                 load: Callable[[Path], Config] = config.load) -> None:
        self.host = host
        self.source = source.resolve() if source is not None else None   # before a daemon's chdir
        self.load = load
        #: Called at each reload before this process's own (``[server] workers``: signal the workers).
        self.followers: list[Callable[[], None]] = []

    def stage(self) -> Staged:
        """Read and validate the file and build what depends on it; change nothing.

        :raises ReloadError: with the one-line reason.
        """
        old = self.host.cfg
        if self.source is None:
            new = old
        else:
            try:
                new = self.load(self.source)
            except config.ConfigError as e:
                raise ReloadError(str(e)) from None
        if new.server.data_dir.resolve() != old.server.data_dir.resolve():
            raise ReloadError(f"{new.source}: server.data_dir: changed from {old.server.data_dir} to "
                              f"{new.server.data_dir}; that needs a restart")
        restart = restart_keys(old, new)
        if new.server.workers != old.server.workers:
            restart.append("server.workers")
            new = dataclasses.replace(new, server=dataclasses.replace(new.server, workers=old.server.workers))
        if restart:
            new = dataclasses.replace(new, **{name: getattr(old, name) for name in restart if name in NEEDS_RESTART})
        try:
            tls = self.host.tls.staged(new)
        except (OSError, ValueError, SSL.Error) as e:
            raise ReloadError(f"{new.source}: tls: {e}") from None
        milters = self.host.smtp_context.milters
        if new.filters != old.filters:
            f = new.filters
            milters = MilterChain(self.host.reactor, f.milters, f.milter_default_action, float(f.milter_timeout))
        checks = InboundChecks(new, self.host.resolver, self.host.clock)
        return Staged(new, restart, tls, Outgoing(new), milters, checks)

    def apply(self, staged: Staged) -> None:
        """Put ``staged`` in place for new connections (one reactor turn: nothing sees half of it)."""
        host, new = self.host, staged.cfg
        host.cfg = new
        host.tls.use(staged.tls)
        if staged.checks is not None:
            staged.checks.carry_over(host.checks)
            host.checks = staged.checks
        ctx = dataclasses.replace(host.smtp_context, cfg=new, outgoing=staged.outgoing, milters=staged.milters,
                                  checks=host.checks)
        host.smtp_context = ctx
        for factory in host.smtp_factories:
            factory.ctx = ctx
        pop3_limiter = host.pop3_factory.limiter if host.pop3_factory is not None else None
        for limiter in (host.limiter, ctx.submission_limiter, pop3_limiter):
            if isinstance(limiter, ConnectionLimiter):       # a worker's remote ones follow the first process
                limiter.total_limit = new.limits.max_connections
                limiter.per_ip_limit = new.limits.max_connections_per_ip
        if ctx.memory is not None:
            ctx.memory.limit = new.limits.memory_budget
        if host.pop3_factory is not None:
            host.pop3_factory.config = new
        host.authenticator.configure(new.limits)
        host.pop_before_smtp.window = new.relay.pop_before_smtp
        host.store.cfg = new
        if host.runner is not None:
            host.runner.reconfigure(new)

    def reload(self) -> bool:
        """Stage and apply; log one line either way.  True when the new configuration is in use."""
        for follow in self.followers:
            follow()
        try:
            staged = self.stage()
        except ReloadError as e:
            log.error("{line}", line=f"mailguard reload refused, the running configuration stays: {e}")
            return False
        self.apply(staged)
        line = f"mailguard reload: {staged.cfg.source} in use for new connections"
        if staged.restart:
            line += f"; changed [{'], ['.join(staged.restart)}] kept until a restart"
        log.info("{line}", line=line)
        return True


def install_sighup(reloader: Reloader, call_from_thread: Callable[..., None]) -> None:
    """Reload on SIGHUP (the reload itself runs on the reactor thread)."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: call_from_thread(reloader.reload))


def write_pidfile(data_dir: Path) -> Path:
    """Write this process's id to ``data_dir/mailguard.pid``."""
    path = data_dir / PIDFILE
    tmp = path.with_name(PIDFILE + ".tmp")
    tmp.write_text(f"{os.getpid()}\n", encoding="ascii")
    os.replace(tmp, path)
    return path


def remove_pidfile(data_dir: Path) -> None:
    """Remove ``data_dir/mailguard.pid`` when it is this process's."""
    path = data_dir / PIDFILE
    try:
        if path.read_text(encoding="ascii").strip() == str(os.getpid()):
            path.unlink()
    except (OSError, ValueError):
        pass


def running_pid(data_dir: Path) -> int:
    """The process id of the server running on ``data_dir``.

    :raises ReloadError: no pidfile, a damaged one, or no such process any more.
    """
    path = data_dir / PIDFILE
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ReloadError(f"no {path}: mailguard is not running on this data folder") from None
    except OSError as e:
        raise ReloadError(f"cannot read {path}: {e.strerror}") from None
    if not text.isdigit():
        raise ReloadError(f"{path} does not hold a process id")
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ReloadError(f"mailguard is not running (process {pid} from {path} is gone)") from None
    except PermissionError:
        pass                          # it runs as another user: the signal itself will say
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        if b"mailguard" not in cmdline.read_bytes():
            raise ReloadError(f"process {pid} from {path} is not mailguard (a stale pidfile)")
    except OSError as e:
        if e.errno not in (errno.ENOENT, errno.EACCES):
            raise
    return pid


def signal_reload(data_dir: Path) -> int:
    """Send SIGHUP to the server running on ``data_dir``; its process id.

    :raises ReloadError: not running, or not ours to signal.
    """
    pid = running_pid(data_dir)
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        raise ReloadError(f"not allowed to signal process {pid} (run as root or the service user)") from None
    except ProcessLookupError:
        raise ReloadError(f"mailguard is not running (process {pid} is gone)") from None
    return pid
