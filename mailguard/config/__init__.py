"""The configuration: TOML parsed into a frozen, validated :class:`Config`.

Format
======
``etc/mailguard.toml`` (see the shipped file for every key with its default).
Sections: ``[server] [tls] [listen] [domains."name"] [relay] [replies] [limits]
[submission] [outbound] [directory] [filters] [dkim] [dns] [checks] [metrics]
[log]``.  Unknown keys are an error.  Relative paths
are relative to the configuration file's folder (or, for the built-in defaults, to
the current directory).

Every error is a :class:`ConfigError` whose ``str`` is one line naming the file and
the key as a dotted path: ``etc/mailguard.toml: relay.alow: unknown key``.
Tables are read through :class:`mailguard.config.reader.Reader`; a section that
grows beyond a few keys gets its own parsing module beside this one.

This module imports nothing from Twisted.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

from mailguard.config import auth as auth_cfg
from mailguard.config import dkim as dkim_section
from mailguard.core import replies
from mailguard.core.address import AddressError, normalize_domain
from mailguard.config import filters as filters_mod
from mailguard.config.filters import FiltersConfig
from mailguard.config import checks as checks_cfg
from mailguard.config import dns as dns_cfg
from mailguard.config import ldap as ldap_config
from mailguard.config import log as log_cfg
from mailguard.config import lookup
from mailguard.config import metrics as metrics_cfg
from mailguard.config import server as server_cfg
from mailguard.config.server import ServerConfig
from mailguard.config.ldap import LDAPConfig

from mailguard.config.reader import (ConfigError, IPAddress, IPNetwork, Reader, host_port, network as _network,
                                     path_in as _path)

__all__ = ["Config", "ConfigError", "IPAddress", "IPNetwork", "Reader", "defaults", "find", "host_port", "load",
           "parse", "routing_table"]

ROUTES = ("inbound", "relay", "reroute")
SMARTHOST_TLS = ("starttls", "tls", "opportunistic", "none")


@dataclass(frozen=True)
class TLSConfig:
    certificate: Path | None
    key: Path | None
    auth_requires_tls: bool


@dataclass(frozen=True)
class ListenConfig:
    smtp: tuple[str, ...]
    submission: tuple[str, ...]
    submissions: tuple[str, ...]
    pop3: tuple[str, ...]
    pop3s: tuple[str, ...]


@dataclass(frozen=True)
class DomainRoute:
    """How mail for one domain is routed: ``inbound``, ``relay`` or ``reroute`` (to ``to``)."""

    route: str
    to: str = ""


@dataclass(frozen=True)
class RelayConfig:
    authenticated: bool
    allow: tuple[IPNetwork, ...]
    internal_addresses: tuple[IPAddress, ...]
    never: tuple[IPNetwork, ...]
    pop_before_smtp: int


@dataclass(frozen=True)
class RepliesConfig:
    relay_denied: replies.Reply
    unknown_recipient: replies.Reply
    never_host: replies.Reply
    directory_failure: replies.Reply
    soft_bounce: bool


@dataclass(frozen=True)
class LimitsConfig:
    max_message_size: int
    max_recipients: int
    max_connections: int
    max_connections_per_ip: int
    idle_timeout: int
    session_timeout: int
    login_failures: int
    login_lockout: int
    mailbox_quota: int = 0          # bytes per mailbox (new/ + cur/); 0 = none
    memory_budget: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class SubmissionConfig:
    enforce_sender: bool
    normalize_bare_newlines: bool = True


@dataclass(frozen=True)
class OutboundConfig:
    smarthost: str
    smarthost_tls: str
    smarthost_user: str
    smarthost_password: str
    dns_servers: tuple[tuple[str, int], ...]
    port: int
    retry_schedule: tuple[int, ...]
    max_queue_time: int
    connect_timeout: int
    command_timeout: int
    delay_warning: int
    bounce_size_limit: int = 50000
    smarthost_tls_verify: bool = True
    tls_ca_file: Path | None = None
    mta_sts: bool = True


@dataclass(frozen=True)
class DirectoryConfig:
    backend: str
    path: Path
    ldap: LDAPConfig | None = None


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    source: str
    server: ServerConfig
    tls: TLSConfig
    listen: ListenConfig
    domains: Mapping[str, DomainRoute]
    relay: RelayConfig
    replies: RepliesConfig
    limits: LimitsConfig
    submission: SubmissionConfig
    outbound: OutboundConfig
    directory: DirectoryConfig
    dkim: dkim_section.DKIMConfig = field(default_factory=dkim_section.DKIMConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    dns: dns_cfg.DNSConfig = dns_cfg.DNSConfig()
    checks: checks_cfg.ChecksConfig = checks_cfg.OFF
    metrics: metrics_cfg.MetricsConfig = metrics_cfg.MetricsConfig()
    auth: auth_cfg.AuthConfig = auth_cfg.AuthConfig()
    log: log_cfg.LogConfig = log_cfg.LogConfig()

    def route_for(self, domain: str) -> DomainRoute | None:
        """The configured route for a (normalised) domain, or None when it is remote."""
        return self.domains.get(domain)

    def inbound_domains(self) -> list[str]:
        """The domains whose recipients are looked up in the directory."""
        return sorted(d for d, r in self.domains.items() if r.route == "inbound")

    @property
    def queue_dir(self) -> Path:
        return self.server.data_dir / "queue"

    @property
    def mail_dir(self) -> Path:
        return self.server.data_dir / "mail"


# Every key with its default.  The shipped etc/mailguard.toml mirrors this table.
DEFAULTS: dict[str, dict[str, Any]] = {
    "server": {"hostname": "localhost", "data_dir": "var", "postmaster": "", "workers": 1},
    "tls": {"certificate": "", "key": "", "auth_requires_tls": True},
    "listen": {
        "smtp": ["tcp:2525:interface=127.0.0.1"],
        "submission": ["tcp:2587:interface=127.0.0.1"],
        "submissions": ["ssl:2465:interface=127.0.0.1"],
        "pop3": ["tcp:2110:interface=127.0.0.1"],
        "pop3s": ["ssl:2995:interface=127.0.0.1"],
    },
    "relay": {
        "authenticated": True,
        "allow": [],
        "internal_addresses": [],
        "never": [],
        "pop_before_smtp": 0,
    },
    "replies": {
        "relay_denied": "550 5.7.1 Relaying prohibited",
        "unknown_recipient": "550 5.1.1 User unknown",
        "never_host": "550 5.7.1 Relaying prohibited for this host",
        "directory_failure": "451 4.3.0 Directory temporarily unavailable",
        "soft_bounce": False,
        **checks_cfg.REPLY_DEFAULTS,
    },
    "limits": {
        "max_message_size": 26214400,
        "max_recipients": 100,
        "max_connections": 500,
        "max_connections_per_ip": 20,
        "idle_timeout": 300,
        "session_timeout": 1800,
        "login_failures": 5,
        "login_lockout": 300,
        "mailbox_quota": 0,
        "memory_budget": 64 * 1024 * 1024,
        **checks_cfg.LIMIT_DEFAULTS,
    },
    "submission": {"enforce_sender": True, "normalize_bare_newlines": True},
    "outbound": {
        "smarthost": "",
        "smarthost_tls": "opportunistic",
        "smarthost_user": "",
        "smarthost_password": "",
        "dns_servers": [],
        "port": 25,
        "retry_schedule": [300, 900, 1800, 3600, 7200, 14400],
        "max_queue_time": 432000,
        "connect_timeout": 30,
        "command_timeout": 300,
        "delay_warning": 0,
        "bounce_size_limit": 50000,
        "smarthost_tls_verify": True,
        "tls_ca_file": "",
        "mta_sts": True,
    },
    "directory": {"backend": "sqlite", "path": "", "ldap": ldap_config.DEFAULTS},
    "dkim": dkim_section.DEFAULTS,
    "filters": filters_mod.DEFAULTS,
    "dns": dns_cfg.DEFAULTS,
    "checks": checks_cfg.DEFAULTS,
    "metrics": metrics_cfg.DEFAULTS,
    "auth": auth_cfg.DEFAULTS,
    "log": log_cfg.DEFAULTS,
}
DEFAULT_DOMAINS: dict[str, dict[str, Any]] = {"localhost": {"route": "inbound"}}


def parse(data: Mapping[str, Any], source: str, base: Path) -> Config:
    """Validate a parsed TOML document into a :class:`Config`.

    :param source: the file name used in error messages.
    :param base: the folder relative paths are relative to.
    :raises ConfigError: on the first problem found.
    """
    for section in data:
        if section not in DEFAULTS and section != "domains":
            raise ConfigError(source, section, "unknown section")
    r = {s: Reader(source, s, data.get(s, {}), DEFAULTS[s]) for s in DEFAULTS}

    srv = r["server"]
    server = server_cfg.parse(srv, base)

    t = r["tls"]
    cert, key = t.string("certificate"), t.string("key")
    if bool(cert) != bool(key):
        raise t.fail("key" if cert else "certificate", "certificate and key go together")
    tls = TLSConfig(_path(base, cert) if cert else None, _path(base, key) if key else None,
                    t.boolean("auth_requires_tls"))
    for name, p in (("certificate", tls.certificate), ("key", tls.key)):
        if p is not None and not p.is_file():
            raise t.fail(name, f"no such file: {p}")

    ls = r["listen"]
    listen = ListenConfig(*(tuple(ls.strings(k)) for k in DEFAULTS["listen"]))
    for k in DEFAULTS["listen"]:
        for desc in ls.strings(k):
            if ":" not in desc and not desc.isdigit():
                raise ls.fail(k, f"{desc!r} is not an endpoint description like 'tcp:25'")

    domains = _domains(source, data.get("domains", DEFAULT_DOMAINS if "domains" not in data else {}))

    rl = r["relay"]
    internal = rl.each("internal_addresses", lambda s: ipaddress.ip_address(s.strip()))
    relay = RelayConfig(rl.boolean("authenticated"), rl.each("allow", _network), internal,
                        rl.each("never", _network), rl.integer("pop_before_smtp"))

    rp = r["replies"]
    parsed = {}
    for k in ("relay_denied", "unknown_recipient", "never_host", "directory_failure"):
        try:
            parsed[k] = replies.parse(rp.string(k))
        except replies.ReplyError as e:
            raise rp.fail(k, str(e)) from None
        if parsed[k].code < 400:
            raise rp.fail(k, f"a refusal must be 4xx or 5xx, not {parsed[k].code}")
    if not parsed["directory_failure"].transient:
        raise rp.fail("directory_failure", f"must stay 4xx (temporary), not {parsed['directory_failure'].code}")
    reply_cfg = RepliesConfig(soft_bounce=rp.boolean("soft_bounce"), **parsed)

    lm = r["limits"]
    limits = LimitsConfig(
        max_message_size=lm.integer("max_message_size", 1024),
        max_recipients=lm.integer("max_recipients", 1),
        max_connections=lm.integer("max_connections", 1),
        max_connections_per_ip=lm.integer("max_connections_per_ip", 1),
        idle_timeout=lm.integer("idle_timeout", 1),
        session_timeout=lm.integer("session_timeout", 1),
        login_failures=lm.integer("login_failures", 1),
        login_lockout=lm.integer("login_lockout", 0),
        mailbox_quota=lm.integer("mailbox_quota", 0),
        memory_budget=lm.integer("memory_budget", 0),
    )

    sub = SubmissionConfig(r["submission"].boolean("enforce_sender"),
                           r["submission"].boolean("normalize_bare_newlines"))

    ob = r["outbound"]
    smarthost = ob.string("smarthost").strip()
    if smarthost:
        try:
            host_port(smarthost, 25)
        except ValueError as e:
            raise ob.fail("smarthost", f"{smarthost!r}: {e}") from None
    smarthost_tls = ob.string("smarthost_tls")
    if smarthost_tls not in SMARTHOST_TLS:
        raise ob.fail("smarthost_tls", f"must be one of {', '.join(SMARTHOST_TLS)}, not {smarthost_tls!r}")
    schedule = ob.get("retry_schedule", list)
    if not schedule or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in schedule):
        raise ob.fail("retry_schedule", "must be a non-empty list of positive integers (seconds)")
    outbound = OutboundConfig(
        smarthost=smarthost,
        smarthost_tls=smarthost_tls,
        smarthost_user=ob.string("smarthost_user"),
        smarthost_password=ob.string("smarthost_password"),
        dns_servers=ob.each("dns_servers", lambda s: host_port(s, 53)),
        port=ob.integer("port", 1, 65535),
        retry_schedule=tuple(schedule),
        max_queue_time=ob.integer("max_queue_time", 1),
        connect_timeout=ob.integer("connect_timeout", 1),
        command_timeout=ob.integer("command_timeout", 1),
        delay_warning=ob.integer("delay_warning", 0),
        bounce_size_limit=ob.integer("bounce_size_limit", 0),
        smarthost_tls_verify=ob.boolean("smarthost_tls_verify"),
        tls_ca_file=_path(base, ob.string("tls_ca_file")) if ob.string("tls_ca_file") else None,
        mta_sts=ob.boolean("mta_sts"),
    )
    if outbound.tls_ca_file is not None and not outbound.tls_ca_file.is_file():
        raise ob.fail("tls_ca_file", f"no such file: {outbound.tls_ca_file}")
    if outbound.smarthost_user and smarthost_tls == "none":
        raise ob.fail("smarthost_user", 'needs TLS: smarthost_tls = "none" would send the password in cleartext')

    dr = r["directory"]
    backend = dr.string("backend")
    if backend not in ("sqlite", "ldap"):
        raise dr.fail("backend", f"must be 'sqlite' or 'ldap', not {backend!r}")
    dpath = dr.string("path")
    ldap = ldap_config.parse(dr.get("ldap", dict), lambda k, m: dr.fail("ldap." + k if k else "ldap", m),
                             base, required=backend == "ldap")
    directory = DirectoryConfig(backend, _path(base, dpath) if dpath else server.data_dir / "directory.sqlite",
                                ldap if backend == "ldap" else None)

    if server.postmaster and "@" not in server.postmaster:
        raise srv.fail("postmaster", f"must be a mailbox address (local@domain), not {server.postmaster!r}")

    filters = filters_mod.parse(r["filters"])
    dns = dns_cfg.parse(r["dns"], outbound.dns_servers)
    checks = checks_cfg.parse(r["checks"], r["limits"], r["replies"])

    return Config(source, server, tls, listen, MappingProxyType(domains), relay, reply_cfg,
                  limits, sub, outbound, directory,
                  dkim=dkim_section.parse(r["dkim"], base, server.data_dir), filters=filters, dns=dns,
                  checks=checks, metrics=metrics_cfg.parse(r["metrics"]), auth=auth_cfg.parse(r["auth"]),
                  log=log_cfg.parse(r["log"]))


def _domains(source: str, table: Any) -> dict[str, DomainRoute]:
    if not isinstance(table, dict):
        raise ConfigError(source, "domains", "must be a table of domain tables")
    out: dict[str, DomainRoute] = {}
    for name, spec in table.items():
        key = f'domains."{name}"'
        try:
            domain = normalize_domain(name)
        except AddressError as e:
            raise ConfigError(source, key, f"not a domain name: {e}") from None
        if not isinstance(spec, dict):
            raise ConfigError(source, key, "must be a table with route = ...")
        for k in spec:
            if k not in ("route", "to"):
                raise ConfigError(source, f"{key}.{k}", "unknown key")
        route = spec.get("route")
        if route not in ROUTES:
            raise ConfigError(source, f"{key}.route", f"must be one of {', '.join(ROUTES)}, not {route!r}")
        to = spec.get("to", "")
        if not isinstance(to, str):
            raise ConfigError(source, f"{key}.to", f"must be a string, not {to!r}")
        if route == "reroute":
            if not to:
                raise ConfigError(source, f"{key}.to", "a reroute needs the domain to rewrite to")
            try:
                to = normalize_domain(to)
            except AddressError as e:
                raise ConfigError(source, f"{key}.to", f"not a domain name: {e}") from None
            if to == domain:
                raise ConfigError(source, f"{key}.to", "a domain cannot reroute to itself")
        elif to:
            raise ConfigError(source, f"{key}.to", f"only a reroute takes 'to' (route is {route!r})")
        if domain in out:
            raise ConfigError(source, key, "domain listed twice")
        out[domain] = DomainRoute(route, to)
    # Reroute chains must end: follow each one.
    for domain in out:
        seen = {domain}
        d = out[domain]
        while d.route == "reroute":
            if d.to in seen:
                raise ConfigError(source, f'domains."{domain}".to', "reroute loop")
            seen.add(d.to)
            nxt = out.get(d.to)
            if nxt is None:
                break
            d = nxt
    return out


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a configuration file.

    :raises ConfigError: unreadable file, bad TOML, or a bad key.
    """
    p = Path(path)
    source = str(path)
    try:
        with open(p, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError(source, "", f"cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "", "not valid TOML: not UTF-8") from None
    except RecursionError:              # tomllib recurses once per nested array or table
        raise ConfigError(source, "", "not valid TOML: nested too deeply") from None
    return parse(data, source, p.resolve().parent)


def defaults(base: Path | None = None) -> Config:
    """The built-in configuration: data under ./var, domain localhost, unprivileged ports."""
    return parse({}, "(built-in defaults)", base or Path.cwd())


def find(explicit: str | None) -> Config:
    """The configuration twistd uses: the file :func:`lookup.locate` finds, else the built-in defaults."""
    found = lookup.locate(explicit)
    return load(found.path) if found is not None else defaults()


def routing_table(cfg: Config) -> list[str]:
    """Human-readable lines describing the effective routing (``check-config``)."""
    lines = [f"hostname {cfg.server.hostname}; data in {cfg.server.data_dir}"]
    for domain in sorted(cfg.domains):
        d = cfg.domains[domain]
        if d.route == "reroute":
            lines.append(f"  {domain}: reroute to {d.to}")
        elif d.route == "relay":
            lines.append(f"  {domain}: relay for any client")
        else:
            pm = cfg.server.postmaster or f"postmaster@{domain}"
            lines.append(f"  {domain}: inbound (directory lookup; postmaster -> {pm})")
    lines.append("  any other domain: remote; relay only when a rule allows:")
    rl = cfg.relay
    lines.append(f"    never: {', '.join(map(str, rl.never)) or '(none)'} -> {cfg.replies.never_host}")
    lines.append(f"    authenticated: {'yes' if rl.authenticated else 'no'}")
    lines.append(f"    allow: {', '.join(map(str, rl.allow)) or '(none)'}")
    lines.append(f"    internal_addresses: {', '.join(map(str, rl.internal_addresses)) or '(none)'}")
    lines.append(f"    pop_before_smtp: {str(rl.pop_before_smtp) + ' s' if rl.pop_before_smtp else 'off'}")
    lines.append(f"    otherwise -> {cfg.replies.relay_denied}")
    if cfg.replies.soft_bounce:
        lines.append("  soft_bounce on: 5xx policy replies are sent as 4xx")
    out = cfg.outbound
    lines.append(f"  outbound: {'smarthost ' + out.smarthost if out.smarthost else 'MX lookup'}, port {out.port}")
    return lines
