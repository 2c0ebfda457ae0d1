"""The SRS secret: 32 random bytes in ``data_dir/srs.key`` (``0600``), made on first use.

The secret signs rewritten senders (:mod:`mailguard.core.srs`); losing it only
means bounces to addresses rewritten before are refused, so it is made once and
kept, and a backup should include it.  Read at start-up (blocking, before the
reactor runs).
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from mailguard.storage import safeio

SIZE = 32


def load_or_create(path: Path) -> bytes:
    """The secret in ``path``, made (atomically, ``0600``) when there is none."""
    try:
        data = path.read_bytes()
        if len(data) >= 16:
            return data
    except FileNotFoundError:
        pass
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    safeio.unlink_quietly(tmp)      # left by a crash of an earlier process with this pid
    safeio.write_new(tmp, secrets.token_bytes(SIZE))
    try:
        os.link(tmp, path)          # never replaces a secret another process made meanwhile
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    safeio.fsync_dir(path.parent)   # the name is durable too: a crash cannot lose a key in use
    return path.read_bytes()
