"""The community RFC 7208 test suite (tests/data/rfc7208-tests.yml, from pyspf 2.0.14's
source distribution; its license is tests/data/rfc7208-tests.LICENSE) run through
:func:`mailguard.senderauth.spf.evaluate`, DNS answered from each scenario's zonedata.

Every case must give one of its allowed results, and the expected explanation when the
case names one.  The zone follows the suite's own driver: an ``SPF`` record stands for a
``TXT`` record too unless the name has TXT records, ``TXT: NONE`` means no TXT record,
``TIMEOUT`` is a temporary error for the types not listed before it, and a name under
``error.`` that is not in the zone times out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mailguard.senderauth import spf
from senderauth_doubles import FakeLookup, run

SUITE = Path(__file__).parent / "data" / "rfc7208-tests.yml"
DEFAULT = "DEFAULT"

# Cases our evaluator answers differently, with the reason (none at present).
KNOWN: dict[str, str] = {}


def _zone(zonedata: dict[str, list[Any]]) -> dict[str, list[tuple[str, Any]]]:
    zone: dict[str, list[tuple[str, Any]]] = {}
    for name, entries in zonedata.items():
        rrs: list[tuple[str, Any]] = []
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        for entry in entries:
            if entry == "TIMEOUT":
                rrs.append(("TIMEOUT", None))
                continue
            ((kind, value),) = entry.items()
            if kind == "SPF":
                if has_txt:
                    continue
                kind = "TXT"
            if value == "NONE":
                continue
            if kind == "MX":
                value = tuple(value)
            rrs.append((kind, value))
        zone[name] = rrs
    return zone


def _cases() -> list[Any]:
    cases = []
    for scenario in yaml.safe_load_all(SUITE.read_text(encoding="utf-8")):
        zone = _zone(scenario.get("zonedata") or {})
        for name, case in scenario["tests"].items():
            marks = [pytest.mark.xfail(reason=KNOWN[name], strict=True)] if name in KNOWN else []
            cases.append(pytest.param(zone, case, id=name, marks=marks))
    return cases


CASES = _cases()


def test_the_whole_suite_is_here() -> None:
    """All 203 cases of the 2014.04 release are collected (none silently dropped)."""
    assert len(CASES) == 203


@pytest.mark.parametrize("zone,case", CASES)
def test_rfc7208(zone: dict[str, list[tuple[str, Any]]], case: dict[str, Any]) -> None:
    """One suite case: the result is one of the allowed ones (and the explanation matches)."""
    allowed = case["result"] if isinstance(case["result"], list) else [case["result"]]
    outcome = run(spf.evaluate(FakeLookup(zone), str(case["host"]), str(case.get("mailfrom") or ""),
                               str(case.get("helo") or ""), default_explanation=DEFAULT))
    assert outcome.result in allowed, (outcome, case.get("description"))
    if "explanation" in case and outcome.result == "fail":
        assert outcome.explanation == case["explanation"]
