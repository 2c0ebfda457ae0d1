"""MTA-STS (RFC 8461): the policy record, the policy file, and which MX hosts it allows.

Pure functions over text; fetching and caching live in
:mod:`mailguard.outbound.mtasts`.

- The TXT record at ``_mta-sts.<domain>`` (section 3.1) announces a policy and its
  ``id``: ``v=STSv1; id=20160831085700Z;``.
- The policy file at ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (section
  3.2) is ``key: value`` lines: ``version: STSv1``, ``mode: enforce|testing|none``,
  one or more ``mx:`` patterns (``mail.example.com``, ``*.example.net``), and
  ``max_age`` in seconds (at most 31557600).
- A pattern ``*.example.net`` matches exactly one label in front of ``example.net``
  (section 4.1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_AGE_LIMIT = 31557600
MAX_POLICY_SIZE = 64 * 1024
MODES = ("enforce", "testing", "none")
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")


class PolicyError(ValueError):
    """A policy file that is not a valid STSv1 policy."""


@dataclass(frozen=True)
class Policy:
    """A domain's MTA-STS policy."""

    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str = ""

    def allows(self, host: str) -> bool:
        """True when the MX host name matches one of the policy's ``mx`` patterns."""
        return any(matches(pattern, host) for pattern in self.mx)


def record_id(texts: list[bytes]) -> str | None:
    """The ``id`` of the one ``v=STSv1`` record among a name's TXT records, else None.

    Several STSv1 records, or a malformed one, mean no policy (section 3.1).
    """
    found = [t for t in texts if t.strip().startswith(b"v=STSv1")]
    if len(found) != 1:
        return None
    fields = {}
    for part in found[0].decode("ascii", "replace").split(";"):
        key, _, value = part.strip().partition("=")
        if key:
            fields[key.strip()] = value.strip()
    ident = fields.get("id", "")
    return ident if fields.get("v") == "STSv1" and _ID.match(ident) else None


def parse_policy(text: str, ident: str = "") -> Policy:
    """Parse a policy file (section 3.2); :class:`PolicyError` when it is not valid."""
    fields: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"not a key: value line: {line[:60]!r}")
        fields.setdefault(key.strip(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("version is not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in MODES:
        raise PolicyError(f"mode must be enforce, testing or none, not {mode!r}")
    age = (fields.get("max_age") or [""])[0]
    if not age.isdigit():
        raise PolicyError(f"max_age must be a number of seconds, not {age!r}")
    mx = tuple(p.lower().rstrip(".") for p in fields.get("mx", []))
    if mode != "none" and not mx:
        raise PolicyError("no mx pattern")
    return Policy(mode, mx, min(int(age), MAX_AGE_LIMIT), ident)


def matches(pattern: str, host: str) -> bool:
    """Does MX ``host`` match ``pattern`` (a name, or ``*.`` and a name; section 4.1)?"""
    host = host.lower().rstrip(".")
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        label, _, rest = host.partition(".")
        return bool(label) and rest == pattern[2:]
    return host == pattern
