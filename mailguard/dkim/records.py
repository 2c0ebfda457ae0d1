"""The DNS records a domain publishes so that its mail is delivered, and their check.

:func:`records` lists them (``mailguard dns DOMAIN``): MX, SPF, each DKIM key in
``keys_dir``, DMARC, and notes (PTR of the sending address, DMARC's next steps).
:func:`check` compares them with what DNS answers now (``mailguard dns --check``):
``ok``, ``missing`` or ``differs`` per record.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Awaitable, Callable

from mailguard.config import Config, host_port
from mailguard.dkim import keys as dkim_keys

TXTLookup = Callable[[str], Awaitable[list[str]]]
MXLookup = Callable[[str], Awaitable[list[str]]]


@dataclass(frozen=True)
class Record:
    """One record to publish: owner name (absolute, with the dot), type and value."""

    name: str
    type: str           # "MX" | "TXT"
    value: str          # MX: "10 host."; TXT: the text, unquoted
    what: str           # "mx" | "spf" | "dkim" | "dmarc"

    def zone_line(self) -> str:
        if self.type != "TXT":
            return f"{self.name} IN {self.type} {self.value}"
        chunks = " ".join(f'"{self.value[i:i + 255]}"' for i in range(0, len(self.value), 255))
        return f"{self.name} IN TXT {chunks}"


def _spf(cfg: Config) -> str:
    terms = ["v=spf1", "mx"]
    if cfg.outbound.smarthost:
        host = host_port(cfg.outbound.smarthost, 25)[0]
        try:
            ip = ipaddress.ip_address(host)
            terms.append(f"ip{ip.version}:{ip}")
        except ValueError:
            terms.append(f"a:{host}")
    return " ".join(terms + ["-all"])


def records(cfg: Config, domain: str) -> list[Record]:
    """Every record ``domain`` should publish, in the order an admin enters them."""
    domain = domain.strip().lower().rstrip(".")
    host = cfg.server.hostname.rstrip(".")
    out = [Record(f"{domain}.", "MX", f"10 {host}.", "mx"),
           Record(f"{domain}.", "TXT", _spf(cfg), "spf")]
    for key in dkim_keys.keys_for(cfg.dkim.keys_dir, domain):
        out.append(Record(f"{key.selector}._domainkey.{domain}.", "TXT", key.record(), "dkim"))
    postmaster = cfg.server.postmaster or f"postmaster@{domain}"
    out.append(Record(f"_dmarc.{domain}.", "TXT", f"v=DMARC1; p=none; rua=mailto:{postmaster}", "dmarc"))
    return out


def notes(cfg: Config, domain: str) -> list[str]:
    """Zone-file comments: what cannot be written as a record of this domain."""
    host = cfg.server.hostname.rstrip(".")
    out = [f"; PTR: the public address {host} sends from must have a PTR record naming {host},",
           f";      and {host} must resolve to that address (ask whoever runs that address block)."]
    if cfg.outbound.smarthost:
        out.append(f"; SPF: mail leaves through {cfg.outbound.smarthost}; if your provider documents an")
        out.append(";      SPF include: for it, use that instead of the a:/ip term.")
    if not dkim_keys.keys_for(cfg.dkim.keys_dir, domain):
        out.append(f"; DKIM: no key for {domain} yet: mailguard dkim keygen {domain}")
    out.append("; DMARC: start with p=none and read the reports; once every legitimate source passes")
    out.append(";        SPF or DKIM aligned, move to p=quarantine, then p=reject.")
    return out


def _txt_normal(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().split(";") if part.strip()).lower()


async def check(cfg: Config, domain: str, txt: TXTLookup, mx: MXLookup) -> list[tuple[Record, str]]:
    """Each record with ``ok``, ``missing`` or ``differs`` (and what DNS has instead).

    The lookups return the published values (TXT strings joined; MX host names
    without the final dot) or ``[]`` when there are none.
    """
    out: list[tuple[Record, str]] = []
    for rec in records(cfg, domain):
        if rec.type == "MX":
            hosts = [h.lower().rstrip(".") for h in await mx(rec.name.rstrip("."))]
            want = rec.value.split()[1].rstrip(".").lower()
            out.append((rec, "missing" if not hosts else "ok" if want in hosts else f"differs: {', '.join(hosts)}"))
            continue
        texts = await txt(rec.name.rstrip("."))
        prefix = {"spf": "v=spf1", "dmarc": "v=dmarc1", "dkim": "v=dkim1"}[rec.what]
        found = [t for t in texts if t.strip().lower().startswith(prefix)]
        if rec.what == "dkim" and not found:
            found = [t for t in texts if "p=" in t]
        if not found:
            out.append((rec, "missing"))
        elif rec.what == "dmarc" and any(_dmarc_policy(t) for t in found):
            out.append((rec, f"ok (p={_dmarc_policy(found[0])})"))
        elif any(_txt_normal(t) == _txt_normal(rec.value) for t in found):
            out.append((rec, "ok"))
        else:
            out.append((rec, f"differs: {found[0]}"))
    return out


def _dmarc_policy(text: str) -> str | None:
    """A published DMARC record's p= when it is valid (any policy is the owner's choice)."""
    tags = dict(part.strip().split("=", 1) for part in text.split(";") if "=" in part)
    tags = {k.strip().lower(): v.strip().lower() for k, v in tags.items()}
    if tags.get("v") != "dmarc1" or tags.get("p") not in ("none", "quarantine", "reject"):
        return None
    return tags["p"]
