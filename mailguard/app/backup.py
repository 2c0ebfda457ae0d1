"""``mailguard backup DEST`` and ``mailguard restore SRC``: a consistent copy, taken while the server runs.

Format
======
A backup is a folder laid out like a data folder::

    MANIFEST.json       {"format": 1, "created": <epoch>, "schema": <PRAGMA user_version>,
                         "mailboxes": N, "messages": N, "queued": N}
    directory.sqlite    the SQLite directory, copied with SQLite's online backup API
    greylist.sqlite     the same, when greylisting has made one
    mail/               every maildir's new/ and cur/ (tmp/ holds unfinished deliveries)
    queue/              every live entry: <id>.msg, then <id>.env
    dkim/               the DKIM keys ([dkim] keys_dir)
    tls/                the self-signed pair mailguard made (a configured certificate is not copied)
    srs.key             the SRS secret (bounces to mail forwarded before the backup still verify)

Why it is consistent while mail flows: the database is copied page by page by
SQLite's backup API inside one read transaction (a file copy of a WAL database can
miss what is only in the ``-wal`` file); a maildir message is a file renamed into
``new/`` whole, and ``new/`` is copied before ``cur/`` so that a message a POP3
client moves meanwhile is found in one of them; a queue entry is copied message
first, envelope last (the order the queue writes them), and an entry whose files
vanish meanwhile was finished and is left out.

``restore`` copies a backup into the configured data folder (and the directory and
DKIM paths), which must be empty or missing unless ``--force``, and refuses while a
server runs on it.  The next start applies any schema migration the database needs.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from mailguard.config import Config
from mailguard.storage import safeio

FORMAT = 1
MANIFEST = "MANIFEST.json"


class BackupError(Exception):
    """A backup or restore that cannot be made; ``str()`` is the one-line reason."""


def _sqlite_copy(src: Path, dst: Path) -> int:
    """Copy a live SQLite database with the online backup API; its ``user_version``."""
    try:
        source = sqlite3.connect(f"file:{src}?mode=ro", uri=True, timeout=10.0)
        try:
            target = sqlite3.connect(dst)
            try:
                source.backup(target)
                version = int(target.execute("PRAGMA user_version").fetchone()[0])
                target.execute("PRAGMA journal_mode=DELETE")
            finally:
                target.close()
        finally:
            source.close()
    except sqlite3.Error as e:
        raise BackupError(f"cannot copy {src}: {e}") from None
    os.chmod(dst, 0o600)
    return version


def _copy_file(src: Path, dst: Path) -> bool:
    """Copy one file (contents, mode, times); False when it vanished meanwhile."""
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        shutil.copy2(src, dst)
    except FileNotFoundError:
        return False
    return True


def _copy_maildirs(mail: Path, dest: Path) -> int:
    """Copy every maildir's new/ then cur/ under ``mail``; the number of messages."""
    count = 0
    if not mail.is_dir():
        return 0
    for root, dirs, _files in os.walk(mail):
        here = Path(root)
        if "new" in dirs and "cur" in dirs:
            for sub in ("new", "cur"):
                (dest / here.relative_to(mail) / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
                (dest / here.relative_to(mail) / "tmp").mkdir(parents=True, exist_ok=True, mode=0o700)
                for entry in sorted((here / sub).iterdir()):
                    if entry.is_file() and _copy_file(entry, dest / entry.relative_to(mail)):
                        count += 1
            dirs[:] = [d for d in dirs if d not in ("new", "cur", "tmp")]
    return count


def _copy_queue(queue: Path, dest: Path) -> int:
    """Copy every live queue entry (message, then envelope); the number copied."""
    if not queue.is_dir():
        return 0
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    count = 0
    for env in sorted(queue.glob("*.env")):
        msg = env.with_suffix(".msg")
        try:
            body, envelope = msg.read_bytes(), env.read_bytes()
        except FileNotFoundError:
            continue                                  # delivered and removed meanwhile
        safeio.write_new(dest / msg.name, body, sync=False)
        safeio.write_new(dest / env.name, envelope, sync=False)
        count += 1
    return count


def _copy_tree(src: Path, dest: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)


def backup(cfg: Config, dest: Path) -> dict[str, Any]:
    """Write a backup of ``cfg``'s data to the new (or empty) folder ``dest``; its manifest."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BackupError(f"{dest} exists and is not an empty folder")
    data = cfg.server.data_dir
    if not data.is_dir():
        raise BackupError(f"no data folder {data}: nothing to back up")
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    manifest: dict[str, Any] = {"format": FORMAT, "created": time.time(), "schema": None}
    if cfg.directory.backend == "sqlite" and cfg.directory.path.is_file():
        manifest["schema"] = _sqlite_copy(cfg.directory.path, dest / "directory.sqlite")
        db = sqlite3.connect(dest / "directory.sqlite")
        try:
            manifest["mailboxes"] = int(db.execute("SELECT count(*) FROM mailboxes").fetchone()[0])
        finally:
            db.close()
    if (data / "greylist.sqlite").is_file():
        _sqlite_copy(data / "greylist.sqlite", dest / "greylist.sqlite")
    manifest["messages"] = _copy_maildirs(cfg.mail_dir, dest / "mail")
    manifest["queued"] = _copy_queue(cfg.queue_dir, dest / "queue")
    _copy_tree(cfg.dkim.keys_dir, dest / "dkim")
    _copy_tree(data / "tls", dest / "tls")
    if (data / "srs.key").is_file():
        _copy_file(data / "srs.key", dest / "srs.key")
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    safeio.syncfs(dest)
    return manifest


def restore(cfg: Config, src: Path, force: bool = False) -> dict[str, Any]:
    """Copy the backup ``src`` into ``cfg``'s data folder; the backup's manifest."""
    try:
        manifest: dict[str, Any] = json.loads((src / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BackupError(f"{src} is not a mailguard backup (no readable {MANIFEST}: {e})") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{src}: backup format {manifest.get('format')!r}, this mailguard reads {FORMAT}")
    data = cfg.server.data_dir
    if data.exists() and any(data.iterdir()) and not force:
        raise BackupError(f"{data} is not empty: restore into a fresh data folder, or give --force")
    data.mkdir(parents=True, exist_ok=True, mode=0o700)
    if (src / "directory.sqlite").is_file():
        if cfg.directory.backend != "sqlite":
            raise BackupError(f"{cfg.source}: directory.backend is {cfg.directory.backend!r}: "
                              "the backup's SQLite directory has nowhere to go")
        cfg.directory.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in ("-wal", "-shm"):
            safeio.unlink_quietly(f"{cfg.directory.path}{stale}")
        _copy_file(src / "directory.sqlite", cfg.directory.path)
    for name in ("greylist.sqlite", "srs.key"):
        if (src / name).is_file():
            _copy_file(src / name, data / name)
    _copy_tree(src / "mail", cfg.mail_dir)
    _copy_tree(src / "queue", cfg.queue_dir)
    _copy_tree(src / "dkim", cfg.dkim.keys_dir)
    _copy_tree(src / "tls", data / "tls")
    safeio.syncfs(data)
    return manifest
