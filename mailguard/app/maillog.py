"""The mail log: one stable line per decision (RFC 2505 section 2, items 3-4).

Lines go to the twistd log (standard output under ``twistd -n``).  Their text is
stable, ``key=value`` separated by spaces, so that grep and fail2ban can read them::

    mailguard smtp decision: client=192.0.2.7 local=127.0.0.1 helo=me from=<a@b> rcpt=<c@d> rule=relay_denied reply="550 5.7.1 Relaying prohibited"
    mailguard smtp decision: client=192.0.2.9 local=127.0.0.1 helo=x from=<a@b> rcpt=<> rule=dnsbl_listed reply="554 5.7.1 Client host blocked by a DNS block list" detail="zone=bl.example code=127.0.0.2"
    mailguard auth failure: service=smtp client=192.0.2.7 user=alice@example.com

Passwords and AUTH payloads are never logged.
"""

from __future__ import annotations

from twisted.logger import Logger

log = Logger(namespace="mailguard")


def clean(value: object) -> str:
    """Make a client-supplied value safe for one log line (no control characters, bounded)."""
    text = value if isinstance(value, str) else str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:200]


def decision(client: str, local: str, helo: str, sender: str, rcpt: str, rule: str, reply: object,
             detail: str = "") -> None:
    """Log one decision (a RCPT, or a check's refusal; ``detail`` says what decided it)."""
    # Formatted here once: the observers then only copy one field.
    extra = f' detail="{clean(detail)}"' if detail else ""
    log.info("{line}", line=(
        f"mailguard smtp decision: client={client} local={local} helo={clean(helo)} from=<{clean(sender)}> "
        f"rcpt=<{clean(rcpt)}> rule={rule} reply=\"{clean(reply)}\"{extra}"))


def event(service: str, what: str, client: str, **fields: object) -> None:
    """Log one event line: ``mailguard <service> <what>: client=<ip> k=v ...``."""
    extra = "".join(f" {k}={clean(v)}" for k, v in fields.items())
    log.info("{line}", line=f"mailguard {service} {what}: client={client}{extra}")


def auth_failure(service: str, client: str, user: str) -> None:
    """Log a failed login in the line the fail2ban filter matches."""
    log.warn("{line}", line=f"mailguard auth failure: service={service} client={client} user={clean(user)}")


def directory_entry(what: str, **fields: object) -> None:
    """Log a directory entry that cannot be used: ``mailguard directory <what>: k=v ...``."""
    extra = " ".join(f"{k}={clean(v)}" for k, v in fields.items())
    log.warn("{line}", line=f"mailguard directory {what}: {extra}")
