"""What sender authentication decides for one SMTP transaction from an untrusted client.

The ``[checks]`` keys ``spf``, ``dkim_verify`` and ``dmarc`` (:class:`Modes`) decide what
runs.  SPF runs at MAIL (:func:`spf_at_mail`); DKIM and DMARC once the message is in
(:func:`after_data`), which also writes the Authentication-Results header and removes
incoming ones that name this host.  DMARC needs both SPF and DKIM, so with ``dmarc`` on
they run (and are recorded) even when their own key is off.

Refusals (:class:`~mailguard.core.checks.Refusal`, each naming its rule):

- ``spf = "reject"``: ``fail`` gets ``spf_fail``; ``temperror`` gets
  :data:`~mailguard.core.DNS_TEMPFAIL` (4xx); ``permerror``, ``softfail``,
  ``neutral`` and ``none`` are recorded only — as Postfix's policyd-spf does by default
  (``PermError_reject = False``): a broken record at the sender's domain is its
  administrator's problem, not a verdict on this message.
- ``dmarc = "reject"``: ``dmarc_reject`` only when the policy that applies (after ``sp=``
  and ``pct=``) is ``reject`` and nothing aligned passed; a DMARC ``temperror`` (DNS
  trouble, with nothing aligned passing) gets :data:`~mailguard.core.DNS_TEMPFAIL`.
- ``"check"`` never refuses: the results go into Authentication-Results.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from mailguard.core.checks import DNS_TEMPFAIL, Refusal
from mailguard.core.replies import Reply
from mailguard.senderauth import authresults, dkimverify, dmarc, spf
from mailguard.senderauth.dkimverify import DKIMResult
from mailguard.senderauth.dmarc import DMARCResult
from mailguard.senderauth.lookup import Lookup
from mailguard.senderauth.spf import SPFResult


@dataclass(frozen=True)
class Modes:
    """``[checks] spf`` ("off"|"check"|"reject"), ``dkim_verify``, ``dmarc`` ("off"|"check"|"reject")."""

    spf: str = "off"
    dkim_verify: bool = False
    dmarc: str = "off"

    @property
    def on(self) -> bool:
        """Any of the three is on: Authentication-Results is written."""
        return self.spf != "off" or self.dkim_verify or self.dmarc != "off"

    @property
    def runs_spf(self) -> bool:
        return self.spf != "off" or self.dmarc != "off"

    @property
    def runs_dkim(self) -> bool:
        return self.dkim_verify or self.dmarc != "off"


@dataclass(frozen=True)
class Verdict:
    """After DATA: the header to add, the message without forged results, and any refusal."""

    header: bytes
    message: bytes
    refusal: Refusal | None
    dkim: tuple[DKIMResult, ...]
    dmarc: DMARCResult | None


async def spf_at_mail(modes: Modes, lookup: Lookup, ip: str, mail_from: str, helo: str,
                      spf_fail: Reply, receiver: str = "unknown") -> tuple[SPFResult | None, Refusal | None]:
    """Evaluate SPF for MAIL FROM (``""`` for ``<>``); the refusal when ``spf = "reject"``."""
    if not modes.runs_spf:
        return None, None
    result = await spf.evaluate(lookup, ip, mail_from, helo, receiver)
    if modes.spf != "reject":
        return result, None
    detail = f"spf={result.result} domain={result.domain} ({result.reason})"
    if result.result == "fail":
        return result, Refusal("spf_fail", spf_fail, detail)
    if result.result == "temperror":
        return result, Refusal("spf_temperror", DNS_TEMPFAIL, detail)
    return result, None


async def after_data(modes: Modes, lookup: Lookup, hostname: str, spf_result: SPFResult | None,
                     message: bytes, dmarc_reject: Reply,
                     to_thread: dkimverify.ToThread | None = None,
                     sample: Callable[[], float] = random.random) -> Verdict:
    """DKIM, DMARC and the Authentication-Results header for a received ``message`` (CRLF)."""
    dkim_results: list[DKIMResult] = []
    if modes.runs_dkim:
        # Verified on the message as it came, before anything here changes it.
        dkim_results = await (dkimverify.verify(lookup, message) if to_thread is None
                              else dkimverify.verify(lookup, message, to_thread))
    cleaned, _ = authresults.remove_ours(message, hostname)
    dmarc_result: DMARCResult | None = None
    refusal: Refusal | None = None
    if modes.dmarc != "off":
        try:
            author = dmarc.from_domain(dkimverify.header_block(message))
        except dmarc.FromError as e:
            dmarc_result = DMARCResult("permerror", "", reason=str(e))
        else:
            dmarc_result = await dmarc.evaluate(lookup, author, spf_result, dkim_results, sample)
        if modes.dmarc == "reject":
            detail = f"dmarc={dmarc_result.result} domain={dmarc_result.domain} policy={dmarc_result.policy}"
            if dmarc_result.reject:
                refusal = Refusal("dmarc_reject", dmarc_reject, detail)
            elif dmarc_result.result == "temperror":
                refusal = Refusal("dmarc_temperror", DNS_TEMPFAIL, detail)
    header = authresults.header(hostname, spf_result, dkim_results if modes.runs_dkim else None, dmarc_result)
    return Verdict(header, cleaned, refusal, tuple(dkim_results), dmarc_result)
