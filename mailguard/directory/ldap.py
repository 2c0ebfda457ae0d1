"""The directory (the GAL) in the office's LDAP server or Active Directory.

What an entry is
================
For an address, two searches run under ``base`` with the address put into the
configured filters (escaped per RFC 4515, so ``*)(uid=*`` matches nothing):

- ``mailbox_filter`` finds people.  An entry's own address is its ``mail_attribute``
  (under ``schema = "ad"``: the ``SMTP:`` primary of ``proxyAddresses`` first).  When
  that address is in an inbound domain the entry is a **mailbox** and the address
  names its maildir; any other address the filter matches (``mailLocalAddress``,
  ``smtp:`` secondaries) is an **alias** of it.  When the own address is remote (or
  the AD object is a ``contact``, whose ``targetAddress`` wins) the entry is a
  **contact**: mail goes on to that address.
- ``list_filter`` finds **lists**.  Their ``member_attribute`` values are DNs, each
  read once and turned into its address; a member that is itself a group is followed
  (nested groups, up to :data:`MAX_DEPTH` levels, each group once, so loops end).

Several entries matching one address all receive it (as Postfix's LDAP tables do).
A list takes mail from anyone: no sender policy is read from LDAP (``mailguard list
senders`` is for the SQLite directory).
``msExchHideFromAddressLists`` only hides an entry from address books: it is not read.

Answers, including "no such entry", are kept ``cache_ttl`` seconds; concurrent
lookups of one address share one search.  Logins bind as the mailbox's entry with
the given password on a fresh connection (never a pooled one); no hash is read.
An empty password is refused without a bind (it would be an unauthenticated bind,
which servers accept).  Under ``ad``, an account with ``userAccountControl`` bit 2
(ACCOUNTDISABLE) cannot log in; its mail is still delivered (shared mailboxes).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, TypeVar

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailguard.config.ldap import LDAPConfig
from mailguard.directory import ldapconn, ldapfilter
from mailguard.directory.base import DirectoryError, Expansion
from mailguard.directory.ldapconn import Entry

__all__ = ["Found", "LDAPDirectory", "MAX_DEPTH"]

log = Logger(namespace="mailguard")
MAX_DEPTH = 8
MAX_RANGES = 200                # AD member ranges of 1500 read per group (300,000 members)
GROUP_CLASSES = frozenset({"groupofnames", "groupofuniquenames", "group"})
ACCOUNTDISABLE = 0x2
T = TypeVar("T")


@dataclass(frozen=True)
class Found:
    """What the directory holds for one address: the entries and what they deliver to."""

    address: str
    mailboxes: tuple[Entry, ...] = ()          # entries whose own address is local
    contacts: tuple[Entry, ...] = ()           # entries whose own address is remote
    lists: tuple[Entry, ...] = ()
    expansion: Expansion | None = None


class _TTLCache:
    """Answers kept ``ttl`` seconds by the clock; at most ``size`` of them."""

    def __init__(self, clock: Any, ttl: float, size: int = 20000) -> None:
        self.clock = clock
        self.ttl = ttl
        self.size = size
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> tuple[bool, Any]:
        item = self._items.get(key)
        if item is None or item[0] <= self.clock.seconds():
            self._items.pop(key, None)
            return False, None
        return True, item[1]

    def put(self, key: str, value: Any) -> None:
        if self.ttl <= 0:
            return
        self._items[key] = (self.clock.seconds() + self.ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)


@dataclass
class _Walk:
    mailboxes: dict[str, None] = field(default_factory=dict)
    others: dict[str, None] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)


class LDAPDirectory:
    """The :class:`~mailguard.directory.base.Directory` interface over LDAP."""

    def __init__(self, cfg: LDAPConfig, reactor: Any, local_domains: Iterable[str], *,
                 timeout: float = 10.0, pool: ldapconn.Pool | None = None) -> None:
        self.cfg = cfg
        self.reactor = reactor
        self.local_domains = frozenset(d.lower() for d in local_domains)
        self.timeout = timeout
        self.pool = pool or ldapconn.Pool(reactor, cfg, timeout=timeout)
        self.ad = cfg.schema == "ad"
        self.address_attributes = tuple(dict.fromkeys(
            ldapfilter.address_attributes(cfg.mailbox_filter) + (cfg.mail_attribute,)))
        wanted = ["objectClass", cfg.mail_attribute, cfg.member_attribute, *self.address_attributes]
        if self.ad:
            wanted += ["proxyAddresses", "targetAddress", "userAccountControl"]
        self.attributes = list(dict.fromkeys(wanted))
        self._cache = _TTLCache(reactor, cfg.cache_ttl)
        self._inflight: dict[str, list[defer.Deferred[Any]]] = {}
        self.ready = True

    # -- the Directory interface ------------------------------------------------

    def expand(self, address: str) -> defer.Deferred[Expansion | None]:
        """Expand an address through aliases, lists and contacts; None when unknown."""
        return self.find(address).addCallback(lambda found: found.expansion)

    def verify_password(self, login: str, password: str) -> defer.Deferred[str | None]:
        """Bind as the login's mailbox entry with ``password``; its address on success."""
        return defer.ensureDeferred(self._verify(login.strip().lower(), password))

    def addresses_of(self, mailbox: str) -> defer.Deferred[frozenset[str]]:
        """The mailbox's own address and the other addresses on its entry."""
        def collect(found: Found) -> frozenset[str]:
            out = {mailbox.lower()}
            for entry in found.mailboxes:
                if self.own_address(entry) == mailbox.lower():
                    out.update(self._addresses(entry))
            return frozenset(out)
        return self.find(mailbox).addCallback(collect)

    def quotas(self, mailboxes: tuple[str, ...]) -> defer.Deferred[dict[str, int]]:
        """No mailbox has its own quota in LDAP: every one gets ``[limits] mailbox_quota``."""
        return defer.succeed({})

    def close(self) -> None:
        """Drop the pooled connections (before twistd forks, and at shutdown)."""
        self.pool.close()

    # -- lookups ----------------------------------------------------------------

    def find(self, address: str) -> defer.Deferred[Found]:
        """Everything the directory holds for ``address`` (cached ``cache_ttl`` seconds)."""
        address = address.strip().lower()
        return self._once("addr:" + address, lambda: self._find(address))

    def _once(self, key: str, compute: Callable[[], Awaitable[T]]) -> defer.Deferred[T]:
        """The cached answer for ``key``, or one shared computation of it."""
        hit, value = self._cache.get(key)
        if hit:
            return defer.succeed(value)
        d: defer.Deferred[T] = defer.Deferred()
        waiters = self._inflight.get(key)
        if waiters is not None:
            waiters.append(d)
            return d
        self._inflight[key] = waiters = [d]

        def settle(result: Any) -> None:
            del self._inflight[key]
            if not isinstance(result, Failure):
                self._cache.put(key, result)
            for w in waiters:
                w.errback(result) if isinstance(result, Failure) else w.callback(result)

        defer.ensureDeferred(compute()).addBoth(settle)   # type: ignore[arg-type]
        return d

    async def _find(self, address: str) -> Found:
        try:
            people_filter = ldapfilter.parse(ldapfilter.fill(self.cfg.mailbox_filter, address))
            list_filter = ldapfilter.parse(ldapfilter.fill(self.cfg.list_filter, address))
        except ldapfilter.FilterError as e:              # cannot happen with a checked template
            raise DirectoryError(f"filter for {address!r}: {e}") from None
        people, groups = await defer.gatherResults([
            self._search(people_filter), self._search(list_filter)], consumeErrors=True).addErrback(_first)
        group_dns = {g.dn for g in groups}
        mailboxes = tuple(e for e in people if e.dn not in group_dns and self._is_mailbox(e))
        contacts = tuple(e for e in people if e.dn not in group_dns and not self._is_mailbox(e)
                         and self.target_of(e))
        if not (mailboxes or contacts or groups):
            return Found(address)
        walk = _Walk()
        for entry in mailboxes:
            walk.mailboxes[self.own_address(entry)] = None
        for entry in contacts:
            walk.others[self.target_of(entry)] = None
        for group in groups:
            walk.seen.add(group.dn.lower())
        for group in groups:
            await self._members(group, walk, 1)
        senders = "anyone" if groups else None            # no sender policy is read from LDAP
        return Found(address, mailboxes, contacts, tuple(groups),
                     Expansion(tuple(walk.mailboxes), tuple(walk.others), senders))

    def _search(self, filt: Any, base: str | None = None) -> defer.Deferred[list[Entry]]:
        if base is None:
            return self.pool.search(self.cfg.base, ldapconn.SCOPE_SUBTREE, filt, self.attributes)
        return self.pool.search(base, ldapconn.SCOPE_BASE, filt, self.attributes)

    async def member_values(self, group: Entry) -> list[str]:
        """Every value of the group's ``member_attribute``, fetching AD's ranges too.

        Active Directory returns at most 1500 values of ``member`` at a time, as
        ``member;range=0-1499``; the rest is read with further requests for
        ``member;range=1500-*`` and so on, until a range ends in ``*``.
        """
        attr = self.cfg.member_attribute
        values = list(group.get(attr))
        entry: Entry | None = group
        for _ in range(MAX_RANGES):
            ranged = [k for k in entry.attrs if k.startswith(attr.lower() + ";range=")] if entry else []
            if not ranged or entry is None:
                break
            values += entry.attrs[ranged[0]]
            end = ranged[0].rpartition("-")[2]
            if end == "*" or not end.isdigit():
                break
            found = await self.pool.search(group.dn, ldapconn.SCOPE_BASE, pureldap_present_objectclass(),
                                           [f"{attr};range={int(end) + 1}-*"])
            entry = found[0] if found else None
        return values

    async def _members(self, group: Entry, walk: _Walk, depth: int) -> None:
        dns = []
        for value in await self.member_values(group):
            if "=" not in value and "@" in value:           # a plain address as a member
                walk.others[value.lower()] = None
            elif value.lower() not in walk.seen:
                walk.seen.add(value.lower())
                dns.append(value)
        entries = await defer.gatherResults([self._entry(dn) for dn in dns], consumeErrors=True).addErrback(_first)
        for entry in entries:
            if entry is None:
                continue                                     # a stale member: deleted entry
            if self._is_group(entry):
                if depth < MAX_DEPTH:
                    await self._members(entry, walk, depth + 1)
            elif self._is_mailbox(entry):
                walk.mailboxes[self.own_address(entry)] = None
            elif self.target_of(entry):
                walk.others[self.target_of(entry)] = None

    def _entry(self, dn: str) -> defer.Deferred[Entry | None]:
        """The entry named ``dn`` (cached like any answer), None when it does not exist."""
        async def read() -> Entry | None:
            found = await self._search(pureldap_present_objectclass(), base=dn)
            return found[0] if found else None
        return self._once("dn:" + dn.lower(), read)

    # -- what an entry is -------------------------------------------------------

    def own_address(self, entry: Entry) -> str:
        """The entry's own address: AD's ``SMTP:`` primary, else ``mail_attribute``."""
        if self.ad:
            for value in entry.get("proxyAddresses"):
                if value.startswith("SMTP:"):
                    return value[5:].strip().lower()
        values = entry.get(self.cfg.mail_attribute)
        return values[0].strip().lower() if values else ""

    def _is_group(self, entry: Entry) -> bool:
        classes = {c.lower() for c in entry.get("objectClass")}
        return bool(classes & GROUP_CLASSES) or bool(entry.get(self.cfg.member_attribute))

    def _is_mailbox(self, entry: Entry) -> bool:
        if self.ad and "contact" in {c.lower() for c in entry.get("objectClass")}:
            return False
        address = self.own_address(entry)
        return "@" in address and address.rpartition("@")[2] in self.local_domains

    def target_of(self, entry: Entry) -> str:
        """Where a contact's mail goes: AD's ``targetAddress``, else its own address."""
        if self.ad:
            for value in entry.get("targetAddress"):
                return value.split(":", 1)[1].strip().lower() if value.lower().startswith("smtp:") else value.lower()
        address = self.own_address(entry)
        return address if "@" in address else ""

    def _addresses(self, entry: Entry) -> set[str]:
        out = set()
        for attr in self.address_attributes:
            for value in entry.get(attr):
                if attr.lower() == "proxyaddresses":
                    if not value.lower().startswith("smtp:"):
                        continue                             # X400:, SIP: ...
                    value = value[5:]
                out.add(value.strip().lower())
        return out

    # -- logins -----------------------------------------------------------------

    async def _verify(self, login: str, password: str) -> str | None:
        if not password or not login:
            return None
        found = await self.find(login)
        if len(found.mailboxes) != 1 or found.lists or found.contacts:
            # Bind anyway, as a DN that does not exist, so that an unknown login
            # takes as long as a wrong password and does not tell who has an account.
            try:
                await self._bind_ok(f"cn=mailguard-no-such-login,{self.cfg.base}", password)
            except DirectoryError:
                pass
            return None
        entry = found.mailboxes[0]
        ok = await self._bind_ok(entry.dn, password)
        if ok and self.ad and _disabled(entry):
            log.info("mailguard ldap: login as {login} refused: the account is disabled", login=login)
            return None
        return self.own_address(entry) if ok else None

    async def _bind_ok(self, dn: str, password: str) -> bool:
        """Whether the server accepts ``password`` for ``dn`` (on a connection of its own)."""
        conn = await ldapconn.open_connection(self.reactor, self.cfg, self.timeout)
        try:
            await conn.bind(dn, password)
        except ldapconn.BindRefused:
            return False
        except DirectoryError:
            raise
        except Exception as e:
            raise DirectoryError(f"{self.cfg.url}: bind as a user: {e or type(e).__name__}") from None
        finally:
            conn.close()
        return True

    # -- for the CLI --------------------------------------------------------------

    async def check(self) -> str:
        """Bind as the service account once; a line saying what answered."""
        conn = await ldapconn.bound_connection(self.reactor, self.cfg, self.timeout,
                                               self.cfg.bind_dn, self.cfg.bind_password)
        try:
            base = await conn.search(self.cfg.base, ldapconn.SCOPE_BASE, pureldap_present_objectclass(), ["objectClass"])
        finally:
            conn.close()
        if not base:
            raise DirectoryError(f"{self.cfg.url}: the base {self.cfg.base!r} does not exist")
        who = self.cfg.bind_dn or "anonymous"
        return f"ldap: {self.cfg.url} ({self.cfg.tls}) bound as {who}; base {self.cfg.base} found"


def pureldap_present_objectclass() -> Any:
    """``(objectClass=*)``: matches every entry (a base-scope read of one DN)."""
    return ldapfilter.parse("(objectClass=*)")


def _disabled(entry: Entry) -> bool:
    for value in entry.get("userAccountControl"):
        try:
            return bool(int(value) & ACCOUNTDISABLE)
        except ValueError:
            return True                                      # unreadable: do not let it in
    return False


def _first(failure: Any) -> Any:
    """gatherResults wraps the first failure in FirstError: unwrap it."""
    if failure.check(defer.FirstError):
        return failure.value.subFailure
    return failure
