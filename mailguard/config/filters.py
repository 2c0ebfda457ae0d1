"""``[filters]``: the content filters (milters) mail passes before it is stored.

Format
======
::

    [filters]
    milters = []                        # "inet:HOST:PORT" | "unix:PATH", called in order
    milter_default_action = "tempfail"  # a milter unreachable, timed out or speaking nonsense:
                                        # "tempfail" | "accept" | "reject"
    milter_timeout = 30                 # seconds per milter reply (and to connect)
    for_trusted = false                 # true: also filter mail from trusted clients

This module imports nothing from Twisted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailguard.config.reader import Reader
from mailguard.milter.codec import parse_address

DEFAULT_ACTIONS = ("tempfail", "accept", "reject")

DEFAULTS: dict[str, Any] = {
    "milters": [],
    "milter_default_action": "tempfail",
    "milter_timeout": 30,
    "for_trusted": False,
}


@dataclass(frozen=True)
class FiltersConfig:
    milters: tuple[str, ...] = ()
    milter_default_action: str = "tempfail"
    milter_timeout: int = 30
    for_trusted: bool = False


def parse(reader: Reader) -> FiltersConfig:
    """Validate the ``[filters]`` table; errors name ``filters.KEY``."""
    milters = tuple(reader.each("milters", _milter))
    action = reader.string("milter_default_action")
    if action not in DEFAULT_ACTIONS:
        raise reader.fail("milter_default_action", f"must be one of {', '.join(DEFAULT_ACTIONS)}, not {action!r}")
    return FiltersConfig(milters, action, reader.integer("milter_timeout", 1, 3600), reader.boolean("for_trusted"))


def _milter(text: str) -> str:
    parse_address(text.strip())
    return text.strip()
