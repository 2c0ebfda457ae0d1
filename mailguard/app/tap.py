"""The twistd plugin: ``twistd -n mailguard [--config FILE]``.

A configuration error stops start-up before anything listens, with one line naming
the file and the key, and a non-zero exit status.
"""

from __future__ import annotations

import os
import pwd
import sys

from twisted.application import service
from twisted.python import usage

from mailguard import config


class Options(usage.Options):
    """Options for ``twistd mailguard``."""

    optParameters = [
        ["config", "c", None, "configuration file (else $MAILGUARD_CONFIG, ./etc/mailguard.toml, "
                               "/etc/mailguard/mailguard.toml, else built-in defaults)"],
    ]


def _twistd_option(options: Options, name: str) -> object:
    """An option given to twistd itself (``--uid``, ``--nodaemon``): the plugin's parent options."""
    parent = getattr(options, "parent", None)
    try:
        return parent[name] if parent is not None else None
    except KeyError:
        return None


def makeService(options: Options) -> service.IService:
    """Parse and validate the configuration, then build the mail host.

    Files are private from the start (umask 077, unless twistd's ``--umask`` says
    otherwise): the directory holds password hashes, the data folder keys.  With
    twistd's ``--uid``/``--gid`` the data folder is handed to that user once built,
    and the listening sockets are opened before the switch.  With ``--logfile`` the
    file rotates as ``[log]`` says (:mod:`mailguard.app.logfile`).
    """
    try:
        cfg = config.find(options["config"])
    except config.ConfigError as e:
        sys.stderr.write(f"mailguard: {e}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None
    from mailguard.app import checkconfig
    problems = checkconfig.problems(cfg, inherited=True)
    if problems:
        sys.stderr.write("".join(f"mailguard: {line}\n" for line in problems))
        sys.stderr.flush()
        raise SystemExit(1)
    from twisted.internet import reactor

    from mailguard.app.service import Mailhost
    if _twistd_option(options, "umask") is None:
        os.umask(0o077)
    uid, gid = _twistd_option(options, "uid"), _twistd_option(options, "gid")
    owner = None
    if isinstance(uid, int):
        owner = (uid, gid if isinstance(gid, int) else pwd.getpwuid(uid).pw_gid)
    elif isinstance(gid, int):
        owner = (os.getuid(), gid)
    nodaemon = _twistd_option(options, "nodaemon")
    mailhost = Mailhost(cfg, reactor, owner=owner, daemon=nodaemon is not None and not nodaemon)
    from mailguard.app import logfile
    path = logfile.twistd_log_path(lambda name: _twistd_option(options, name))
    if path is not None:
        mailhost.log_observer = logfile.observer(path, cfg.log, reactor)
    elif logfile.twistd_logs_to_stdout(lambda name: _twistd_option(options, name)):
        mailhost.log_observer = logfile.stdout_observer(reactor)
    return mailhost
