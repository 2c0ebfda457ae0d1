"""The twistd plugin: ``twistd -n mailguard [--config FILE]``.

A configuration error stops start-up before anything listens, with one line naming
the file and the key, and a non-zero exit status.
"""

from __future__ import annotations

import sys

from twisted.application import service
from twisted.python import usage

from mailguard import config


class Options(usage.Options):
    """Options for ``twistd mailguard``."""

    optParameters = [
        ["config", "c", None, "configuration file (default: ./etc/mailguard.toml, else built-in defaults)"],
    ]


def makeService(options: Options) -> service.IService:
    """Parse and validate the configuration, then build the mail host."""
    try:
        cfg = config.find(options["config"])
    except config.ConfigError as e:
        sys.stderr.write(f"mailguard: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    from twisted.internet import reactor

    from mailguard.app.service import Mailhost
    return Mailhost(cfg, reactor)
