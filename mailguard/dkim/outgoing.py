"""What the office's own mail gets before it is stored: missing headers, DKIM signatures.

For mail from trusted clients (AUTH, ``allow``, ``internal_addresses``,
POP-before-SMTP): ``Date:`` and ``Message-ID:`` are added when missing (RFC 6409
section 8), then, with ``[dkim] sign``, the message is signed when its ``From:``
domain is a local domain with a key (:func:`mailguard.dkim.keys.signing_keys`).
Key lookup and signing run in a thread: RSA and hashing a large body take
milliseconds to seconds of CPU.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer, threads

from mailguard.config import Config
from mailguard.core.headers import add_missing
from mailguard.dkim.keys import KeyFileError, signing_keys
from mailguard.dkim.sign import SigningError, from_domain, sign

RunInThread = Callable[..., "defer.Deferred[bytes]"]


class Outgoing:
    """Prepares a trusted client's message for storage; see the module docstring."""

    def __init__(self, cfg: Config, run_in_thread: RunInThread = threads.deferToThread) -> None:
        self.cfg = cfg
        self.run_in_thread = run_in_thread

    def prepare(self, message: bytes, msg_id: str, now: float) -> defer.Deferred[bytes]:
        """The message to store: headers completed and signed where a key exists.

        Fails with :class:`SigningError` when a key exists but cannot sign (the
        client gets a 4xx and retries; an unsigned copy is never sent instead).
        """
        message = add_missing(message, self.cfg.server.hostname, msg_id, now)
        dkim = self.cfg.dkim
        if not dkim.sign:
            return defer.succeed(message)
        domain = from_domain(message)
        if domain is None or domain not in self.cfg.domains:
            return defer.succeed(message)
        return self.run_in_thread(self._sign, message, domain)

    def _sign(self, message: bytes, domain: str) -> bytes:
        try:
            keys = signing_keys(self.cfg.dkim.keys_dir, domain, self.cfg.dkim.selector)
        except KeyFileError as e:
            raise SigningError(str(e)) from None
        if not keys:
            return message
        return sign(message, keys) + message
