"""The ``[metrics]`` section: where Prometheus scrapes ``/metrics``.

::

    [metrics]
    listen = []     # Twisted endpoint strings, e.g. "tcp:9125:interface=127.0.0.1"; [] = off

This module imports nothing from Twisted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mailguard.config.reader import Reader

DEFAULTS: dict[str, Any] = {"listen": []}


@dataclass(frozen=True)
class MetricsConfig:
    """``listen``: the endpoints serving the Prometheus text format; () = no metrics."""

    listen: tuple[str, ...] = ()


def parse(r: Reader) -> MetricsConfig:
    """Validate ``[metrics]``."""
    listen = tuple(r.strings("listen"))
    for desc in listen:
        if ":" not in desc and not desc.isdigit():
            raise r.fail("listen", f"{desc!r} is not an endpoint description like 'tcp:9125'")
    return MetricsConfig(listen)
