"""The catalogue of SMTP replies mailguard speaks, used by code and tests alike.

A reply is a three-digit code (RFC 5321 section 4.2), an enhanced status code
(RFC 3463) and a text.  Policy replies an administrator may change live in
``[replies]`` of the configuration and are parsed with :func:`parse`; the fixed
protocol replies are the constants below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_REPLY = re.compile(r"^([2-5][0-9][0-9]) ([2-5])\.([0-9]{1,3})\.([0-9]{1,3})(?: (.*))?$")


class ReplyError(ValueError):
    """A reply string that is not ``"NNN X.Y.Z text"``."""


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: code, enhanced status code, text."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.line()}".rstrip()

    @property
    def permanent(self) -> bool:
        """True for a 5xx reply."""
        return self.code >= 500

    @property
    def transient(self) -> bool:
        """True for a 4xx reply."""
        return 400 <= self.code < 500

    def soften(self) -> Reply:
        """The 4xx twin of a 5xx reply (soft_bounce); other replies unchanged."""
        if not self.permanent:
            return self
        return Reply(self.code - 100, "4" + self.enhanced[1:], self.text)

    def line(self) -> str:
        """The reply text after the code, as Twisted's ``sendCode`` wants it."""
        return " ".join(part for part in (self.enhanced, self.text) if part)


def parse(text: str) -> Reply:
    """Parse ``"550 5.7.1 Relaying prohibited"``; the enhanced class must match the code.

    :raises ReplyError: the string is not a well-formed reply.
    """
    if not isinstance(text, str) or "\r" in text or "\n" in text:
        raise ReplyError("a reply is one line: 'NNN X.Y.Z text'")
    m = _REPLY.match(text)
    if m is None:
        raise ReplyError(f"{text!r} is not 'NNN X.Y.Z text' with NNN in 200-599")
    code, cls = m.group(1), m.group(2)
    if code[0] != cls:
        raise ReplyError(f"{text!r}: enhanced code class {cls} does not match reply code {code}")
    return Reply(int(code), f"{cls}.{m.group(3)}.{m.group(4)}", m.group(5) or "")


# Fixed protocol replies (RFC 5321, RFC 3463 / RFC 5248 codes).
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
RESET_OK = Reply(250, "2.0.0", "Reset state")
NOOP_OK = Reply(250, "2.0.0", "Ok")
VRFY_CANNOT = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
QUEUED = Reply(250, "2.0.0", "Ok: queued as")
HELP = Reply(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH")

SYNTAX_ERROR = Reply(500, "5.5.2", "Syntax error, command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
ARG_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RCPT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
HELO_FIRST = Reply(503, "5.5.1", "Send HELO/EHLO first")
MAIL_FIRST = Reply(503, "5.5.1", "Need MAIL command first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NO_VALID_RCPT = Reply(503, "5.5.1", "No valid recipients")
BAD_PARAM = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
TOO_MANY_RCPT = Reply(452, "4.5.3", "Too many recipients")
# [limits] mailbox_quota (RFC 3463 X.2.2, mailbox full).
MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full")
OVER_QUOTA = Reply(552, "5.2.2", "Message would exceed the mailbox quota")
TOO_MANY_HOPS = Reply(554, "5.4.6", "Too many hops, mail loop detected (RFC 5321 section 6.3)")
BARE_LINEFEED = Reply(550, "5.6.2", "Bare CR or LF not allowed in message (RFC 5321 section 2.3.8)")
# A content filter (milter) refused without its own reply, or failed (Postfix's wording).
MILTER_REJECTED = Reply(550, "5.7.1", "Command rejected")
MILTER_TEMPFAIL = Reply(451, "4.7.1", "Service unavailable - try again later")
STORE_FAILED = Reply(451, "4.3.0", "Temporary failure storing the message, try again later")
# [limits] memory_budget spent and no spool file to take the message (RFC 3463: 4.3.1).
NO_ROOM = Reply(452, "4.3.1", "Insufficient system storage, try again later")
SIGNING_FAILED = Reply(451, "4.3.0", "The message cannot be DKIM-signed now, try again later")
RELAY_TRICK = Reply(550, "5.7.1", "Relaying prohibited (address form not accepted)")
TIMEOUT = Reply(421, "4.4.2", "Timeout, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
TOO_MANY_FROM_IP = Reply(421, "4.7.0", "Too many connections from your address, try again later")

# TLS and authentication (RFC 3207, RFC 4954, RFC 6409).
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ALREADY = Reply(503, "5.5.1", "TLS already active")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication cancelled")
AUTH_MALFORMED = Reply(501, "5.5.2", "Malformed authentication data")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_THROTTLED = Reply(454, "4.7.0", "Too many failed logins, try again later")
AUTH_THROTTLED_CLOSE = Reply(421, "4.7.0", "Too many failed logins, closing connection")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by authenticated user")
