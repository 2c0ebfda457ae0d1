"""DKIM verification (RFC 6376) with dkimpy, its DNS asked ahead through our resolver.

:func:`verify` answers one :class:`DKIMResult` per ``DKIM-Signature`` header (at most
:data:`MAX_SIGNATURES`, the first ones), with the results of RFC 8601 section 2.7.1:

- ``pass``: the signature verifies;
- ``fail``: it does not (altered body or headers, expired, key too small);
- ``neutral``: the signature cannot be processed (bad syntax, missing required tags);
- ``temperror``: the key could not be fetched now (DNS timeout or SERVFAIL);
- ``permerror``: there is no key (``selector._domainkey.domain`` has no TXT record) or it
  is unusable (revoked, unknown algorithm, bad syntax).

The order of work keeps the reactor free: the header block is parsed on the reactor
(it is small), every key record is asked at once through a
:class:`~mailguard.senderauth.lookup.Lookup`, then the hashing and the RSA/Ed25519
checks, which cost a millisecond of pure Python per signature and more on a big
message, run off the reactor in one call, dkimpy reading the keys fetched ahead
through its ``dnsfunc`` argument (it does no DNS itself).  That call goes to a thread
(``deferToThread``) by default; the server hands it to :class:`WorkerProcesses`
instead, because a thread still holds Python's interpreter lock while it hashes, so
it slows the reactor down as much as doing the work on it would; a worker process
uses another core.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import dkim
import dkim.util
from twisted.internet import defer, threads

from mailguard.senderauth.lookup import DomainNotFound, Lookup, TemporaryDNSError

MAX_SIGNATURES = 5      # more are not verified: each costs a key lookup and an RSA check
MIN_KEY_BITS = 1024     # RFC 8301 section 3.2: smaller RSA keys do not verify

#: Runs ``work(*args)`` off the reactor: ``deferToThread``, or a :class:`WorkerProcesses`.
ToThread = Callable[..., Awaitable[list["DKIMResult"]]]
_quiet = logging.getLogger("mailguard.senderauth.dkimpy")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


@dataclass(frozen=True)
class DKIMResult:
    """The result for one signature; ``domain`` is d=, ``selector`` s=, ``identity`` i=."""

    result: str
    domain: str = ""
    selector: str = ""
    identity: str = ""
    algorithm: str = ""
    reason: str = ""


@dataclass(frozen=True)
class _Signature:
    domain: str
    selector: str
    identity: str
    algorithm: str

    @property
    def key_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def _in_thread(work: Callable[..., list[DKIMResult]], *args: Any) -> Awaitable[list[DKIMResult]]:
    return threads.deferToThread(work, *args)


class WorkerProcesses:
    """Runs the verification in worker processes (started, with ``spawn``, at the first use).

    A worker that cannot be started or breaks is replaced by a thread for that call: the
    message is still verified, only less cheaply.  :meth:`close` stops the workers.

    :param reactor: for ``callFromThread`` (results come back on the reactor thread).
    :param workers: processes; default one fewer than the CPUs, at least one.
    """

    def __init__(self, reactor: Any, workers: int | None = None) -> None:
        self.reactor = reactor
        self.workers = workers or max(1, (os.cpu_count() or 2) - 1)
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def __call__(self, work: Callable[..., list[DKIMResult]], *args: Any) -> "defer.Deferred[list[DKIMResult]]":
        d: defer.Deferred[list[DKIMResult]] = defer.Deferred()

        def in_thread() -> None:
            threads.deferToThread(work, *args).chainDeferred(d)

        try:
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context("spawn"))
            future = self._pool.submit(work, *args)
        except Exception:
            self._pool = None
            in_thread()
            return d

        def done(f: "concurrent.futures.Future[list[DKIMResult]]") -> None:
            try:
                result = f.result()
            except Exception:
                self.reactor.callFromThread(in_thread)
            else:
                self.reactor.callFromThread(d.callback, result)

        future.add_done_callback(done)
        return d

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def header_block(message: bytes) -> bytes:
    """The header section of a message (CRLF or LF line ends), with its final empty line."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = message.find(sep)
        if end >= 0:
            return message[:end + len(sep)]
    return message


_SIGNATURE_FIELD = re.compile(rb"^dkim-signature[ \t]*:(.*(?:\r?\n[ \t].*)*)", re.I | re.M)


