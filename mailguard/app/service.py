"""The running mail host: every shared part built from one :class:`~mailguard.config.Config`.

:class:`Mailhost` holds what the protocols share (directory, store, authenticator,
POP-before-SMTP record, TLS, connection limits, queue runner) and is a twisted
``MultiService`` whose children are the listeners and the queue runner.  With
``[server] workers`` above 1 it also starts the worker processes
(:mod:`mailguard.app.workers`), each of which builds a ``Mailhost`` of its own with
``worker=``: the first process's sockets adopted, the counts kept by the first
process, no queue runner.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from twisted.application import service
from twisted.internet import endpoints, threads
from twisted.internet.interfaces import (IListeningPort, IProtocolFactory, IReactorCore, IReactorSocket,
                                         IReactorThreads, IReactorTime)
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from mailguard.auth import authenticator as auth
from mailguard.core.srs import SRS
from mailguard.dkim.outgoing import Outgoing
from mailguard.storage import delivery, srskey
from mailguard.config import Config
from mailguard.directory.base import Directory
from mailguard.directory.sqlite import SQLiteDirectory, SQLiteStore
from mailguard.checks.pipeline import InboundChecks
from mailguard.dns import resolver as dns_resolver
from mailguard.storage.groupcommit import GroupCommit
from mailguard.storage.queue import Queue
from mailguard.app import checkconfig, metrics, reload
from mailguard.app.limits import ConnectionLimiter, Limiter
from mailguard.app.state import Accepted, LoginFailed, PopLogin, RemoteLimiter, StateClient, Wake
from mailguard.milter.chain import MilterChain
from mailguard.smtp.quota import MailboxQuotas
from mailguard.storage.usage import Sizes
from mailguard.smtp.server import SMTPContext, SMTPFactory
from mailguard.app.tls import TLSContext

if TYPE_CHECKING:
    from mailguard.outbound.runner import QueueRunner
    from mailguard.app.workers import WorkerPool
    from mailguard.pop3.server import POP3Factory

log = Logger(namespace="mailguard")


class ListenerService(service.Service):
    """Listens on one endpoint description; ``ssl:`` ones get mailguard's certificate.

    The socket is opened in :meth:`privilegedStartService`, which twistd runs before
    it gives up root for ``--uid/--gid`` (port 25 needs root to bind), and which
    runs in the daemon before twistd's parent process returns: a port that cannot be
    had stops start-up with one line on standard error (``-n``) or in the parent's
    error message (daemon mode), and a non-zero exit status.
    """

    def __init__(self, reactor: IReactorCore, description: str, factory: IProtocolFactory,
                 tls: TLSContext | None, daemon: bool = False) -> None:
        self.reactor = reactor
        self.description = description
        self.factory = factory
        self.tls = tls
        self.daemon = daemon
        self.port: IListeningPort | None = None

    def serving_factory(self) -> IProtocolFactory:
        """The factory connections get: for ``ssl:``, TLS around the protocol's."""
        if not self.description.startswith("ssl:"):
            return self.factory
        if self.tls is None:
            raise RuntimeError("ssl: listener without TLS")
        return TLSMemoryBIOFactory(self.tls, False, self.factory)

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)
        desc, factory = self.description, self.serving_factory()
        if desc.startswith("ssl:"):
            desc = checkconfig.under_tls(desc)
        outcome: list[IListeningPort | Failure] = []
        endpoints.serverFromString(self.reactor, desc).listen(factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"listening on {self.description} did not complete at start-up")
        if isinstance(outcome[0], Failure):
            self._failed(outcome[0])
        else:
            self.port = outcome[0]
            log.info("mailguard listening: {desc}", desc=self.description)

    def _failed(self, failure: Failure) -> None:
        error = failure.value
        reason = getattr(getattr(error, "socketError", None), "strerror", None) or failure.getErrorMessage()
        line = f"cannot listen on {self.description}: {reason}"
        if self.daemon:
            # twistd's parent prints the exception of a daemon that failed to start.
            raise RuntimeError(line)
        sys.stderr.write(f"mailguard: {line}\n")
        sys.stderr.flush()
        raise SystemExit(1)

    def stopService(self) -> Deferred[None] | None:
        service.Service.stopService(self)
        if self.port is not None:
            port, self.port = self.port, None
            stopped: Deferred[None] | None = port.stopListening()
            return stopped
        return None


