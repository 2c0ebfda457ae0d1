"""The admin command line: ``mailguard [--config FILE] COMMAND ...`` (also ``python -m mailguard``).

Commands change the directory file or the queue directly; a running server sees
the change at once (the directory is read per lookup, the queue runner notices
flush requests).  Exit status: 0 on success, 1 on an error (one line on stderr),
2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import getpass
import sys
from pathlib import Path
from typing import Callable, Sequence

from mailguard import config
from mailguard.app import cli_dns, dangling, dircli, statuscli
from mailguard.config import lookup
from mailguard.core import policy
from mailguard.core.address import AddressError, parse_path
from mailguard.core.entries import SENDER_POLICIES
from mailguard.storage.maildir import maildir_path
from mailguard.storage.usage import Sizes
from mailguard.directory.sqlite import DirectoryError, EntryError, SQLiteStore


class CommandError(Exception):
    """A command that failed; its text is printed on one line."""


def _address(text: str) -> str:
    """The normalised address, refused when delivery could not store mail for it.

    Besides bad syntax, an address holding a control character or a part that is
    not a plain file name (``a/b@...``, ``"../../../etc"@...``, a leading dot) is
    refused here: accepted, it would pass RCPT and then fail every delivery.
    """
    try:
        addr = parse_path(text)
    except AddressError as e:
        raise CommandError(f"{text!r} is not a mail address: {e}") from None
    assert addr is not None
    key = addr.key
    if not key.isprintable():
        raise CommandError(f"{text!r} cannot be used: it holds a control character")
    try:
        maildir_path(Path("/"), key.replace('"', ""))
    except ValueError:
        raise CommandError(f"{text!r} cannot be used: a mailbox name may not hold '/', '\\', "
                           f"'..' or start with '.'") from None
    return key


def _read_password(cfg: config.Config, args: argparse.Namespace) -> str:
    """The new password from stdin (or asked twice on a terminal), refused when shorter than
    ``[auth] min_password_length``."""
    if args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("the passwords differ")
    if not password:
        raise CommandError("empty password")
    least = cfg.auth.min_password_length
    if len(password) < least:
        raise CommandError(f"the password is too short: {len(password)} characters, at least {least} needed "
                           f"([auth] min_password_length in {cfg.source})")
    return password


def _directory(cfg: config.Config) -> SQLiteStore:
    return SQLiteStore(cfg.directory.path)


def cmd_user(cfg: config.Config, args: argparse.Namespace) -> int:
    d = _directory(cfg)
    if args.action == "list":
        own = d.quotas()
        for address in d.mailboxes():
            print(address + (f" (quota {_quota_text(own[address])})" if address in own else ""))
        return 0
    if not args.address:
        raise CommandError(f"user {args.action} needs an ADDRESS")
    address = _address(args.address)
    if args.action == "quota":
        return _user_quota(cfg, d, address, args.value)
    if args.value is not None:
        raise CommandError(f"user {args.action} takes one ADDRESS, not {args.value!r} too")
    if args.action == "add":
        _check_local_domain(cfg, address)
        d.add_mailbox(address, _read_password(cfg, args))
        print(f"mailbox {address} created")
    elif args.action == "passwd":
        d.set_password(address, _read_password(cfg, args))
        print(f"password of {address} changed")
    elif args.action == "del":
        d.delete_mailbox(address)
        print(f"mailbox {address} deleted (its maildir is kept)")
        dangling.warn(dangling.left_by(cfg, d, address))
    return 0


def _quota_text(quota: int) -> str:
    return f"{quota} bytes" if quota else "none"


def _user_quota(cfg: config.Config, d: SQLiteStore, address: str, value: str | None) -> int:
    """``user quota ADDRESS [BYTES|default]``: show, set (0: none) or drop the mailbox's own quota."""
    if value is None:
        if d.kind(address) != "mailbox":
            raise EntryError(f"no mailbox {address}")
        own = d.quotas((address,)).get(address)
        where = "its own" if own is not None else "[limits] mailbox_quota"
        quota = cfg.limits.mailbox_quota if own is None else own
        used = Sizes().measure(maildir_path(cfg.mail_dir, address))
        print(f"{address}: quota {_quota_text(quota)} ({where}), {used} bytes used")
        return 0
    if value.lower() == "default":
        d.set_quota(address, None)
        print(f"quota of {address}: the default ({_quota_text(cfg.limits.mailbox_quota)}, [limits] mailbox_quota)")
        return 0
    if not value.isascii() or not value.isdigit() or int(value) >= 2 ** 63:
        raise CommandError(f"quota {value!r}: give a number of bytes (0: no quota) or 'default'")
    d.set_quota(address, int(value))
    print(f"quota of {address}: {_quota_text(int(value))}")
    return 0


