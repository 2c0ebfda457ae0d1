"""The ``[log]`` section: how the log file of ``twistd --logfile`` rotates.

::

    [log]
    rotate_length = 1000000     # bytes; the file is renamed .1 (.1 -> .2, ...) when it reaches this; 0 = never
    max_rotated_files = 10      # rotated files kept (.1 ... .10), older ones are removed; 0 = keep all

Without ``--logfile`` (standard output under ``twistd -n``, the journal under
systemd) or with ``--syslog`` or ``--logger``, these keys do nothing.

This module imports nothing from Twisted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailguard.config.reader import Reader

DEFAULTS: dict[str, Any] = {"rotate_length": 1_000_000, "max_rotated_files": 10}


@dataclass(frozen=True)
class LogConfig:
    """``rotate_length``: bytes, 0 = never rotate; ``max_rotated_files``: 0 = keep every rotated file."""

    rotate_length: int = 1_000_000
    max_rotated_files: int = 10


def parse(r: Reader) -> LogConfig:
    """Validate ``[log]``."""
    length = r.integer("rotate_length")
    if 0 < length < 10_000:
        raise r.fail("rotate_length", f"{length} bytes would rotate every few lines; "
                                      "give at least 10000, or 0 to never rotate")
    return LogConfig(length, r.integer("max_rotated_files", maximum=100_000))
