"""``mailguard status`` and the directory listings ``alias list``, ``list show LIST``, ``contact list``.

``status`` prints one line per fact and exits 1 when the server is not running or
the directory cannot be read::

    server: running (process 1234)
    listening: smtp tcp:25 (answers)
    queue: 2 message(s), oldest 3h12m (since 2026-12-01 04:00 UTC)
    last delivery error: 451 4.3.0 try later (to <ann@remote.example>, queue id 0641...)
    directory: sqlite /var/lib/mailguard/directory.sqlite, 12 mailbox(es)
    directory: alias sales@office.example -> bob@office.example points at nothing: no mailbox, ...

The ``directory:`` lines after the first name each alias, list member and contact that
points at nothing (:mod:`mailguard.app.dangling`); they do not change the exit status.

A listener is probed with a TCP connection when it is a ``tcp:``/``ssl:`` port;
``systemd:`` and ``unix:`` ones are shown as configured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import time
from pathlib import Path

from mailguard import config
from mailguard.app import dangling, reload
from mailguard.app.checkconfig import LISTENERS
from mailguard.directory.sqlite import DirectoryError, SQLiteStore


def _tcp_target(desc: str) -> tuple[str, int] | None:
    """(host, port) a ``tcp:``/``ssl:`` endpoint listens on, or None for other kinds."""
    parts = desc.split(":")
    if parts[0] not in ("tcp", "ssl") or len(parts) < 2 or not parts[1].isdigit():
        return None
    options = dict(p.partition("=")[::2] for p in parts[2:])
    host = options.get("interface", "") or "127.0.0.1"
    return ("127.0.0.1" if host in ("0.0.0.0", "::") else host), int(parts[1])


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return True
    except OSError:
        return False


def _age(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"


def queue_lines(queue_dir: Path, now: float) -> list[str]:
    """The queue size, the oldest message, and the newest delivery error in it."""
    envelopes = sorted(queue_dir.glob("*.env")) if queue_dir.is_dir() else []
    if not envelopes:
        return ["queue: empty"]
    oldest = int(envelopes[0].name[:13], 16) / 1e6
    since = datetime.datetime.fromtimestamp(oldest, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"queue: {len(envelopes)} message(s), oldest {_age(now - oldest)} (since {since})"]
    latest: tuple[float, str] | None = None
    for env in envelopes:
        try:
            data = json.loads(env.read_bytes())
            changed = env.stat().st_mtime
        except (OSError, ValueError):
            continue
        for r in data.get("recipients", []):
            if r.get("state") in ("deferred", "failed") and r.get("last_reply"):
                line = f"{r['last_reply']} (to <{r.get('address', '')}>, queue id {data.get('id', '')})"
                if latest is None or changed > latest[0]:
                    latest = (changed, line)
    lines.append(f"last delivery error: {latest[1] if latest else 'none'}")
    return lines


def cmd_status(cfg: config.Config, args: argparse.Namespace) -> int:
    """Print the status lines; 1 when the server is not running or the directory is unreadable."""
    healthy = True
    try:
        print(f"server: running (process {reload.running_pid(cfg.server.data_dir)})")
    except reload.ReloadError as e:
        print(f"server: not running ({e})")
        healthy = False
    for kind in LISTENERS:
        for desc in getattr(cfg.listen, kind):
            target = _tcp_target(desc)
            state = "configured" if target is None else ("answers" if _answers(*target) else "NOT ANSWERING")
            print(f"listening: {kind} {desc} ({state})")
    for line in queue_lines(cfg.queue_dir, time.time()):
        print(line)
    if cfg.directory.backend == "ldap":
        from mailguard.app import dircli
        try:
            print(f"directory: {dircli.check_ldap(cfg)}")
        except (DirectoryError, dircli.DirectoryCommandError) as e:
            print(f"directory: UNREACHABLE: {e}")
            healthy = False
    elif not cfg.directory.path.is_file():
        print(f"directory: MISSING: {cfg.directory.path}")
        healthy = False
    else:
        try:
            store = SQLiteStore(cfg.directory.path, create=False)
            print(f"directory: sqlite {cfg.directory.path}, {len(store.mailboxes())} mailbox(es)")
            for entry in dangling.find(cfg, store):
                print(f"directory: {entry.line()}")
        except DirectoryError as e:
            print(f"directory: UNREADABLE: {e}")
            healthy = False
    return 0 if healthy else 1


def print_entries(cfg: config.Config, kind: str, name: str | None = None) -> int:
    """``alias list`` / ``contact list`` (``address -> target``) and ``list show LIST``.

    ``list show``: ``senders: POLICY`` (who may send to it), then its members, one a line.
    """
    store = SQLiteStore(cfg.directory.path)
    rows = store.entries()
    if name is not None:
        found = [detail for address, k, detail in rows if k == "list" and address == name]
        if not found:
            raise DirectoryError(f"no list {name}")
        print(f"senders: {store.list_senders(name)}")
        for member in found[0].split(", "):
            print(member)
        return 0
    for address, k, detail in rows:
        if k == kind:
            print(f"{address} -> {detail}")
    return 0
