"""Fetch the facts a pure policy step asks for, asynchronously, from a :class:`Directory`.

The policy functions (:func:`mailguard.core.policy.decide`,
:func:`~mailguard.core.policy.resolve_targets`) return
:class:`~mailguard.core.policy.Missing` while they lack an expansion;
:func:`gather` looks each one up through the directory and asks again, until the
step answers.  A directory failure fails the returned Deferred with
:class:`~mailguard.directory.base.DirectoryError` (the caller answers 4xx).

An expansion that holds an address that does not parse (a list member written
before members were checked, or by hand) is logged once per lookup, one mail-log
line each, and the address is left out: it cannot be delivered to.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from twisted.internet.defer import Deferred

from mailguard.app import maillog
from mailguard.core.address import AddressError, parse_path
from mailguard.core.entries import Expansion
from mailguard.core.policy import Facts, Missing
from mailguard.directory.base import Directory

T = TypeVar("T")


def gather(step: Callable[[Facts], T | Missing], directory: Directory) -> Deferred[T]:
    """Run ``step`` until it stops returning Missing; fire with its answer.

    Lookups run one after another (each fact may decide which one is needed next).
    """
    return Deferred.fromCoroutine(_gather(step, directory))


async def _gather(step: Callable[[Facts], T | Missing], directory: Directory) -> T:
    facts: dict[str, Expansion | None] = {}
    while True:
        answer = step(facts)
        if not isinstance(answer, Missing):
            return answer
        facts[answer.key] = usable(answer.key, await directory.expand(answer.key))


def usable(key: str, found: Expansion | None) -> Expansion | None:
    """``found`` without the addresses that do not parse, each of them logged."""
    if found is None:
        return None
    bad: list[str] = []
    for text in found.others:
        try:
            parse_path(text)
        except AddressError as e:
            maillog.directory_entry("unusable-address", expanding=key, address=text, reason=e)
            bad.append(text)
    if not bad:
        return found
    return Expansion(found.mailboxes, tuple(o for o in found.others if o not in bad))
