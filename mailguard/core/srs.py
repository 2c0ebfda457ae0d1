"""The Sender Rewriting Scheme: forwarded mail keeps passing SPF, bounces find their way back.

When mailguard forwards a message from ``alice@example.org`` to a remote address (a
contact, a remote list member, a reroute to a remote domain), the next hop checks
SPF for example.org against mailguard's address and fails it.  So the envelope
sender is rewritten into one of our own domains (the domain of the address that
forwarded, which routes back here)::

    SRS0=HHHH=TT=example.org=alice@office.example

``TT`` is the day (days since 1970, modulo 1024, two base32 characters); ``HHHH``
the first four base64 characters of an HMAC-SHA1 over ``TT``, the domain and the
local part (lower case) with a secret only this server knows.  A bounce to that
address is reversed to ``alice@example.org``; an address with a wrong hash, or
older than :data:`MAX_AGE_DAYS`, is a forgery and is refused at RCPT.  An address
that is already SRS0 elsewhere is wrapped as ``SRS1=HHHH=host==HHHH=TT=domain=local``
(the format of Shevek's libsrs2, which Postfix's postsrsd and Exim also read).

Pure functions over strings and a clock value; no I/O.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

MAX_AGE_DAYS = 21
_B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
HASH_LENGTH = 4


class SRSError(ValueError):
    """An SRS address that does not verify: a forgery, a damaged or an expired one."""


@dataclass(frozen=True)
class SRS:
    """Rewriting with one secret; ``now`` is seconds since the epoch (injected for tests)."""

    secret: bytes

    def _hash(self, *parts: str) -> str:
        mac = hmac.new(self.secret, "".join(parts).lower().encode("utf-8"), hashlib.sha1).digest()
        return base64.b64encode(mac).decode("ascii")[:HASH_LENGTH]

    @staticmethod
    def _stamp(now: float) -> str:
        day = int(now // 86400) % 1024
        return _B32[day >> 5] + _B32[day & 31]

    @staticmethod
    def _age(stamp: str, now: float) -> int:
        if len(stamp) != 2 or any(c not in _B32 for c in stamp.upper()):
            raise SRSError("bad timestamp")
        then = (_B32.index(stamp[0].upper()) << 5) | _B32.index(stamp[1].upper())
        return (int(now // 86400) - then) % 1024

    def forward(self, sender: str, domain: str, now: float) -> str:
        """The rewritten envelope sender for forwarding ``sender`` through ``domain``."""
        local, _, sender_domain = sender.rpartition("@")
        if not local or not sender_domain:
            raise SRSError(f"not an address: {sender!r}")
        upper = local.upper()
        if upper.startswith("SRS0") and len(local) > 4 and local[4] in "=-+":
            rest = local[5:]
            return f"SRS1={self._hash(sender_domain, rest)}={sender_domain}=={rest}@{domain}"
        if upper.startswith("SRS1") and len(local) > 4 and local[4] in "=-+":
            _, _, tail = local[5:].partition("=")          # drop the old hash, keep host==rest
            host, _, rest = tail.partition("==")
            if not host or not rest:
                raise SRSError(f"malformed SRS1 address: {sender!r}")
            return f"SRS1={self._hash(host, rest)}={host}=={rest}@{domain}"
        stamp = self._stamp(now)
        return f"SRS0={self._hash(stamp, sender_domain, local)}={stamp}={sender_domain}={local}@{domain}"

    def reverse(self, local: str, now: float) -> str:
        """The address an SRS local part stands for; :class:`SRSError` when it does not verify."""
        upper = local.upper()
        if upper.startswith("SRS0") and len(local) > 4 and local[4] in "=-+":
            parts = local[5:].split("=", 3)
            if len(parts) != 4 or not all(parts):
                raise SRSError("malformed SRS0 address")
            mac, stamp, domain, orig = parts
            if not hmac.compare_digest(mac.upper(), self._hash(stamp, domain, orig).upper()):
                raise SRSError("hash does not verify")
            if self._age(stamp, now) > MAX_AGE_DAYS:
                raise SRSError("expired")
            return f"{orig}@{domain}"
        if upper.startswith("SRS1") and len(local) > 4 and local[4] in "=-+":
            mac, _, tail = local[5:].partition("=")
            host, _, rest = tail.partition("==")
            if not mac or not host or not rest:
                raise SRSError("malformed SRS1 address")
            if not hmac.compare_digest(mac.upper(), self._hash(host, rest).upper()):
                raise SRSError("hash does not verify")
            return f"SRS0={rest}@{host}"
        raise SRSError("not an SRS address")


def is_srs(local: str) -> bool:
    """True when a local part has the SRS0/SRS1 form (and so must verify to be accepted)."""
    head = local[:5].upper()
    return head[:4] in ("SRS0", "SRS1") and len(head) == 5 and head[4] in "=-+"
