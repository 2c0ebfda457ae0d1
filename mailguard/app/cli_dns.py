"""Admin commands for getting mail delivered: ``dkim keygen`` and ``dns [--check]``."""

from __future__ import annotations

import argparse
from typing import Any

from mailguard import config
from mailguard.config.dkim import check_selector
from mailguard.dkim import keys as dkim_keys
from mailguard.dkim import records


class DNSCommandError(Exception):
    """A command that failed; its text is printed on one line."""


def _domain(cfg: config.Config, text: str) -> str:
    domain = text.strip().lower().rstrip(".")
    if domain not in cfg.domains:
        raise DNSCommandError(f"{domain} is not a domain in {cfg.source}")
    return domain


def cmd_dkim(cfg: config.Config, args: argparse.Namespace) -> int:
    """``mailguard dkim keygen DOMAIN [--selector S] [--algorithm rsa|ed25519]``."""
    domain = _domain(cfg, args.domain)
    try:
        selector = check_selector(args.selector or (
            cfg.dkim.selector if args.algorithm == "rsa" else dkim_keys.ed25519_selector(cfg.dkim.selector)))
        key = dkim_keys.generate(cfg.dkim.keys_dir, domain, selector, args.algorithm)
    except (ValueError, dkim_keys.KeyFileError) as e:
        raise DNSCommandError(str(e)) from None
    print(key.zone_line())
    return 0


def cmd_dns(cfg: config.Config, args: argparse.Namespace) -> int:
    """``mailguard dns DOMAIN [--check]``: the records to publish, or how DNS has them."""
    domain = _domain(cfg, args.domain)
    try:
        if not args.check:
            for rec in records.records(cfg, domain):
                print(rec.zone_line())
            for line in records.notes(cfg, domain):
                print(line)
            return 0
        results = _run_check(cfg, domain)
    except dkim_keys.KeyFileError as e:
        raise DNSCommandError(str(e)) from None
    bad = 0
    for rec, state in results:
        print(f"{state.split(':')[0].split(' ')[0]:8} {rec.zone_line()}" + (
            f"  ({state.partition(': ')[2]})" if state.startswith("differs") else ""))
        bad += not state.startswith("ok")
    return 1 if bad else 0


def _servers(cfg: config.Config) -> list[tuple[str, int]]:
    dns_cfg: Any = getattr(cfg, "dns", None)
    servers = list(getattr(dns_cfg, "servers", ()) or ())
    return servers or list(cfg.outbound.dns_servers)


def _run_check(cfg: config.Config, domain: str) -> list[tuple[records.Record, str]]:
    """Ask the configured resolvers (``[dns] servers``, else /etc/resolv.conf)."""
    from twisted.internet import defer, reactor
    from twisted.names import client, dns, error

    servers = _servers(cfg)
    resolver = client.Resolver(servers=servers) if servers else client.createResolver()
    timeout = (float(getattr(getattr(cfg, "dns", None), "timeout", 5)),)

    async def txt(name: str) -> list[str]:
        try:
            answers, _, _ = await resolver.lookupText(name, timeout)
        except (error.DNSNameError, error.DNSQueryRefusedError):
            return []
        return [b"".join(a.payload.data).decode("utf-8", "replace") for a in answers if a.type == dns.TXT]

    async def mx(name: str) -> list[str]:
        try:
            answers, _, _ = await resolver.lookupMailExchange(name, timeout)
        except (error.DNSNameError, error.DNSQueryRefusedError):
            return []
        return [str(a.payload.name) for a in answers if a.type == dns.MX]

    outcome: list[Any] = []

    def done(result: Any) -> None:
        outcome.append(result)
        reactor.stop()

    d = defer.ensureDeferred(records.check(cfg, domain, txt, mx))
    d.addBoth(done)
    reactor.run()
    result = outcome[0]
    if isinstance(result, list):
        return result
    raise DNSCommandError(f"DNS lookup failed: {result.getErrorMessage()}")


def register(sub: Any) -> None:
    """Add the ``dkim`` and ``dns`` commands to the CLI's subparsers."""
    k = sub.add_parser("dkim", help="DKIM signing keys")
    k.add_argument("action", choices=["keygen"])
    k.add_argument("domain")
    k.add_argument("--selector", help="DNS selector (default: [dkim] selector; SELECTOR-ed25519 for ed25519)")
    k.add_argument("--algorithm", choices=list(dkim_keys.ALGORITHMS), default="rsa")
    k.set_defaults(func=cmd_dkim)

    d = sub.add_parser("dns", help="the DNS records to publish for a domain")
    d.add_argument("domain")
    d.add_argument("--check", action="store_true", help="compare with what DNS answers; exit 1 on a gap")
    d.set_defaults(func=cmd_dns)
