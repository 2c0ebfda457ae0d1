"""Which configuration file is used: ``--config``, ``$MAILGUARD_CONFIG``, ``./etc``, ``/etc/mailguard``.

The first of these that applies wins:

1. ``--config FILE`` (given: it must exist);
2. ``$MAILGUARD_CONFIG`` (set and not empty: it must exist);
3. ``./etc/mailguard.toml`` when that file exists;
4. ``/etc/mailguard/mailguard.toml`` when that file exists.

With none of them, ``twistd mailguard`` runs on the built-in defaults, while the
admin command line stops: it must never make a data folder wherever it happens to
be run (unless ``--defaults`` asks for exactly that).  This module imports nothing
from Twisted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

ENV = "MAILGUARD_CONFIG"
LOCAL = Path("etc/mailguard.toml")
SYSTEM = Path("/etc/mailguard/mailguard.toml")


@dataclass(frozen=True)
class Located:
    """A configuration file and why it was chosen (``--config``, ``$MAILGUARD_CONFIG``, ...)."""

    path: Path
    how: str


def locate(explicit: str | None, environ: Mapping[str, str] | None = None,
           system: Path = SYSTEM) -> Located | None:
    """The configuration file to read, or None when there is none (see the module docstring)."""
    env = os.environ if environ is None else environ
    if explicit:
        return Located(Path(explicit), "--config")
    if env.get(ENV):
        return Located(Path(env[ENV]), f"${ENV}")
    if LOCAL.is_file():
        return Located(LOCAL, "./etc")
    if system.is_file():
        return Located(system, str(system.parent))
    return None


def none_found() -> str:
    """The one-line error of the command line when no file exists."""
    return (f"no configuration file: give --config FILE or set ${ENV}, or create ./{LOCAL} or {SYSTEM} "
            "(--defaults runs on the built-in defaults, data in ./var)")
