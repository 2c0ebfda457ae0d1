"""The ``[auth]`` section: what the admin command line asks of a new password.

::

    [auth]
    min_password_length = 8     # characters; `user add` and `user passwd` refuse shorter ones

Eight is NIST SP 800-63B's floor for a password a person chooses.  The server
never checks a length at login: a password set before the minimum was raised keeps
working until it is changed.  This module imports nothing from Twisted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailguard.config.reader import Reader

DEFAULTS: dict[str, Any] = {"min_password_length": 8}


@dataclass(frozen=True)
class AuthConfig:
    """``min_password_length``: the fewest characters (code points) a new password may have."""

    min_password_length: int = 8


def parse(r: Reader) -> AuthConfig:
    """Validate ``[auth]``: the minimum is at least 1 (an empty password is never taken)."""
    return AuthConfig(r.integer("min_password_length", 1, 1024))
