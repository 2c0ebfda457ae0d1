"""``[server] workers``: the setting, the shared counts over AMP, and sessions that wait for them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from mailguard import config
from mailguard.app.limits import PER_IP, ConnectionLimiter
from mailguard.app.state import LoginFailed, PopLogin, RemoteLimiter, StateClient, StateServer, Wake
from mailguard.auth.authenticator import Authenticator, PopBeforeSmtp, Throttled
from mailguard.config import ConfigError
from mailguard.core import replies
from mailguard.pop3.server import POP3Factory
from mailguard.storage.poplock import LockTable, MailboxLocked

from conftest import FakeContext, Session, office_config


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "mailguard.toml"
    path.write_text(text, encoding="utf-8")
    return config.load(path)


# -- the setting ----------------------------------------------------------------------------------


def test_workers_default_number_and_auto(tmp_path: Path) -> None:
    assert load(tmp_path, "").server.workers == 1
    assert load(tmp_path, "[server]\nworkers = 3\n").server.workers == 3
    assert load(tmp_path, '[server]\nworkers = "auto"\n').server.workers == max(1, os.cpu_count() or 1)


@pytest.mark.parametrize("value, why", [
    ("0", "must be between 1 and 64, not 0"),
    ("65", "must be between 1 and 64, not 65"),
    ('"many"', "must be a number of processes or \"auto\", not 'many'"),
    ("true", "must be a number of processes or \"auto\", not True"),
])
def test_workers_refuses_what_is_no_count(tmp_path: Path, value: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f"[server]\nworkers = {value}\n")
    assert str(err.value) == f"{tmp_path / 'mailguard.toml'}: server.workers: {why}"


# -- the counts in the first process, asked over AMP ----------------------------------------------


class Pair:
    """A worker's StateClient connected to the first process's StateServer (in memory)."""

    def __init__(self, per_ip: int = 2) -> None:
        self.limiter = ConnectionLimiter(100, per_ip)
        self.woken = 0
        self.told: list[dict[str, str]] = []
        self.gone: list[StateServer] = []
        self.lost = 0

        def wake() -> None:
            self.woken += 1

        def server() -> StateServer:
            return StateServer(lambda kind: self.limiter, wake, lambda _s, cmd, args: self.told.append(args),
                               self.gone.append)

        def client() -> StateClient:
            return StateClient(self._lost)
        self.client, self.server, self.pump = connectedServerAndClient(server, client)
        self.remote = RemoteLimiter(self.client, "smtp")

    def _lost(self) -> None:
        self.lost += 1

    def admit(self, ip: str) -> str | None:
        d = self.remote.admit(ip)
        self.pump.flush()
        return self.result(d)

    @staticmethod
    def result(d: defer.Deferred[Any]) -> Any:
        out: list[Any] = []
        d.addBoth(out.append)
        assert out, "no answer"
        return out[0]


def test_remote_limiter_counts_in_the_first_process() -> None:
    """Admit and release go to the first process's limiter; its refusal comes back as PER_IP."""
    p = Pair(per_ip=2)
    assert [p.admit("192.0.2.1"), p.admit("192.0.2.1"), p.admit("192.0.2.1")] == [None, None, PER_IP]
    assert p.limiter.by_ip == {"192.0.2.1": 2}
    p.remote.release("192.0.2.1")
    p.pump.flush()
    assert p.limiter.by_ip == {"192.0.2.1": 1}
    assert p.admit("192.0.2.1") is None


def test_a_dead_worker_gives_back_what_it_held() -> None:
    """When a worker's connection ends (it died), its connections are released in the first process."""
    p = Pair(per_ip=5)
    for ip in ("192.0.2.1", "192.0.2.1", "192.0.2.2"):
        assert p.admit(ip) is None
    assert p.limiter.total == 3
    p.server.transport.loseConnection()   # type: ignore[union-attr]
    p.pump.flush()
    assert (p.limiter.total, p.limiter.by_ip) == (0, {})
    assert p.gone == [p.server]
    assert p.lost == 1


def test_a_release_not_held_changes_nothing() -> None:
    """A worker cannot release what it was not admitted (a stray or repeated Release)."""
    p = Pair()
    assert p.admit("192.0.2.1") is None
    p.remote.release("192.0.2.9")
    p.remote.release("192.0.2.1")
    p.remote.release("192.0.2.1")
    p.pump.flush()
    assert (p.limiter.total, p.limiter.by_ip) == (0, {})