def _check_local_domain(cfg: config.Config, address: str) -> None:
    domain = address.rpartition("@")[2]
    if domain not in cfg.inbound_domains():
        raise CommandError(f"{domain} is not an inbound domain in {cfg.source} "
                           f"(add [domains.\"{domain}\"] route = \"inbound\")")


def _pointer(cfg: config.Config, args: argparse.Namespace, kind: str, name: str, target: str | None,
             add: Callable[[SQLiteStore, str, str], None], delete: Callable[[SQLiteStore, str], None]) -> int:
    """``alias``/``contact``: an entry that points at another address."""
    d = _directory(cfg)
    address = _address(name)
    if args.action == "add":
        if not target:
            raise CommandError(f"{kind} add needs two addresses")
        _check_local_domain(cfg, address)
        to = _address(target)
        add(d, address, to)
        print(f"{kind} {address} -> {to}")
        dangling.warn_targets(cfg, d, kind, address, [to])
    else:
        delete(d, address)
        print(f"{kind} {address} deleted")
        dangling.warn(dangling.left_by(cfg, d, address))
    return 0


def cmd_alias(cfg: config.Config, args: argparse.Namespace) -> int:
    if args.action == "list":
        return statuscli.print_entries(cfg, "alias")
    if not args.alias:
        raise CommandError(f"alias {args.action} needs an ALIAS")
    return _pointer(cfg, args, "alias", args.alias, args.target, SQLiteStore.add_alias, SQLiteStore.delete_alias)


def cmd_list(cfg: config.Config, args: argparse.Namespace) -> int:
    if args.action == "show":
        return statuscli.print_entries(cfg, "list", _address(args.name))
    d = _directory(cfg)
    name = _address(args.name)
    if args.action == "senders":
        return _list_senders(d, name, args.members)
    try:
        members = [_address(m) for m in args.members]
    except CommandError as e:
        raise CommandError(f"list {name}: member {e}") from None
    if args.action == "add":
        if not members:
            raise CommandError("list add needs LIST MEMBER...")
        _check_local_domain(cfg, name)
        d.add_list_members(name, members)
        print(f"list {name}: {len(members)} member(s) added")
        dangling.warn_targets(cfg, d, "list", name, members)
        inbound = cfg.inbound_domains()
        if d.list_senders(name) == "anyone" and any(m.rpartition("@")[2] not in inbound for m in members):
            print(f"list {name}: takes mail from anyone and forwards it to remote members; "
                  f"'mailguard list senders {name} authenticated' limits who may send")
    else:
        d.delete_list(name, members)
        print(f"list {name}: " + (f"{len(members)} member(s) removed" if members else "deleted"))
        dangling.warn(dangling.left_by(cfg, d, name))
    return 0


def _list_senders(d: SQLiteStore, name: str, values: list[str]) -> int:
    """``list senders LIST [anyone|authenticated|members]``: set the policy, or print it."""
    if len(values) > 1:
        raise CommandError(f"list senders needs LIST and one of {', '.join(SENDER_POLICIES)}")
    if values:
        d.set_list_senders(name, values[0].lower())
    elif d.kind(name) != "list":
        raise EntryError(f"no list {name}")
    print(f"list {name}: senders {d.list_senders(name)}")
    return 0


def cmd_contact(cfg: config.Config, args: argparse.Namespace) -> int:
    if args.action == "list":
        return statuscli.print_entries(cfg, "contact")
    if not args.address:
        raise CommandError(f"contact {args.action} needs an ADDRESS")
    return _pointer(cfg, args, "contact", args.address, args.remote,
                    SQLiteStore.add_contact, SQLiteStore.delete_contact)


def cmd_fail2ban_jail(cfg: config.Config, args: argparse.Namespace) -> int:
    from mailguard.app import jail

    print(jail.jail(cfg, args.logpath), end="")
    return 0


