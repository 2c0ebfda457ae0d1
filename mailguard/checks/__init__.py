"""The inbound checks against spam (RFC 2505 sections 2.2-2.9, RFC 5782), one module each.

Every check has one shape (:class:`~mailguard.checks.base.Check`): it is given the
facts of the connection and transaction (:class:`~mailguard.checks.base.Facts`) and
answers None (pass) or a :class:`~mailguard.core.checks.Refusal` naming its rule, its
reply and what decided it.  The facts that need DNS are fetched here, asynchronously,
through the shared resolver (:mod:`mailguard.dns`); the decisions on them are the pure
functions of :mod:`mailguard.core.checks`, :mod:`mailguard.core.greylist` and
:mod:`mailguard.core.ratelimit`.

:class:`~mailguard.checks.pipeline.InboundChecks` builds the configured checks from
``[checks]``/``[limits]`` and runs them in order at MAIL (client and sender checks)
and at RCPT (greylisting); the SMTP adapter and ``mailguard explain`` both use it, so
adding a check never means editing the SMTP session.

=================  =====  ==========================================  ========================
check              stage  refuses with (rule = ``[replies]`` key)      trusted clients
=================  =====  ==========================================  ========================
reject_clients     MAIL   client_rejected                             checked
reject_senders     MAIL   sender_rejected                             checked
rate control       MAIL   rate_limited                                per account only
dnsbl              MAIL   dnsbl_listed                                skipped
reverse_dns        MAIL   no_reverse_dns (``require`` only)           skipped
sender_domain      MAIL   sender_domain_unknown                       skipped
spf                MAIL   spf_fail (``spf = "reject"`` only)          skipped
greylist           RCPT   greylisted                                  skipped
dkim, dmarc        DATA   dmarc_reject (``dmarc = "reject"`` only)    skipped
=================  =====  ==========================================  ========================

SPF, DKIM and DMARC (:mod:`mailguard.checks.senderauth`, evaluators in
:mod:`mailguard.senderauth`) also write the Authentication-Results header at the
final dot, through :meth:`~mailguard.checks.pipeline.InboundChecks.at_data`.

DNS trouble in any check is :data:`~mailguard.core.checks.DNS_TEMPFAIL` (451 4.4.3)
under the rule ``<check>_temperror``: never a 5xx and never a pass.
"""
