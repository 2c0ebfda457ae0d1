"""Checks of a configuration beyond its own file: listen endpoints and the data folder.

``mailguard check-config`` prints each problem on one line; ``twistd mailguard``
runs the same checks before it builds anything and stops with the first one, so that
a typo such as ``tcp:notaport`` or a data folder it cannot write is one line naming
the key, not a traceback.

Endpoint strings are parsed by Twisted's own parser (nothing listens).  ``ssl:``
is mailguard's: TLS with the ``[tls]`` certificate on top of ``tcp:`` (``ssl:465``)
or of the endpoint that follows (``ssl:systemd:domain=INET:name=submissions``).  A
``systemd:`` endpoint names a socket systemd passes at start: the server checks
that it was passed, ``check-config`` (run outside systemd) only its syntax.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import endpoints

from mailguard.config import Config

_NOWHERE: Any = object()
LISTENERS = ("smtp", "submission", "submissions", "pop3", "pop3s")


_INNER = ("tcp:", "tcp6:", "unix:", "systemd:")


def under_tls(desc: str) -> str:
    """The endpoint an ``ssl:`` listener listens on: ``ssl:465`` is ``tcp:465``, and
    ``ssl:systemd:...`` (or ``ssl:unix:...``) is that socket with TLS on top."""
    rest = desc[4:]
    return rest if rest.startswith(_INNER) else "tcp:" + rest


def endpoint_problem(desc: str, inherited: bool) -> str | None:
    """Why Twisted cannot listen on ``desc`` (``ssl:`` as mailguard reads it), or None.

    :param inherited: whether ``systemd:`` sockets must have been passed to this process.
    """
    parsed = under_tls(desc) if desc.startswith("ssl:") else desc
    systemd = parsed.startswith("systemd:")
    if systemd:
        fields = dict(part.partition("=")[::2] for part in parsed.split(":")[1:])
        domain = fields.get("domain", "")
        if not hasattr(socket, "AF_" + domain):
            return f"domain={domain!r} is not an address family (INET, INET6, UNIX)"
    try:
        endpoints.serverFromString(_NOWHERE, parsed)    # parsing only: the reactor is stored, not used
    except (IndexError, KeyError):
        if systemd and not inherited:
            return None
        return "systemd passed no such socket (is the .socket unit running, and the index or name right?)"
    except (ValueError, TypeError) as e:
        return str(e)
    return None


def endpoint_problems(cfg: Config, inherited: bool = False) -> list[str]:
    """One line per listen endpoint Twisted cannot parse, naming the key."""
    out = []
    keys = [(f"listen.{kind}", getattr(cfg.listen, kind)) for kind in LISTENERS]
    for key, descs in keys + [("metrics.listen", cfg.metrics.listen)]:
        for desc in descs:
            problem = endpoint_problem(desc, inherited)
            if problem is not None:
                out.append(f"{cfg.source}: {key}: {desc!r}: {problem}")
    return out


def data_dir_problem(cfg: Config) -> str | None:
    """Why the server could not write its data folder (or make it), or None."""
    path = cfg.server.data_dir
    here = path
    while not here.exists() and here != here.parent:
        here = here.parent
    if here.exists() and not here.is_dir():
        reason = f"{here} is not a folder"
    elif not os.access(here, os.W_OK | os.X_OK):
        reason = f"{here} is not writable by this user (uid {os.geteuid()})"
    else:
        return None
    return f"{cfg.source}: server.data_dir: {path}: {reason}"


def problems(cfg: Config, inherited: bool = False) -> list[str]:
    """Every problem :func:`endpoint_problems` and :func:`data_dir_problem` find."""
    found = endpoint_problems(cfg, inherited)
    data = data_dir_problem(cfg)
    if data is not None:
        found.append(data)
    return found