def cmd_check_config(cfg: config.Config, args: argparse.Namespace) -> int:
    from mailguard.app import checkconfig

    problems = checkconfig.problems(cfg)
    for line in problems:
        print(f"mailguard: {line}", file=sys.stderr)
    if problems:
        return 1
    print(f"{cfg.source}: ok")
    for line in config.routing_table(cfg):
        print(line)
    if cfg.directory.backend == "sqlite" and cfg.directory.path.is_file():
        try:
            dangling.warn(dangling.find(cfg, SQLiteStore(cfg.directory.path, create=False)))
        except DirectoryError as e:
            print(f"mailguard: warning: the directory was not read: {e}", file=sys.stderr)
    if cfg.directory.backend == "ldap":
        print(dircli.check_ldap(cfg))
    return 0


def cmd_explain(cfg: config.Config, args: argparse.Namespace) -> int:
    from mailguard.app import explain

    try:
        return explain.run(cfg, args)
    except explain.ExplainError as e:
        raise CommandError(str(e)) from None


def cmd_queue(cfg: config.Config, args: argparse.Namespace) -> int:
    from mailguard.storage import queue as queue_mod

    q = queue_mod.Queue(cfg.queue_dir)
    if args.action == "list":
        entries, damaged = q.scan()
        for line in queue_mod.format_entries(entries, damaged=damaged):
            print(line)
    elif args.action == "flush":
        q.request_flush()
        print("flush requested")
    elif args.action == "release":
        if not args.id:
            raise CommandError("queue release needs an ID")
        try:
            released = q.release(args.id)
        except queue_mod.QueueError as e:
            raise CommandError(str(e)) from None
        if not released:
            raise CommandError(f"no held message {args.id}")
        q.request_flush()
        print(f"released {args.id}")
    else:
        if not args.id:
            raise CommandError("queue delete needs an ID")
        try:
            found = q.delete(args.id)
        except queue_mod.QueueError as e:
            raise CommandError(str(e)) from None
        if not found:
            raise CommandError(f"no queued message {args.id}")
        print(f"deleted {args.id}")
    return 0


def cmd_reload(cfg: config.Config, args: argparse.Namespace) -> int:
    from mailguard.app import reload

    try:
        pid = reload.signal_reload(cfg.server.data_dir)
    except reload.ReloadError as e:
        raise CommandError(str(e)) from None
    print(f"SIGHUP sent to mailguard (process {pid}); its log says whether {cfg.source} was taken")
    return 0


def cmd_backup(cfg: config.Config, args: argparse.Namespace) -> int:
    from mailguard.app import backup

    try:
        manifest = backup.backup(cfg, Path(args.dest))
    except backup.BackupError as e:
        raise CommandError(str(e)) from None
    print(f"backup in {args.dest}: {manifest.get('mailboxes', 0)} mailbox(es), {manifest['messages']} "
          f"message(s), {manifest['queued']} queued, directory schema {manifest['schema']}")
    return 0


def cmd_restore(cfg: config.Config, args: argparse.Namespace) -> int:
    from mailguard.app import backup, reload

    try:
        pid = reload.running_pid(cfg.server.data_dir)
    except reload.ReloadError:
        pid = None
    if pid is not None:
        raise CommandError(f"mailguard is running on {cfg.server.data_dir} (process {pid}): stop it first")
    try:
        manifest = backup.restore(cfg, Path(args.src), force=args.force)
    except backup.BackupError as e:
        raise CommandError(str(e)) from None
    print(f"restored {args.src} into {cfg.server.data_dir}: {manifest.get('mailboxes', 0)} mailbox(es), "
          f"{manifest['messages']} message(s), {manifest['queued']} queued")
    return 0


