"""DMARC (RFC 7489): does an aligned SPF or DKIM pass back the From: domain, and what does
that domain ask receivers to do when nothing does?

:func:`evaluate` takes the RFC5322.From domain, the SPF result and the DKIM results and
answers a :class:`DMARCResult`:

- the record is ``_dmarc.<From domain>``, else ``_dmarc.<organisational domain>``
  (section 6.6.3), the organisational domain coming from the public suffix list
  (``publicsuffixlist``; section 3.2);
- identifier alignment (section 3.1): relaxed (the default) compares organisational
  domains, strict (``adkim=s`` / ``aspf=s``) the names themselves;
- ``pass`` when an aligned identifier passed, else ``fail``; ``none`` without a (single,
  valid) record; ``temperror`` when DNS failed, or when nothing aligned passed and an
  aligned check itself had DNS trouble (a temporary failure never becomes a ``fail``);
- the policy: ``p=``, or ``sp=`` when the record was found at the organisational domain
  for a subdomain; ``pct=`` below 100 samples: outside the sample the policy steps down
  (reject -> quarantine -> none, section 6.6.4).
"""

from __future__ import annotations

import email.utils
import functools
import random
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from publicsuffixlist import PublicSuffixList

from mailguard.senderauth.dkimverify import DKIMResult
from mailguard.senderauth.lookup import DomainNotFound, Lookup, TemporaryDNSError
from mailguard.senderauth.spf import SPFResult

POLICIES = ("none", "quarantine", "reject")
_psl: PublicSuffixList | None = None


@functools.lru_cache(maxsize=4096)
def org_domain(domain: str) -> str:
    """The organisational domain (RFC 7489 section 3.2): the registrable name, or the name."""
    global _psl
    if _psl is None:
        _psl = PublicSuffixList()
    domain = domain.lower().rstrip(".")
    return _psl.privatesuffix(domain) or domain


@dataclass(frozen=True)
class Record:
    """A parsed ``v=DMARC1`` record (the tags this receiver uses)."""

    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True)
class DMARCResult:
    """``result`` is pass/fail/none/temperror/permerror; ``policy`` the one that applies
    (after sp= and pct=), "" without a record."""

    result: str
    domain: str              # the RFC5322.From domain
    policy: str = ""
    requested: str = ""      # p= or sp= as published, before pct=
    reason: str = ""

    @property
    def reject(self) -> bool:
        """The domain asks for this message to be refused."""
        return self.result == "fail" and self.policy == "reject"


def parse(text: str) -> Record | None:
    """Parse a DMARC record (section 6.3); None when it is not a usable one."""
    tags: dict[str, str] = {}
    for i, part in enumerate(text.split(";")):
        name, eq, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if not name and not eq:
            continue
        if i == 0 and (name != "v" or value != "DMARC1"):
            return None
        tags.setdefault(name, value)
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        # Section 6.6.3: a missing or invalid p= with a valid rua= is p=none; else no record.
        if "rua" not in tags:
            return None
        p = "none"
    sp = tags.get("sp", "").lower()
    sp = sp if sp in POLICIES else p
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return Record(p, sp, adkim if adkim in ("r", "s") else "r", aspf if aspf in ("r", "s") else "r",
                  min(max(pct, 0), 100))


async def _record(lookup: Lookup, domain: str) -> Record | None:
    """The one DMARC record at ``_dmarc.domain``, or None; raises TemporaryDNSError."""
    try:
        texts = await lookup.txt(f"_dmarc.{domain}")
    except DomainNotFound:
        return None
    found = [t.decode("utf-8", "replace") for t in texts
             if re.match(rb"\s*v\s*=\s*DMARC1\s*(;|$)", t)]
    if len(found) != 1:
        return None
    return parse(found[0])


def aligned(identifier: str, from_domain: str, mode: str) -> bool:
    """Identifier alignment (section 3.1): strict: same name; relaxed: same organisational domain."""
    identifier, from_domain = identifier.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return identifier == from_domain
    return org_domain(identifier) == org_domain(from_domain)


async def evaluate(lookup: Lookup, from_domain: str, spf: SPFResult | None, dkim: Sequence[DKIMResult],
                   sample: Callable[[], float] = random.random) -> DMARCResult:
    """DMARC for a message whose From: domain is ``from_domain`` (see the module documentation)."""
    from_domain = from_domain.lower().rstrip(".")
    org = org_domain(from_domain)
    try:
        record = await _record(lookup, from_domain)
        at_org = False
        if record is None and org != from_domain:
            record, at_org = await _record(lookup, org), True
    except TemporaryDNSError as e:
        return DMARCResult("temperror", from_domain, reason=f"DNS trouble looking up _dmarc: {e}")
    if record is None:
        return DMARCResult("none", from_domain, reason="no DMARC record")
    requested = record.sp if at_org else record.p
    dkim_aligned = [r for r in dkim if r.domain and aligned(r.domain, from_domain, record.adkim)]
    spf_aligned = spf is not None and aligned(spf.domain, from_domain, record.aspf)
    if any(r.result == "pass" for r in dkim_aligned):
        return DMARCResult("pass", from_domain, requested, requested, reason="aligned DKIM pass")
    if spf_aligned and spf is not None and spf.result == "pass":
        return DMARCResult("pass", from_domain, requested, requested, reason="aligned SPF pass")
    if any(r.result == "temperror" for r in dkim_aligned) or (
            spf_aligned and spf is not None and spf.result == "temperror"):
        return DMARCResult("temperror", from_domain, requested, requested,
                           reason="an aligned check had DNS trouble")
    policy = requested
    if record.pct < 100 and sample() * 100 >= record.pct:
        policy = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    return DMARCResult("fail", from_domain, policy, requested, reason="nothing aligned passed")


class FromError(ValueError):
    """No usable RFC5322.From domain (none, several, or unparsable)."""


def from_domain(headers: bytes) -> str:
    """The domain of the one author in the From: header(s) of a header block.

    :raises FromError: no From:, several authors in different domains, or no domain
        (section 6.6.1: such messages cannot be checked; they are recorded, never passed).
    """
    values = [v for n, v in _header_fields(headers) if n.lower() == "from"]
    if not values:
        raise FromError("no From: header")
    domains = set()
    for value in values:
        for _, address in email.utils.getaddresses([value]):
            local, at, domain = address.rpartition("@")
            if not at or not local or not domain:
                raise FromError(f"From: {value.strip()[:80]!r} has no domain")
            domains.add(domain.lower().rstrip("."))
    if len(domains) != 1:
        raise FromError("From: names several domains" if domains else "From: names no address")
    return domains.pop()


def _header_fields(headers: bytes) -> list[tuple[str, str]]:
    """(name, unfolded value) for each header field of a header block."""
    fields: list[tuple[str, str]] = []
    for line in headers.decode("utf-8", "replace").replace("\r\n", "\n").split("\n"):
        if not line:
            break
        if line[0] in " \t" and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return fields