class AdoptedListener(ListenerService):
    """A worker's listener: a socket the first process opened (file descriptor ``fd``), served here too."""

    def __init__(self, reactor: IReactorSocket, fd: int, description: str, factory: IProtocolFactory,
                 tls: TLSContext | None) -> None:
        super().__init__(reactor, description, factory, tls)   # type: ignore[arg-type]
        self.fd = fd

    def privilegedStartService(self) -> None:
        service.Service.privilegedStartService(self)         # the socket is open already

    def startService(self) -> None:
        service.Service.startService(self)
        sock = socket.socket(fileno=self.fd)
        family = sock.family
        sock.detach()
        self.port = self.reactor.adoptStreamPort(self.fd, family, self.serving_factory())  # type: ignore[attr-defined]
        os.close(self.fd)                   # the port holds its own copy


def give_away(data_dir: Path, uid: int, gid: int) -> None:
    """Hand every file and folder under ``data_dir`` to the service user.

    twistd builds the service as root and only then switches to ``--uid/--gid``:
    whatever the start-up made (the data folder, ``directory.sqlite``, the queue,
    the generated certificate, the SRS secret) must belong to the user that will
    write to it.  Only root can do this, and only root needs to.
    """
    if os.geteuid() != 0:
        return
    for root, dirs, files in os.walk(data_dir):
        for name in (root, *(os.path.join(root, n) for n in dirs + files)):
            st = os.lstat(name)
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.lchown(name, uid, gid)