def _signatures(message: bytes) -> list[_Signature | None]:
    """The first signatures' d=, s=, i=, a= (None for one that does not parse)."""
    found: list[_Signature | None] = []
    for m in _SIGNATURE_FIELD.finditer(header_block(message)):
        if len(found) == MAX_SIGNATURES:
            break
        try:
            tags = dkim.util.parse_tag_value(m.group(1).strip())
            found.append(_Signature(tags[b"d"].decode("ascii").lower().rstrip("."),
                                    tags[b"s"].decode("ascii"),
                                    tags.get(b"i", b"").decode("ascii", "replace"),
                                    tags.get(b"a", b"").decode("ascii", "replace")))
        except (dkim.util.InvalidTagValueList, KeyError, UnicodeDecodeError):
            found.append(None)
    return found


async def _key(lookup: Lookup, name: str) -> bytes | str:
    """The key record's text, or "missing" / "temporary"."""
    try:
        records = await lookup.txt(name)
    except DomainNotFound:
        return "missing"
    except TemporaryDNSError:
        return "temporary"
    keys = [r for r in records if r.strip()]
    return keys[0] if keys else "missing"


async def verify(lookup: Lookup, message: bytes,
                 to_thread: ToThread = _in_thread) -> list[DKIMResult]:
    """Verify every DKIM signature of ``message`` (up to :data:`MAX_SIGNATURES`); [] if unsigned.

    ``to_thread`` runs the CPU part (default: the reactor's thread pool).
    """
    signatures = _signatures(message)
    if not signatures:
        return []
    names = sorted({s.key_name for s in signatures if s is not None})
    answers = await defer.gatherResults(
        [defer.Deferred.fromCoroutine(_key(lookup, name)) for name in names], consumeErrors=True)
    keys = dict(zip(names, answers))
    return await to_thread(check_all, message, signatures, keys)


def check_all(message: bytes, signatures: list[_Signature | None],
              keys: dict[str, bytes | str]) -> list[DKIMResult]:
    """The CPU part, run off the reactor: hash and check each signature against its key."""
    signer = dkim.DKIM(message, logger=_quiet, minkey=MIN_KEY_BITS)
    return [_check_one(signer, idx, sig, keys) for idx, sig in enumerate(signatures)]


def _check_one(signer: Any, idx: int, sig: _Signature | None, keys: dict[str, bytes | str]) -> DKIMResult:
    if sig is None:
        return DKIMResult("neutral", reason="signature does not parse")
    found = dict(domain=sig.domain, selector=sig.selector, identity=sig.identity, algorithm=sig.algorithm)
    try:
        prep = signer.verify_headerprep(idx)
    except dkim.ValidationError as e:  # missing tag, expired, i= outside d= (RFC 6376 6.1.1)
        return DKIMResult("permerror", reason=str(e), **found)
    except dkim.DKIMException as e:
        return DKIMResult("neutral", reason=str(e), **found)
    key = keys[sig.key_name]
    if key == "temporary":
        return DKIMResult("temperror", reason=f"DNS trouble fetching {sig.key_name}", **found)
    if key == "missing":
        return DKIMResult("permerror", reason=f"no key at {sig.key_name}", **found)
    assert isinstance(key, bytes)
    try:
        dkim.evaluate_pk(sig.key_name.encode(), key)
        tags = dkim.util.parse_tag_value(key)
    except (dkim.DKIMException, dkim.util.InvalidTagValueList, ValueError) as e:
        return DKIMResult("permerror", reason=f"unusable key at {sig.key_name}: {e}", **found)
    if not tags.get(b"p"):
        return DKIMResult("permerror", reason=f"key at {sig.key_name} is revoked", **found)
    tag_values, include_headers, sigheaders = prep
    try:
        ok = signer.verify_sig(tag_values, include_headers, sigheaders[idx], lambda name, timeout=5: key)
    except dkim.KeyFormatError as e:
        return DKIMResult("fail", reason=str(e), **found)
    except dkim.ValidationError as e:
        return DKIMResult("fail", reason=str(e), **found)
    except dkim.DKIMException as e:
        return DKIMResult("permerror", reason=str(e), **found)
    return DKIMResult("pass" if ok else "fail", reason="" if ok else "signature does not verify", **found)
