"""SPF (RFC 7208): does the domain of MAIL FROM (or of HELO) allow the client to send?

:func:`evaluate` picks the identity (MAIL FROM; ``postmaster@HELO`` for the null sender
``<>``, RFC 7208 section 2.4) and runs :func:`check_host` (section 4), which answers one of
``none neutral pass fail softfail temperror permerror`` (section 2.6).

Everything RFC 7208 asks of a verifier is here: every mechanism (``all include a mx ptr ip4
ip6 exists``) with its dual CIDR lengths, the ``redirect`` and ``exp`` modifiers (unknown
modifiers are syntax-checked and ignored), macros (section 7, :mod:`.spfmacro`), the limit
of 10 terms that cause DNS lookups and the limit of 2 void lookups (section 4.6.4), at most
10 MX hosts and 10 PTR names looked at.  DNS is asked through a
:class:`~mailguard.senderauth.lookup.Lookup`: no lookup ever blocks the reactor.  A DNS
timeout or SERVFAIL gives ``temperror`` (section 2.6.6), never ``pass``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field

from mailguard.senderauth import spfmacro
from mailguard.senderauth.lookup import DomainNotFound, Lookup, TemporaryDNSError

RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")
MAX_LOOKUPS = 10        # section 4.6.4
MAX_VOID_LOOKUPS = 2
MAX_NAMES = 10          # MX hosts (over it: permerror) and PTR names (the rest ignored)
DEFAULT_EXPLANATION = "See https://www.open-spf.org/Why for why SPF failed for %{o}"

_QUALIFIERS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
_MODIFIER = re.compile(r"^([a-zA-Z][a-zA-Z0-9\-_.]*)=(.*)$", re.DOTALL)
_MECHANISM = re.compile(r"^([+\-~?]?)([a-zA-Z][a-zA-Z0-9\-_.]*)(.*)$", re.DOTALL)
_CIDR = re.compile(r"^(.*?)(?:/(0|[1-9][0-9]{0,2}))?(?://(0|[1-9][0-9]{0,2}))?$", re.DOTALL)
_TOPLABEL = re.compile(r"\.([a-z0-9]*[a-z][a-z0-9]*|[a-z0-9]+-[a-z0-9\-]*[a-z0-9])\.?$", re.I)
_VERSION = re.compile(r"^v=spf1(?: |$)", re.I)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class SPFResult:
    """The outcome for one identity: ``result`` is one of :data:`RESULTS`."""

    result: str
    identity: str        # "mailfrom" or "helo" (RFC 8601 section 2.7.2)
    sender: str          # the checked sender, "postmaster@HELO" for the HELO identity
    domain: str
    explanation: str = ""   # for "fail": the domain's explanation (exp=) or the default
    reason: str = ""        # what decided: a mechanism, or why it is an error


class _Error(Exception):
    """Stops evaluation with ``result`` (temperror or permerror)."""

    def __init__(self, result: str, reason: str) -> None:
        super().__init__(reason)
        self.result = result
        self.reason = reason


def _perm(reason: str) -> _Error:
    return _Error("permerror", reason)


@dataclass(frozen=True)
class _Term:
    qualifier: str
    name: str
    spec: str          # domain-spec ("" = the current domain) or the ip4/ip6 network
    cidr4: int
    cidr6: int


@dataclass(frozen=True)
class _Record:
    terms: tuple[_Term, ...]
    redirect: str | None
    exp: str | None


@dataclass
class _Session:
    lookup: Lookup
    ip: IPAddress
    facts: spfmacro.Facts
    default_explanation: str
    lookups: int = 0
    voids: int = 0
    validated: dict[str, str] = field(default_factory=dict)

    def count(self) -> None:
        self.lookups += 1
        if self.lookups > MAX_LOOKUPS:
            raise _perm(f"more than {MAX_LOOKUPS} DNS lookups")

    def void(self) -> None:
        self.voids += 1
        if self.voids > MAX_VOID_LOOKUPS:
            raise _perm(f"more than {MAX_VOID_LOOKUPS} void DNS lookups")


async def evaluate(lookup: Lookup, ip: str, mail_from: str, helo: str, receiver: str = "unknown",
                   default_explanation: str = DEFAULT_EXPLANATION) -> SPFResult:
    """SPF for MAIL FROM ``mail_from`` (``""`` for ``<>``: the HELO identity) from ``ip``."""
    if mail_from:
        identity, sender = "mailfrom", mail_from
    else:
        identity, sender = "helo", f"postmaster@{helo}"
    local, _, domain = sender.rpartition("@")
    if not local:
        sender = f"postmaster@{domain}"
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    facts = spfmacro.Facts(ip=str(addr), sender=sender, domain=domain, helo=helo, receiver=receiver)
    session = _Session(lookup, addr, facts, default_explanation)
    if not _valid_domain(domain):
        return SPFResult("none", identity, sender, domain, reason="not a valid domain name")
    try:
        result, explanation, reason = await _check_host(session, domain)
    except _Error as e:
        return SPFResult(e.result, identity, sender, domain, reason=e.reason)
    return SPFResult(result, identity, sender, domain, explanation, reason)


def _valid_domain(domain: str) -> bool:
    """Section 4.3: a multi-label name, no label empty (but the root) or over 63 octets."""
    labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
    return len(labels) > 1 and all(0 < len(label) <= 63 for label in labels)


async def _check_host(session: _Session, domain: str) -> tuple[str, str, str]:
    """check_host() for ``domain``: (result, explanation, reason); raises :class:`_Error`."""
    facts = spfmacro.Facts(session.facts.ip, session.facts.sender, domain, session.facts.helo,
                           session.facts.receiver, session.facts.timestamp)
    record = await _record(session, domain)
    if record is None:
        return "none", "", f"no SPF record at {domain}"
    for term in record.terms:
        if await _matches(session, facts, term):
            result = _QUALIFIERS[term.qualifier]
            explanation = await _explain(session, facts, record) if result == "fail" else ""
            return result, explanation, f"{term.qualifier}{term.name} matched at {domain}"
    if record.redirect is not None:
        session.count()
        target = _target(record.redirect, facts, session)
        if not _valid_domain(target):
            raise _perm(f"redirect to an invalid name {target!r}")
        result, explanation, reason = await _check_host(session, target)
        if result == "none":
            raise _perm(f"redirect to {target}, which has no SPF record")
        return result, explanation, reason
    return "neutral", "", f"no mechanism matched at {domain}"


async def _record(session: _Session, domain: str) -> _Record | None:
    """The one SPF record of ``domain`` (section 4.5), parsed, or None."""
    try:
        texts = await session.lookup.txt(domain)
    except DomainNotFound:
        return None
    except TemporaryDNSError as e:
        raise _Error("temperror", f"DNS trouble looking up the SPF record of {domain}: {e}") from e
    records = [t.decode("utf-8", "replace") for t in texts if _VERSION.match(t.decode("utf-8", "replace"))]
    if not records:
        return None
    if len(records) > 1:
        raise _perm(f"{domain} has {len(records)} SPF records")
    return _parse(records[0])      # cached: one parse per distinct record text


@functools.lru_cache(maxsize=1024)
def _parse(text: str) -> _Record:
    """Parse one ``v=spf1`` record (section 4.6): any syntax error is a permerror."""
    terms: list[_Term] = []
    modifiers: dict[str, str] = {}
    for word in text.split(" ")[1:]:
        if not word:
            continue
        mod = _MODIFIER.match(word)
        if mod:
            name, value = mod.group(1).lower(), mod.group(2)
            if name in ("redirect", "exp"):
                if name in modifiers:
                    raise _perm(f"more than one {name}= modifier")
                _domain_spec(value)
                modifiers[name] = value
            else:
                _macro(value)
            continue
        terms.append(_mechanism(word))
    return _Record(tuple(terms), modifiers.get("redirect"), modifiers.get("exp"))


def _mechanism(word: str) -> _Term:
    m = _MECHANISM.match(word)
    if not m:
        raise _perm(f"unknown term {word!r}")
    qualifier, name, rest = m.group(1) or "+", m.group(2).lower(), m.group(3)
    if name == "all":
        if rest:
            raise _perm(f"bad term {word!r}")
        return _Term(qualifier, name, "", 32, 128)
    if name in ("include", "exists"):
        if not rest.startswith(":"):
            raise _perm(f"{name} needs a domain: {word!r}")
        return _Term(qualifier, name, _domain_spec(rest[1:]), 32, 128)
    if name == "ptr":
        if rest and not rest.startswith(":"):
            raise _perm(f"bad term {word!r}")
        return _Term(qualifier, name, _domain_spec(rest[1:]) if rest else "", 32, 128)
    if name in ("a", "mx"):
        c = _CIDR.match(rest)
        assert c is not None  # the pattern matches any string
        spec, cidr4, cidr6 = c.group(1), int(c.group(2) or 32), int(c.group(3) or 128)
        if cidr4 > 32 or cidr6 > 128:
            raise _perm(f"bad CIDR length in {word!r}")
        if spec and not spec.startswith(":"):
            raise _perm(f"bad term {word!r}")
        return _Term(qualifier, name, _domain_spec(spec[1:]) if spec else "", cidr4, cidr6)
    if name in ("ip4", "ip6"):
        if not rest.startswith(":"):
            raise _perm(f"{name} needs an address: {word!r}")
        return _Term(qualifier, name, str(_network(name, rest[1:])), 32, 128)
    raise _perm(f"unknown mechanism {word!r}")


def _network(name: str, text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    address, slash, length = text.partition("/")
    limit = 32 if name == "ip4" else 128
    if slash and not re.fullmatch(r"0|[1-9][0-9]{0,2}", length) or slash and int(length) > limit:
        raise _perm(f"bad CIDR length in {name}:{text}")
    try:
        addr = (ipaddress.IPv4Address if name == "ip4" else ipaddress.IPv6Address)(address)
    except ValueError as e:
        raise _perm(f"bad address in {name}:{text}") from e
    return ipaddress.ip_network(f"{addr}/{length if slash else limit}", strict=False)


def _macro(text: str, explanation: bool = False) -> None:
    try:
        spfmacro.check(text, explanation)
    except spfmacro.MacroError as e:
        raise _perm(str(e)) from e


def _domain_spec(text: str) -> str:
    """Check a domain-spec (section 7.1): a macro string ending in a macro or a top label."""
    _macro(text)
    if not text or not (re.search(r"%(?:\{[^}]*\}|[%_\-])$", text) or _TOPLABEL.search(text)):
        raise _perm(f"bad domain-spec {text!r}")
    return text


def _target(spec: str, facts: spfmacro.Facts, session: _Session) -> str:
    """The name a domain-spec expands to; over 253 octets, left labels are dropped (7.3)."""
    name = spfmacro.expand(spec, facts, session.validated.get(facts.domain, "unknown"))
    name = name.rstrip(".")
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    return name


async def _needs_p(session: _Session, facts: spfmacro.Facts, spec: str) -> None:
    """Look up the validated name for the ``p`` macro when ``spec`` uses it."""
    if re.search(r"%\{p", spec, re.I) and facts.domain not in session.validated:
        names = await _validated_names(session, facts.domain)
        session.validated[facts.domain] = _choose(names, facts.domain)


def _choose(names: list[str], domain: str) -> str:
    """The ``p`` value: the target itself, else a subdomain of it, else any validated name."""
    domain = domain.lower()
    for name in names:
        if name.lower() == domain:
            return name
    for name in names:
        if name.lower().endswith("." + domain):
            return name
    return names[0] if names else "unknown"


async def _expanded(session: _Session, facts: spfmacro.Facts, spec: str) -> str:
    if not spec:
        return facts.domain
    await _needs_p(session, facts, spec)
    return _target(spec, facts, session)


async def _matches(session: _Session, facts: spfmacro.Facts, term: _Term) -> bool:
    """Does one mechanism match (section 5)?  Raises :class:`_Error` to stop evaluation."""
    name = term.name
    if name == "all":
        return True
    if name in ("ip4", "ip6"):
        return session.ip in _cached_network(term.spec)
    session.count()
    target = await _expanded(session, facts, term.spec)
    if name == "include":
        if not _valid_domain(target):
            raise _perm(f"include of an invalid name {target!r}")
        result, _, reason = await _check_host(session, target)
        if result in ("temperror", "permerror"):
            raise _Error(result, reason)
        if result == "none":
            raise _perm(f"include:{target} has no SPF record")
        return result == "pass"
    if name == "exists":
        return bool(await _addresses(session, target, 4, void=True))
    if name == "a":
        return _within(session, await _addresses(session, target, session.ip.version, void=True), term)
    if name == "mx":
        hosts = await _mx_hosts(session, target)
        for host in hosts:
            if _within(session, await _addresses(session, host, session.ip.version), term):
                return True
        return False
    # ptr (section 5.5)
    return any(_same_or_sub(n, target) for n in await _validated_names(session, target))


@functools.lru_cache(maxsize=4096)
def _cached_network(spec: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(spec)


def _within(session: _Session, addresses: list[str], term: _Term) -> bool:
    length = term.cidr4 if session.ip.version == 4 else term.cidr6
    return any(session.ip in ipaddress.ip_network(f"{a}/{length}", strict=False) for a in addresses)


def _same_or_sub(name: str, target: str) -> bool:
    name, target = name.lower().rstrip("."), target.lower().rstrip(".")
    return name == target or name.endswith("." + target)


async def _addresses(session: _Session, name: str, version: int, void: bool = False) -> list[str]:
    """A or AAAA records; NXDOMAIN or none at all is a void lookup when ``void``."""
    if not _valid_domain(name):
        if void:
            session.void()
        return []
    try:
        found = await (session.lookup.a(name) if version == 4 else session.lookup.aaaa(name))
    except DomainNotFound:
        found = []
    except TemporaryDNSError as e:
        raise _Error("temperror", f"DNS trouble looking up {name}: {e}") from e
    if not found and void:
        session.void()
    return found


async def _mx_hosts(session: _Session, name: str) -> list[str]:
    if not _valid_domain(name):
        session.void()
        return []
    try:
        records = await session.lookup.mx(name)
    except DomainNotFound:
        records = []
    except TemporaryDNSError as e:
        raise _Error("temperror", f"DNS trouble looking up MX {name}: {e}") from e
    if not records:
        session.void()
    if len(records) > MAX_NAMES:
        raise _perm(f"{name} has more than {MAX_NAMES} MX records")
    return [host for _, host in sorted(records, key=lambda r: r[0])]


async def _validated_names(session: _Session, target: str) -> list[str]:
    """Section 5.5: PTR names of the client whose A/AAAA records contain it (10 at most)."""
    try:
        names = await session.lookup.ptr(str(session.ip))
    except DomainNotFound:
        names = []
    except TemporaryDNSError:
        return []
    if not names:
        session.void()
    validated = []
    for name in names[:MAX_NAMES]:
        try:
            addresses = await (session.lookup.a(name) if session.ip.version == 4
                               else session.lookup.aaaa(name))
        except (DomainNotFound, TemporaryDNSError):
            continue
        if any(ipaddress.ip_address(a) == session.ip for a in addresses):
            validated.append(name)
    return validated


async def _explain(session: _Session, facts: spfmacro.Facts, record: _Record) -> str:
    """The explanation for a fail (section 6.2): exp= if it works, else the default."""
    default = session.default_explanation
    try:
        default = spfmacro.expand(default, facts)
    except (spfmacro.MacroError, ValueError):
        pass
    if record.exp is None:
        return default
    try:
        name = await _expanded(session, facts, record.exp)
        texts = await session.lookup.txt(name) if _valid_domain(name) else []
        if len(texts) != 1:
            return default
        text = texts[0].decode("ascii")
        spfmacro.check(text, explanation=True)
        await _needs_p(session, facts, text)
        return spfmacro.expand(text, facts, session.validated.get(facts.domain, "unknown"))
    except (DomainNotFound, TemporaryDNSError, UnicodeDecodeError, spfmacro.MacroError, _Error):
        return default
