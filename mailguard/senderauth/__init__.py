"""Sender authentication: SPF (RFC 7208), DKIM verification (RFC 6376), DMARC (RFC 7489)
and the Authentication-Results header that records them (RFC 8601).

Every evaluator asks DNS through the small :class:`~mailguard.senderauth.lookup.Lookup`
interface (asynchronous, never blocking the reactor), so that tests hand in a fake one.
"""
