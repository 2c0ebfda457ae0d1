"""Fetch the facts a pure policy step asks for, asynchronously, from a :class:`Directory`.

The policy functions (:func:`mailguard.core.policy.decide`,
:func:`~mailguard.core.policy.resolve_targets`) return
:class:`~mailguard.core.policy.Missing` while they lack an expansion;
:func:`gather` looks each one up through the directory and asks again, until the
step answers.  A directory failure fails the returned Deferred with
:class:`~mailguard.directory.base.DirectoryError` (the caller answers 4xx).
"""

from __future__ import annotations

from typing import Callable, TypeVar

from twisted.internet.defer import Deferred

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
        facts[answer.key] = await directory.expand(answer.key)
