"""The mail transaction: MAIL, RCPT, DATA and the store behind the final dot.

- MAIL needs HELO/EHLO (and AUTH on the submission ports); ``SIZE=`` and ``BODY=``
  are honoured, ``AUTH=`` accepted and not trusted (RFC 4954 section 5).  With
  ``[submission] enforce_sender`` an authenticated client may only use its own
  addresses (asked of the directory).
- Each RCPT is judged by :func:`mailguard.core.policy.decide` on facts fetched
  from the directory (:func:`mailguard.directory.facts.gather`); a directory that
  cannot answer gives the 4xx ``directory_failure``.  A list's sender policy judges
  the client and the envelope sender of MAIL.  One log line per decision.
  An accepted recipient's mailboxes then meet their quotas (:mod:`mailguard.smtp.quota`):
  ``452 4.2.2`` for a full one, ``552 5.2.2`` when ``SIZE=`` would not fit.
- After the final dot: a bare CR or LF anywhere is ``550 5.6.2`` (RFC 5321 section
  2.3.8; a trusted client's bare LF is made CRLF instead, with ``[submission]
  normalize_bare_newlines``), more than :data:`~mailguard.smtp.trace.MAX_HOPS` Received: headers a mail
  loop (554); otherwise ``250`` only once every copy is on disk, ``451`` if the
  store fails (transient, never 550).
- Mail from trusted clients gets a missing ``Date:``/``Message-ID:`` and its DKIM
  signatures (:mod:`mailguard.dkim.outgoing`) just before it is stored; a key that
  cannot sign is a 451.
- The inbound checks (:mod:`mailguard.checks`, through
  :class:`~mailguard.smtp.checking.CheckedSession`) run at MAIL, at each accepted RCPT
  and at the final dot; a refusal is answered with its reply.  Mail from untrusted
  clients gets ``Received: from HELO (NAME [IP])`` with NAME the forward-confirmed
  reverse name or ``unknown``.
- Mail from untrusted clients (and from trusted ones with ``for_trusted``) passes
  the ``[filters]`` milters first: the filtered copy is stored, held when
  quarantined; a refusal is answered as the milter said; a discard answers 250 and
  stores nothing.
"""

from __future__ import annotations

import re
from typing import Mapping

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from mailguard.app import maillog
from mailguard.app.connection import connection
from mailguard.core import policy, quota, replies
from mailguard.core.address import Address, AddressError, parse_mail_arg, parse_path
from mailguard.core.checks import Refusal
from mailguard.core.dotstuff import has_bare_cr
from mailguard.core.entries import Expansion
from mailguard.directory.base import DirectoryError
from mailguard.directory.facts import gather
from mailguard.dkim.sign import SigningError
from mailguard.milter import filtering
from mailguard.milter.client import Facts
from mailguard.smtp import trace
from mailguard.smtp.checking import MAIL, RCPT, CheckedSession
from mailguard.smtp.session import Envelope

_BARE_LF = re.compile(rb"(?<!\r)\n")
# A search that starts at a literal CR: cheaper than ``bytes.find`` of the pattern.
_DOT_LINE = re.compile(rb"\r\n\.")
DATA_GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>\r\n"


CHECK_FAILED = replies.Reply(451, "4.3.0", "Temporary local problem checking this mail, try again later")