class Mailhost(service.MultiService):
    """Everything the listeners share; start it and mail flows."""

    def __init__(self, cfg: Config, reactor: IReactorCore, *, owner: tuple[int, int] | None = None,
                 daemon: bool = False, worker: tuple[StateClient, list[int]] | None = None) -> None:
        service.MultiService.__init__(self)
        self.cfg = cfg
        #: In a worker of ``[server] workers``: the link to the first process and the inherited
        #: sockets not yet adopted.
        self.worker = worker
        self.listeners: list[ListenerService] = []
        self.pool: WorkerPool | None = None
        self.reactor = reactor
        self.daemon = daemon
        #: The observer twistd logs to instead of its own (set by the plugin for ``--logfile``).
        self.log_observer: ILogObserver | None = None
        self.clock = IReactorTime(reactor)
        self.threads = IReactorThreads(reactor)
        cfg.server.data_dir.mkdir(parents=True, exist_ok=True)
        # Password hashes run on their own two threads: argon2 allocates 19 MiB per check,
        # and each thread's allocator keeps what it once held, so the general pool (20
        # threads) would keep up to 20 times that after a login storm.
        self.hash_pool = ThreadPool(minthreads=0, maxthreads=auth.MAX_PARALLEL_CHECKS, name="mailguard-hash")
        self.directory = self._open_directory(cfg)
        # twistd may fork to daemonize after this: no SQLite connection may cross it.
        self.directory.close()
        self.queue = Queue(cfg.queue_dir)
        self.tls = TLSContext(cfg)
        self.limiter = self._limiter("smtp")
        self.authenticator = auth.Authenticator(self.directory.verify_password, self.clock, cfg.limits)
        self.pop_before_smtp = auth.PopBeforeSmtp(self.clock, cfg.relay.pop_before_smtp)
        # One resolver and one cache for every lookup: outbound MX and the inbound checks.
        self.resolver = dns_resolver.from_config(cfg.dns.servers, cfg.dns.timeout, reactor)
        self.checks = InboundChecks(cfg, self.resolver, self.clock)
        if worker is not None:
            client = worker[0]
            client.pop_before_smtp, client.authenticator = self.pop_before_smtp, self.authenticator
            self.pop_before_smtp.share = lambda ip: client.tell(PopLogin, ip=ip)
            self.authenticator.share = lambda ip, login: client.tell(LoginFailed, client=ip, login=login)
            client.accepted = self._learn_accepted
            self.checks.share = lambda window, key: client.tell(Accepted, window=window, key=key)
        self.runner = self._queue_runner() if worker is None else None
        cfg.mail_dir.mkdir(parents=True, exist_ok=True)
        self.commit = GroupCommit(self.threads, cfg.mail_dir)
        filters = cfg.filters
        self.milters = MilterChain(reactor, filters.milters, filters.milter_default_action,
                                   float(filters.milter_timeout), max_message_size=cfg.limits.max_message_size)
        self.srs = SRS(srskey.load_or_create(cfg.server.data_dir / "srs.key"))
        self.sizes = Sizes()            # mailbox usage, kept up to date by the store's deliveries
        self.store = delivery.Store(cfg, self.directory, self.queue, wake=self._wake, commit=self.commit,
                                    srs=self.srs, sizes=self.sizes)
        if self.runner is not None:
            service.Service.setServiceParent(self.runner, self)
        self.smtp_factories: list[SMTPFactory] = []
        self.pop3_factory: POP3Factory | None = None
        self._listen()
        source = Path(cfg.source)
        self.reloader = reload.Reloader(self, source if source.is_file() else None)
        if worker is None and cfg.server.workers > 1:
            self._start_workers(str(source.resolve()) if source.is_file() else None)
        if owner is not None and worker is None:
            give_away(cfg.server.data_dir, *owner)

    def _open_directory(self, cfg: Config) -> Directory:
        """The directory backend named by ``[directory] backend``."""
        if cfg.directory.backend == "sqlite":
            store = self._open_sqlite(cfg)
            if not store.ready:
                log.error("mailguard directory: {path} cannot be opened now (locked?); recipients get "
                          "the directory_failure reply until it can", path=str(cfg.directory.path))
            return SQLiteDirectory(store, self.threads, self.hash_pool)
        if cfg.directory.backend == "ldap" and cfg.directory.ldap is not None:
            from mailguard.directory.ldap import LDAPDirectory
            return LDAPDirectory(cfg.directory.ldap, self.reactor, cfg.inbound_domains())
        raise ValueError(f"directory.backend: unknown backend {cfg.directory.backend!r}")

    @staticmethod
    def _open_sqlite(cfg: Config) -> SQLiteStore:
        """The SQLite store; an empty one is made only for a new installation.

        When ``directory.sqlite`` is missing but mailboxes exist on disk, the file was
        lost: making an empty one would bounce every local user's mail with 550.  The
        server then answers the 4xx directory_failure until the file is restored (or
        made anew with ``mailguard user add``).
        """
        path = cfg.directory.path
        if not path.exists() and cfg.mail_dir.is_dir() and any(cfg.mail_dir.iterdir()):
            log.error("mailguard directory: {path} is missing but {mail} holds mailboxes; answering "
                      "directory_failure until it is restored", path=str(path), mail=str(cfg.mail_dir))
            return SQLiteStore(path, create=False)
        return SQLiteStore(path)

    def _limiter(self, kind: str) -> Limiter:
        """Connection counts of a listener kind: here, or in the first process for a worker."""
        if self.worker is not None:
            return RemoteLimiter(self.worker[0], kind)
        return ConnectionLimiter(self.cfg.limits.max_connections, self.cfg.limits.max_connections_per_ip)

    def _learn_accepted(self, window: str, key: str) -> None:
        self.checks.learn_accepted(window, key, self.clock.seconds())

    def _start_workers(self, config_path: str | None) -> None:
        from mailguard.app.workers import WorkerPool

        def limiter_for(kind: str) -> Limiter:
            if kind.startswith("pop3") and self.pop3_factory is not None:
                return self.pop3_factory.limiter
            return self.smtp_context.limiter_for(kind)
        self.pool = WorkerPool(self.reactor, self.cfg.server.workers - 1, self.listeners, limiter_for,
                               self._wake, config_path)
        self.pool.host_pop, self.pool.host_auth = self.pop_before_smtp, self.authenticator
        pool = self.pool
        self.pop_before_smtp.share = lambda ip: pool.told(None, PopLogin, {"ip": ip})
        self.authenticator.share = lambda ip, login: pool.told(None, LoginFailed, {"client": ip, "login": login})
        self.pool.host_accepted = self._learn_accepted
        self.checks.share = lambda window, key: pool.told(None, Accepted, {"window": window, "key": key})
        self.reloader.followers.append(lambda: pool.signal_all("HUP"))
        service.Service.setServiceParent(self.pool, self)

    def _queue_runner(self) -> QueueRunner:
        from mailguard.outbound.runner import QueueRunner
        return QueueRunner(self.cfg, self.queue, self.clock, self._inject, self.resolver,
                           local=self._deliver_local)

    def _inject(self, sender: str, recipients: list[str], message: bytes, msg_id: str) -> Deferred[str | None]:
        return self.store.inject(sender, recipients, message, msg_id)

    def _deliver_local(self, sender: str, mailboxes: list[str], message: bytes) -> Deferred[list[str]]:
        return self.store.deliver_local(sender, mailboxes, message)

    def _in_pool(self, f: Callable[[], list[int]]) -> Deferred[list[int]]:
        """Run blocking disk work (measuring mailboxes) on the reactor's thread pool."""
        return threads.deferToThreadPool(self.threads, self.threads.getThreadPool(), f)

    def _wake(self) -> None:
        if self.runner is not None:
            self.runner.wake()
        elif self.worker is not None:
            self.worker[0].tell(Wake)

    def _listen(self) -> None:
        listen = self.cfg.listen
        counted = bool(self.cfg.metrics.listen)
        if counted and self.cfg.server.workers > 1:
            metrics.share(self.cfg.server.data_dir / "metrics", first=self.worker is None)
        if counted:
            metrics.install(self.cfg.queue_dir)
        ctx = SMTPContext(cfg=self.cfg, directory=self.directory,
                          store=metrics.TimedStore(self.store) if counted else self.store,
                          authenticator=self.authenticator, pop_before_smtp=self.pop_before_smtp,
                          limiter=self.limiter, tls=self.tls, clock=self.clock, milters=self.milters,
                          outgoing=Outgoing(self.cfg), srs=self.srs, checks=self.checks,
                          quotas=MailboxQuotas(self._in_pool, self.sizes),
                          submission_limiter=self._limiter("submission"))
        self.smtp_context = ctx
        for kind in ("smtp", "submission", "submissions"):
            for desc in getattr(listen, kind):
                factory = SMTPFactory(ctx, kind)
                self.smtp_factories.append(factory)
                served: IProtocolFactory = metrics.Counted(factory, kind) if counted else factory
                self._serve(desc, served)
        self.pop3_factory = pop3_factory = self._pop3_factory()
        for kind in ("pop3", "pop3s"):
            for desc in getattr(listen, kind):
                served = metrics.Counted(pop3_factory, kind) if counted else pop3_factory
                self._serve(desc, served)
        for desc in self.cfg.metrics.listen if self.worker is None else ():
            listener = ListenerService(self.reactor, desc, metrics.site(), None, self.daemon)
            service.Service.setServiceParent(listener, self)

    def _serve(self, desc: str, served: IProtocolFactory) -> None:
        """A mail listener: opened here, or in a worker the first process's socket adopted."""
        listener: service.Service
        if self.worker is not None:
            fds, self.worker = self.worker[1], (self.worker[0], self.worker[1][1:])    # in [listen] order
            listener = AdoptedListener(IReactorSocket(self.reactor), fds[0], desc, served, self.tls)
        else:
            listener = ListenerService(self.reactor, desc, served, self.tls, self.daemon)
            self.listeners.append(listener)
        service.Service.setServiceParent(listener, self)

    def _pop3_factory(self) -> POP3Factory:
        from mailguard.pop3.server import POP3Factory
        factory = POP3Factory(self.cfg, self.authenticator, self.pop_before_smtp, self.tls, clock=self.clock)
        factory.limiter = self._limiter("pop3")
        return factory

    def setServiceParent(self, parent: service.IServiceCollection) -> None:
        """Join twistd's application, handing it :attr:`log_observer` first (its ``ILogObserver``)."""
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)  # type: ignore[no-untyped-call]
        service.MultiService.setServiceParent(self, parent)

    def startService(self) -> None:
        reload.install_sighup(self.reloader, self.threads.callFromThread)
        if self.worker is None:
            reload.write_pidfile(self.cfg.server.data_dir)
        self.threads.suggestThreadPoolSize(20)
        self.hash_pool.start()
        log.info("mailguard starting: hostname={host} data_dir={data}",
                 host=self.cfg.server.hostname, data=str(self.cfg.server.data_dir))
        service.MultiService.startService(self)

    def stopService(self) -> Deferred[None] | None:
        d: Deferred[None] | None = service.MultiService.stopService(self)
        self.commit.stop()
        if self.worker is None:
            reload.remove_pidfile(self.cfg.server.data_dir)
        self.checks.close()
        self.directory.close()
        self.hash_pool.stop()
        return d