def test_pop_before_smtp_and_wake_reach_the_first_process() -> None:
    """A worker's POP3 login is told to the first process; one learnt from it is recorded here."""
    p = Pair()
    clock = task.Clock()
    record = PopBeforeSmtp(clock, 600)
    record.share = lambda ip: p.client.tell(PopLogin, ip=ip)
    p.client.pop_before_smtp = record
    record.record("192.0.2.7")
    p.pump.flush()
    assert p.told == [{"ip": "192.0.2.7"}]
    p.server.callRemote(PopLogin, ip="192.0.2.8")
    p.client.tell(Wake)
    p.pump.flush()
    assert record.allowed("192.0.2.8") and p.woken == 1


# -- sessions that wait for the count -------------------------------------------------------------


class Asked:
    """A limiter whose answer comes later, as a worker's does."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred[str | None]] = []
        self.released: list[str] = []

    def admit(self, ip: str) -> defer.Deferred[str | None]:
        d: defer.Deferred[str | None] = defer.Deferred()
        self.pending.append(d)
        return d

    def release(self, ip: str) -> None:
        self.released.append(ip)


def test_smtp_waits_for_the_count_reading_nothing() -> None:
    """No banner, and the socket not read, until the first process answers; then 220 or the 421."""
    asked = Asked()
    h = FakeContext(office_config(), limiter=asked)
    s = Session(h)
    assert s.lines() == [] and s.transport.producerState == "paused"
    asked.pending[0].callback(None)
    assert s.lines()[0].startswith("220 ") and s.transport.producerState == "producing"
    refused = Session(h)
    asked.pending[1].callback(PER_IP)
    assert refused.lines() == [str(replies.TOO_MANY_FROM_IP)] and refused.closed
    s.lose()
    assert asked.released == ["203.0.113.9"]


def test_smtp_client_gone_before_the_answer_is_released() -> None:
    """A client that left while its count was asked for is released when the answer comes."""
    asked = Asked()
    s = Session(FakeContext(office_config(), limiter=asked))
    s.lose()
    asked.pending[0].callback(None)
    assert asked.released == ["203.0.113.9"] and s.lines() == []


def test_pop3_waits_for_the_count(tmp_path: Path) -> None:
    """POP3: the greeting waits for the answer; a session gone before it is released."""
    cfg = config.parse({"server": {"data_dir": str(tmp_path)}}, "test", tmp_path)
    factory = POP3Factory(cfg, None, None, None, clock=task.Clock(), locks=LockTable())  # type: ignore[arg-type]
    asked = Asked()
    factory.limiter = asked
    proto = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 4000))
    t = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 4000))
    proto.makeConnection(t)
    assert t.value() == b"" and t.producerState == "paused"
    asked.pending[0].callback(None)
    assert t.value().startswith(b"+OK ") and t.producerState == "producing"
    gone = factory.buildProtocol(IPv4Address("TCP", "192.0.2.2", 4000))
    gone.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.2", 4000)))
    gone.connectionLost(Failure(ConnectionDone()))
    asked.pending[1].callback(None)
    assert asked.released == ["192.0.2.2"]


# -- the POP3 lock between processes --------------------------------------------------------------


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
"""


def test_lock_holds_against_another_process(tmp_path: Path) -> None:
    """A mailbox locked by another process is MailboxLocked here; free again once that process ends."""
    box = tmp_path / "mail" / "example.com" / "alice"
    box.mkdir(parents=True)
    other = subprocess.Popen([sys.executable, "-c", HOLD, str(box / "mailguard-pop3.lock")],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert other.stdout is not None and other.stdout.readline() == b"held\n"
        locks = LockTable()
        with pytest.raises(MailboxLocked):
            locks.acquire(box)
        assert not locks.held(box)
    finally:
        other.communicate(b"")
    locks.acquire(box)
    assert locks.held(box)
    locks.release(box)


def test_failed_logins_are_counted_by_every_process() -> None:
    """A failed login in a worker is told to the first process; one told by it counts here."""
    p = Pair()
    clock = task.Clock()
    limits = office_config(limits={"login_failures": 1}).limits
    auth = Authenticator(lambda login, password: None, clock, limits)
    p.client.authenticator = auth
    auth.share = lambda ip, login: p.client.tell(LoginFailed, client=ip, login=login)
    checked = auth.check("a@example.com", "wrong", "192.0.2.7", "pop3")
    clock.advance(0)
    assert Pair.result(checked) is None
    p.pump.flush()
    assert p.told == [{"client": "192.0.2.7", "login": "a@example.com"}]
    p.server.callRemote(LoginFailed, client="192.0.2.7", login="a@example.com")
    p.server.callRemote(LoginFailed, client="192.0.2.7", login="a@example.com")
    p.pump.flush()
    assert auth.by_ip.count("192.0.2.7") == 3
    with pytest.raises(Throttled):
        auth.delay_for("a@example.com", "192.0.2.7")