class MailCommands(CheckedSession):
    """MAIL, RCPT, DATA and the end of a message."""

    def smtp_MAIL(self, arg: str) -> None:
        if self.helo is None:
            self.reply(replies.HELO_FIRST)
            return
        if self.envelope.sender is not None:
            self.reply(replies.NESTED_MAIL)
            return
        if self.kind != "smtp" and not self.authenticated:
            self.reply(replies.AUTH_REQUIRED)
            return
        try:
            path, params = parse_mail_arg(arg, "FROM")
            sender = parse_path(path, null_ok=True)
        except AddressError:
            self.reply(replies.BAD_SENDER_SYNTAX)
            return
        size = 0
        for name, value in params.items():
            if name == "SIZE" and value is not None and value.isdigit():
                size = int(value)
            elif name == "BODY" and value is not None and value.upper() in ("7BIT", "8BITMIME"):
                pass
            elif name == "AUTH" and value is not None:
                pass                               # RFC 4954 section 5: accepted, not trusted
            else:
                self.reply(replies.BAD_PARAM)
                return
        if size > self.cfg.limits.max_message_size:
            self.reply(replies.TOO_BIG)
            return
        sender_text = str(sender) if sender is not None else ""
        if self.authenticated:
            # The login may have been deleted since AUTH: ask again at every transaction.
            self.pause()
            d = self.ctx.directory.expand(self.authenticated)
            d.addCallback(self._still_a_mailbox, sender, sender_text, size)
            d.addErrback(self._lookup_failed)
            d.addBoth(lambda _: self.resume())
            return
        checked = self._sender_ok(sender_text, size)
        if checked is not None:
            self.pause()
            checked.addBoth(lambda _: self.resume())

    def _still_a_mailbox(self, found: Expansion | None, sender: Address | None, sender_text: str,
                         size: int) -> Deferred[None] | None:
        if found is None or self.authenticated not in found.mailboxes:
            maillog.event("smtp", "login-revoked", self.client_ip, user=self.authenticated)
            self.authenticated = None
            self.reply(replies.AUTH_REQUIRED)
            return None
        if sender is not None and self.cfg.submission.enforce_sender and self.authenticated:
            d = self.ctx.directory.addresses_of(self.authenticated)
            return d.addCallback(self._sender_owned, sender.key, sender_text, size)
        return self._sender_ok(sender_text, size)

    def _sender_owned(self, owned: frozenset[str], key: str, sender_text: str,
                      size: int) -> Deferred[None] | None:
        if key not in owned:
            maillog.event("smtp", "sender-refused", self.client_ip, user=self.authenticated, sender=sender_text)
            self.reply(replies.SENDER_NOT_OWNED)
            return None
        return self._sender_ok(sender_text, size)

    def _sender_ok(self, sender_text: str, size: int) -> Deferred[None] | None:
        """Run the MAIL-stage checks, then start the transaction; a Deferred when they are not done yet."""
        if not self.stage_runs(MAIL):
            self._start_transaction(None, sender_text, size)
            return None
        d = Deferred.fromCoroutine(self.mail_checks(sender_text))
        return d.addCallback(self._start_transaction, sender_text, size).addErrback(self._check_failed)

    def _start_transaction(self, refusal: Refusal | None, sender_text: str, size: int) -> None:
        if refusal is not None:
            self.reply(refusal.reply)
            return
        self.envelope = Envelope(sender=sender_text, declared_size=size)
        self.msg_id = trace.make_id(self.clock)     # from here on, every log line of the message has it
        self.reply(replies.SENDER_OK)

    def _check_failed(self, f: Failure) -> None:
        """A check broke outside its own error handling: 4xx, never a pass."""
        maillog.log.failure("mailguard smtp inbound check error", f)
        self.reply(CHECK_FAILED)

    def _lookup_failed(self, f: Failure) -> None:
        """A directory lookup for MAIL failed: 4xx, never a pass."""
        if not f.check(DirectoryError):
            maillog.log.failure("mailguard smtp directory lookup error", f)
        self.reply(self.cfg.replies.directory_failure)

    def smtp_RCPT(self, arg: str) -> None:
        env = self.envelope
        if env.sender is None:
            self.reply(replies.MAIL_FIRST)
            return
        try:
            path, params = parse_mail_arg(arg, "TO")
        except AddressError:
            self.reply(replies.ARG_SYNTAX)
            return
        if params:
            self.reply(replies.BAD_PARAM)
            return
        if len(env.decisions) >= self.cfg.limits.max_recipients:
            self.reply(replies.TOO_MANY_RCPT)
            return
        who = self.policy_client()
        self.pause()
        now = self.clock.seconds()
        sender = env.sender or ""
        d = gather(lambda facts: policy.decide(self.cfg, facts, who, path, srs=self.ctx.srs, now=now, sender=sender),
                   self.ctx.directory)
        d.addErrback(self._decision_failed, path)
        d.addCallback(self._decided, env)
        d.addBoth(lambda _: self.resume())

    def _decision_failed(self, f: Failure, path: str) -> policy.Decision:
        """The directory could not answer for this recipient: 4xx (directory_failure)."""
        if not f.check(DirectoryError):
            maillog.log.failure("mailguard smtp directory lookup error", f)
        return policy.directory_failure(self.cfg, path)

    def _decided(self, decision: policy.Decision, env: Envelope) -> Deferred[None] | None:
        if decision.accepted and decision.mailboxes and self.ctx.quotas is not None:
            return Deferred.fromCoroutine(self._judge_quota(decision, env))
        return self._quota_passed(decision, env)

    async def _judge_quota(self, decision: policy.Decision, env: Envelope) -> None:
        """Apply the quotas of the recipient's mailboxes; 4xx when they cannot be read."""
        assert self.ctx.quotas is not None
        try:
            verdict, usage = await self.ctx.quotas.judge(self.cfg, self.ctx.directory, decision,
                                                         env.declared_size)
        except Exception:
            f = Failure()
            if not f.check(DirectoryError):
                maillog.log.failure("mailguard smtp quota lookup error", f)
            self._answer_rcpt(policy.directory_failure(self.cfg, decision.recipient), env)
            return
        for mailbox, reply in verdict.dropped if verdict.decision.accepted else ():
            maillog.event("smtp", "over-quota", self.client_ip, rcpt=verdict.decision.recipient, mailbox=mailbox,
                          reply=f'"{reply}"')
        if verdict.decision.accepted:
            env.usage.update(usage)
        more = self._quota_passed(verdict.decision, env)
        if more is not None:
            await more

    def _quota_passed(self, decision: policy.Decision, env: Envelope) -> Deferred[None] | None:
        if decision.accepted and self.stage_runs(RCPT):
            d = Deferred.fromCoroutine(self.rcpt_checks(env.sender or "", decision.recipient))
            return d.addCallback(self._rcpt_checked, decision, env).addErrback(self._check_failed)
        self._answer_rcpt(decision, env)
        return None

    def _rcpt_checked(self, refusal: Refusal | None, decision: policy.Decision, env: Envelope) -> None:
        if refusal is not None:
            self.reply(refusal.reply)
        else:
            self._answer_rcpt(decision, env)

    def _answer_rcpt(self, decision: policy.Decision, env: Envelope) -> None:
        maillog.decision(self.client_ip, self.local_ip, self.helo or "", env.sender or "", decision.recipient,
                         decision.rule, decision.reply, msg_id=self.msg_id)
        if decision.accepted:
            env.decisions.append(decision)
        self.reply(decision.reply)

    def smtp_DATA(self, arg: str) -> None:
        env = self.envelope
        if env.sender is None:
            self.reply(replies.MAIL_FIRST)
        elif not env.decisions:
            self.reply(replies.NO_VALID_RCPT)
        elif arg:
            self.reply(replies.ARG_SYNTAX)
        else:
            self.start_data()
            self.send_raw(DATA_GO_AHEAD)

    def message_received(self, message: bytes, refusal: replies.Reply | None) -> None:
        env, self.envelope = self.envelope, Envelope()
        if refusal is None and len(message) > self.cfg.limits.max_message_size:
            refusal = replies.TOO_BIG
        if refusal is not None:
            self.reply(refusal)
            return
        no_bare_cr = not has_bare_cr(message)
        # With no bare CR, every CR starts a CRLF; as many LFs as CRs then means no bare LF.
        if not no_bare_cr or message.count(b"\r") != message.count(b"\n"):
            if (no_bare_cr and self.cfg.submission.normalize_bare_newlines
                    and policy.relay_permission(self.cfg, self.policy_client())[0]):
                # A trusted client's bare LF (a scanner, a script): made CRLF, as Postfix's
                # smtpd_forbid_bare_newline_exclusions = $mynetworks does.  Never for others.
                message = _BARE_LF.sub(b"\r\n", message)
            else:
                maillog.event("smtp", "bare-linefeed", self.client_ip, sender=env.sender)
                self.reply(replies.BARE_LINEFEED)
                return
        # Remove dot-stuffing (RFC 5321 section 4.5.2); the search alone is the cheaper pass.
        if message.startswith(b".") or _DOT_LINE.search(message) is not None:
            message = (b"\r\n" + message).replace(b"\r\n.", b"\r\n")[2:]
        if trace.hops(message) > trace.MAX_HOPS:
            maillog.event("smtp", "mail-loop", self.client_ip, sender=env.sender)
            self.reply(replies.TOO_MANY_HOPS)
            return
        msg_id = self.msg_id or trace.make_id(self.clock)
        self.pause()
        d = Deferred.fromCoroutine(self._deliver(msg_id, env, message))
        d.addErrback(self._filter_failed, msg_id).addBoth(lambda _: self.resume())

    async def _deliver(self, msg_id: str, env: Envelope, message: bytes) -> None:
        """The checks of the final dot, the trace header, the milters and the store; then the reply."""
        sender = env.sender or ""
        received = trace.received(
            msg_id=msg_id, helo=self.helo, client_ip=self.client_ip, hostname=self.cfg.server.hostname,
            esmtp=self.esmtp, encrypted=self.encrypted, authenticated=bool(self.authenticated),
            recipient=env.decisions[0].recipient if len(env.decisions) == 1 else None, now=self.clock.seconds(),
            client_name=await self.received_name())
        if self.stage_runs("data"):
            outcome = await self.data_checks(sender, message)
            if outcome.refusal is not None:
                self.reply(outcome.refusal.reply)
                return
            received, message = received + outcome.header, outcome.message
        self.checks_accepted(sender)
        await self._filter_and_store(msg_id, env, received, message,
                                     filtering.applies(self.cfg, self.policy_client()))

    def stored(self) -> None:
        """A message was stored (the session's flood counter restarts)."""

    async def _filter_and_store(self, msg_id: str, env: Envelope, received: bytes, message: bytes,
                                filter_it: bool) -> None:
        """Run the milters ([filters]) when they apply, complete and sign a trusted client's
        message, then store the result, held if a milter quarantined it."""
        if not filter_it:
            await self._prepare_and_store(msg_id, env.sender or "", env.decisions, received, message,
                                          usage=env.usage)
            return
        assert self.ctx.milters is not None, "[filters] milters configured but no MilterChain given"
        conn = connection(self.transport)
        peer, local = conn.getPeer(), conn.getHost()
        facts = Facts(hostname=self.cfg.server.hostname, daemon_name=self.kind, client_addr=self.client_ip,
                      client_port=getattr(peer, "port", 0), client_name="unknown", local_addr=self.local_ip,
                      local_port=getattr(local, "port", 0), helo=self.helo or "", sender=env.sender or "",
                      recipients=list(dict.fromkeys(d.recipient for d in env.decisions)), queue_id=msg_id,
                      auth_authen=self.authenticated or "", tls_version=filtering.tls_version(self.transport))
        result = await filtering.filter_transaction(self.cfg, self.ctx.milters, self.ctx.directory,
                                                    facts, env.decisions, received, message)
        if result.action == "refuse":
            assert result.reply is not None
            self.reply(result.reply)
            return
        if result.action == "store":
            await self._prepare_and_store(msg_id, result.sender, result.decisions, b"", result.message,
                                          result.held, env.usage)
            return
        self.stored()
        self.reply(replies.QUEUED, msg_id)

    async def _prepare_and_store(self, msg_id: str, sender: str, decisions: list[policy.Decision],
                                 received: bytes, message: bytes, held: str = "",
                                 usage: Mapping[str, quota.Usage] | None = None) -> None:
        """Store the message (signed first when the client is trusted), then answer 250."""
        outgoing = self.ctx.outgoing if policy.relay_permission(self.cfg, self.policy_client())[0] else None
        if outgoing is not None:
            try:
                message = await outgoing.prepare(message, msg_id, self.clock.seconds())
            except SigningError as e:
                maillog.event("smtp", "signing-failed", self.client_ip, id=msg_id, error=str(e))
                self.reply(replies.SIGNING_FAILED)
                return
        await self.ctx.store.store(msg_id, sender, decisions, received, message, held=held)
        if usage and not held and self.ctx.quotas is not None:
            self.ctx.quotas.delivered(usage, list(dict.fromkeys(m for d in decisions for m in d.mailboxes)),
                                      len(received) + len(message))
        mailboxes = ",".join(dict.fromkeys(m for d in decisions for m in d.mailboxes)) or "-"
        maillog.event("smtp", "held" if held else "stored", self.client_ip, id=msg_id,
                      sender=sender, rcpts=len(decisions), size=len(message), mailboxes=mailboxes)
        self.stored()
        self.reply(replies.QUEUED, msg_id)

    def _filter_failed(self, f: Failure, msg_id: str) -> None:
        if f.check(DirectoryError):
            self.reply(self.cfg.replies.directory_failure)
            return
        maillog.log.failure("mailguard smtp filtering or store failed for {id}", f, id=msg_id)
        self.reply(replies.STORE_FAILED)
