"""``[server]``: the host's name, its data folder, the postmaster and the worker processes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mailguard.config.reader import Reader, path_in

#: The most ``[server] workers`` accepts: more processes than this only cost memory.
MAX_WORKERS = 64


@dataclass(frozen=True)
class ServerConfig:
    hostname: str
    data_dir: Path
    postmaster: str
    #: Reactor processes serving the listeners (``[server] workers``; "auto" is the number of cores).
    workers: int = 1


def parse(srv: Reader, base: Path) -> ServerConfig:
    """Read ``[server]``; relative paths are relative to ``base``."""
    hostname = srv.string("hostname").strip()
    if not hostname or any(c.isspace() for c in hostname):
        raise srv.fail("hostname", f"must be a host name, not {hostname!r}")
    return ServerConfig(hostname, path_in(base, srv.string("data_dir")), srv.string("postmaster").lower(),
                        _workers(srv))


def _workers(srv: Reader) -> int:
    """``[server] workers``: a count, or ``"auto"`` for the number of cores."""
    value = srv.get("workers", (int, str))
    if value == "auto":
        return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(value, str) or isinstance(value, bool):
        raise srv.fail("workers", f'must be a number of processes or "auto", not {value!r}')
    return srv.integer("workers", 1, MAX_WORKERS)