def cmd_relay_test(cfg: config.Config | None, args: argparse.Namespace) -> int:
    from mailguard.app import relaytest

    return relaytest.main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailguard", description="mailguard administration")
    p.add_argument("--config", "-c", help="configuration file (else $MAILGUARD_CONFIG, ./etc/mailguard.toml, "
                                          "/etc/mailguard/mailguard.toml)")
    p.add_argument("--defaults", action="store_true",
                   help="with no configuration file, use the built-in defaults (data in ./var)")
    sub = p.add_subparsers(dest="command", required=True)

    u = sub.add_parser("user", help="mailboxes")
    u.add_argument("action", choices=["add", "passwd", "del", "list", "quota"])
    u.add_argument("address", nargs="?")
    u.add_argument("value", nargs="?", metavar="BYTES",
                   help="quota: bytes the mailbox may hold (0: no quota), or 'default' ([limits] mailbox_quota)")
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    u.set_defaults(func=cmd_user)

    a = sub.add_parser("alias", help="aliases")
    a.add_argument("action", choices=["add", "del", "list"])
    a.add_argument("alias", nargs="?")
    a.add_argument("target", nargs="?")
    a.set_defaults(func=cmd_alias)

    ls = sub.add_parser("list", help="distribution lists")
    ls.add_argument("action", choices=["add", "del", "show", "senders"])
    ls.add_argument("name")
    ls.add_argument("members", nargs="*", help="members; for senders: anyone, authenticated or members")
    ls.set_defaults(func=cmd_list)

    c = sub.add_parser("contact", help="contacts (forward to a remote address)")
    c.add_argument("action", choices=["add", "del", "list"])
    c.add_argument("address", nargs="?")
    c.add_argument("remote", nargs="?")
    c.set_defaults(func=cmd_contact)

    cc = sub.add_parser("check-config", help="validate and print the routing table")
    cc.set_defaults(func=cmd_check_config)

    fj = sub.add_parser("fail2ban-jail", help="print the fail2ban jail for the configured ports")
    fj.add_argument("--logpath", default="/var/log/mailguard/twistd.log", help="the log fail2ban reads")
    fj.set_defaults(func=cmd_fail2ban_jail)

    e = sub.add_parser("explain", help="dry-run the inbound checks and the recipient policy")
    e.add_argument("--client", required=True, help="client IP address")
    e.add_argument("--helo", help="the name the client gives in HELO/EHLO")
    e.add_argument("--local", help="local (server) IP address the client connected to")
    e.add_argument("--auth", help="the mailbox the client authenticated as")
    e.add_argument("--from", dest="sender", help="envelope sender")
    e.add_argument("--pop-before-smtp", action="store_true", help="the client logged in over POP3 recently")
    e.add_argument("--verbose", "-v", action="store_true", help="show where accepted recipients go")
    e.add_argument("rcpt", nargs="+")
    e.set_defaults(func=cmd_explain)

    q = sub.add_parser("queue", help="the outbound queue")
    q.add_argument("action", choices=["list", "flush", "delete", "release"])
    q.add_argument("id", nargs="?")
    q.set_defaults(func=cmd_queue)

    st = sub.add_parser("status", help="is the server running; listeners, queue, directory")
    st.set_defaults(func=statuscli.cmd_status)

    rl = sub.add_parser("reload", help="make the running server read its configuration again (SIGHUP)")
    rl.set_defaults(func=cmd_reload)

    b = sub.add_parser("backup", help="a consistent copy of the data folder, while the server runs")
    b.add_argument("dest", help="a new (or empty) folder")
    b.set_defaults(func=cmd_backup)

    rs = sub.add_parser("restore", help="copy a backup into the (empty) data folder")
    rs.add_argument("src", help="a folder made by mailguard backup")
    rs.add_argument("--force", action="store_true", help="restore over a data folder that is not empty")
    rs.set_defaults(func=cmd_restore)

    cli_dns.register(sub)

    r = sub.add_parser("relay-test", help="run the open-relay catalogue against a server")
    r.add_argument("target", help="HOST[:PORT]")
    r.add_argument("--source", help="source IP address to connect from")
    r.add_argument("--domain", help="a local domain of the server (for tricks that need one)")
    r.add_argument("--timeout", type=float, default=10.0)
    r.set_defaults(func=cmd_relay_test, no_config=True)

    dircli.add_parser(sub)
    return p


def _configuration(args: argparse.Namespace) -> config.Config:
    """The configuration file :mod:`mailguard.config.lookup` finds; none is an error unless ``--defaults``."""
    found = lookup.locate(args.config)
    if found is None:
        if args.defaults:
            return config.defaults()
        raise CommandError(lookup.none_found())
    if found.how != "--config":
        print(f"mailguard: configuration {found.path} (from {found.how})", file=sys.stderr)
    return config.load(found.path)


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    os.umask(0o077)            # what the CLI makes (the directory, keys, the data folder) is private
    try:
        cfg = None if getattr(args, "no_config", False) else _configuration(args)
        refusal = dircli.managed_elsewhere(cfg, args.command) if cfg is not None else None
        if refusal:
            print(f"mailguard: {refusal}", file=sys.stderr)
            return 1
        return int(args.func(cfg, args))
    except config.ConfigError as e:
        print(f"mailguard: {e}", file=sys.stderr)
        return 1
    except (CommandError, cli_dns.DNSCommandError, EntryError, DirectoryError, dircli.DirectoryCommandError) as e:
        print(f"mailguard: {e}", file=sys.stderr)
        return 1
    except OSError as e:                # a data folder that cannot be made or written
        where = f": {e.filename}" if e.filename else ""
        print(f"mailguard: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
