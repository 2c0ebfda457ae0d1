"""Log lines written once per reactor turn (mailguard.app.logwriter)."""

from __future__ import annotations

import io
from typing import Any, Callable

import pytest
from twisted.internet import task
from twisted.logger import Logger, LogLevel, LogPublisher, formatTime, textFileLogObserver
from twisted.python import threadable
from twisted.python.failure import Failure

from mailguard.app.logwriter import LineWriter


class Reactor(task.Clock):
    """A clock with what the writer uses of a reactor: running, callFromThread, system event triggers."""

    def __init__(self, running: bool = True) -> None:
        super().__init__()
        self.running = running
        self.from_threads: list[Callable[[], None]] = []
        self.triggers: list[tuple[str, str, Callable[[], None]]] = []

    def callFromThread(self, f: Callable[[], None]) -> None:
        self.from_threads.append(f)

    def addSystemEventTrigger(self, phase: str, event: str, f: Callable[[], None]) -> None:
        self.triggers.append((phase, event, f))


class Out(io.StringIO):
    """Standard output that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def events() -> list[dict[str, Any]]:
    """A mail log line, a formatted twistd line, a line with a traceback, a legacy system line."""
    seen: list[dict[str, Any]] = []
    publisher = LogPublisher(seen.append)
    log = Logger(namespace="mailguard", observer=publisher)
    log.info("{line}", line="mailguard smtp stored: client=192.0.2.7 id=X1 size=10")
    log.warn("{line}", line="two\nlines")
    try:
        1 / 0
    except ZeroDivisionError:
        log.failure("boom {n}", failure=Failure(), n=3)
    log.emit(LogLevel.info, "{line}", line="legacy", log_system="-")
    for n, event in enumerate(seen):
        event["log_time"] = 1_700_000_000.25 + n * 0.5          # two lines share each second
    return seen


@pytest.fixture
def io_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threadable, "isInIOThread", lambda: True)


def test_lines_are_those_of_twistd_written_once_per_turn(io_thread: None) -> None:
    """The same text as twistd's own file observer, in one write at the end of the turn, not before."""
    reactor, out = Reactor(), Out()
    writer = LineWriter(out, reactor)
    expected = io.StringIO()
    twistd_observer = textFileLogObserver(expected)
    for event in events():
        writer(event)
        twistd_observer(event)
    assert out.getvalue() == "" and out.writes == 0
    reactor.advance(0)
    assert out.getvalue() == expected.getvalue()
    assert out.writes == 1
    first, second = formatTime(1_700_000_000), formatTime(1_700_000_001)
    assert [line for line in out.getvalue().splitlines() if not line.startswith("\t")] == [
        f"{first} [mailguard#info] mailguard smtp stored: client=192.0.2.7 id=X1 size=10",
        f"{first} [mailguard#warn] two",
        f"{second} [mailguard#critical] boom 3",
        f"{second} [-] legacy"]


def test_lines_go_out_at_once_when_the_reactor_is_not_running(io_thread: None) -> None:
    """Before the reactor runs (start-up errors) and after it stops, nothing waits."""
    reactor, out = Reactor(running=False), Out()
    writer = LineWriter(out, reactor)
    writer(events()[0])
    assert out.getvalue().endswith("[mailguard#info] mailguard smtp stored: client=192.0.2.7 id=X1 size=10\n")
    assert reactor.getDelayedCalls() == []


def test_a_line_from_a_thread_is_handed_to_the_reactor(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread's line is written by the reactor thread (one hand-off for all lines of the turn)."""
    monkeypatch.setattr(threadable, "isInIOThread", lambda: False)
    reactor, out = Reactor(), Out()
    writer = LineWriter(out, reactor)
    for event in events()[:2]:
        writer(event)
    assert out.getvalue() == "" and len(reactor.from_threads) == 1
    reactor.from_threads[0]()
    assert out.getvalue().count("\n") == 3 and out.writes == 1


def test_shutdown_writes_what_is_kept(io_thread: None) -> None:
    """The shutdown's last step writes the lines of a turn that will not end."""
    reactor, out = Reactor(), Out()
    writer = LineWriter(out, reactor)
    writer(events()[0])
    [(phase, event, flush)] = reactor.triggers
    assert (phase, event) == ("after", "shutdown")
    flush()
    assert "id=X1" in out.getvalue()


def test_a_closed_output_loses_lines_not_the_process(io_thread: None) -> None:
    """Writing to a closed stream is not an error that reaches the code that logged."""
    reactor, out = Reactor(), Out()
    writer = LineWriter(out, reactor)
    out.close()
    writer(events()[0])
    reactor.advance(0)
    writer(events()[1])
    reactor.advance(0)
