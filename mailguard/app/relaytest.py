"""``mailguard relay-test HOST[:PORT]``: the open-relay catalogue, run against any SMTP server.

"Always thoroughly test your configuration": this sends every trick of the
catalogue below from the client's own address (``--source`` chooses it) and
reports, per trick, the reply to RCPT.  A trick is *relayed* when RCPT is answered
2xx; no message is ever sent (the session is reset before DATA).  Exit status 0
only when nothing was relayed, 1 when something was, 2 when the server could not
be tested.

The catalogue holds the cases of nmap's ``smtp-open-relay`` script and the
address forms RFC 2505 and the relay-trick lists warn about (``%`` and ``!``
routing, quoted ``@``, several ``@``, source routes, address literals, Exchange
encapsulation).  ``{domain}`` is the server's own domain, ``{ip}`` its address.
The end-to-end tests run the same catalogue against mailguard.
"""

from __future__ import annotations

import argparse
import smtplib
import socket
import sys
from dataclasses import dataclass

REMOTE = "relay-test.mailguard.invalid"


@dataclass(frozen=True)
class Trick:
    """One relay attempt: envelope sender and recipient templates."""

    name: str
    sender: str
    rcpt: str

    def render(self, domain: str, ip: str) -> tuple[str, str]:
        """The sender and recipient with the server's domain and IP filled in."""
        return (self.sender.format(domain=domain, ip=ip, remote=REMOTE),
                self.rcpt.format(domain=domain, ip=ip, remote=REMOTE))


CATALOGUE: tuple[Trick, ...] = (
    # nmap smtp-open-relay
    Trick("null-sender", "<>", "<relaytest@{remote}>"),
    Trick("remote-sender", "<antispam@{remote}>", "<relaytest@{remote}>"),
    Trick("local-sender", "<antispam@{domain}>", "<relaytest@{remote}>"),
    Trick("literal-sender", "<antispam@[{ip}]>", "<relaytest@{remote}>"),
    Trick("percent-at-literal", "<antispam@[{ip}]>", "<relaytest%{remote}@[{ip}]>"),
    Trick("percent-at-domain", "<antispam@[{ip}]>", "<relaytest%{remote}@{domain}>"),
    Trick("quoted-at", "<antispam@[{ip}]>", '<"relaytest@{remote}">'),
    Trick("quoted-percent", "<antispam@[{ip}]>", '<"relaytest%{remote}">'),
    Trick("double-at-literal", "<antispam@[{ip}]>", "<relaytest@{remote}@[{ip}]>"),
    Trick("quoted-at-literal", "<antispam@[{ip}]>", '<"relaytest@{remote}"@[{ip}]>'),
    Trick("double-at-domain", "<antispam@[{ip}]>", "<relaytest@{remote}@{domain}>"),
    Trick("source-route-literal", "<antispam@[{ip}]>", "<@[{ip}]:relaytest@{remote}>"),
    Trick("source-route-domain", "<antispam@[{ip}]>", "<@{domain}:relaytest@{remote}>"),
    Trick("bang", "<antispam@[{ip}]>", "<{remote}!relaytest>"),
    Trick("bang-at-literal", "<antispam@[{ip}]>", "<{remote}!relaytest@[{ip}]>"),
    Trick("bang-at-domain", "<antispam@[{ip}]>", "<{remote}!relaytest@{domain}>"),
    # RFC 2505 and the classic trick lists
    Trick("quoted-at-domain", "<antispam@{remote}>", '<"relaytest@{remote}"@{domain}>'),
    Trick("percent-chain", "<antispam@{remote}>", "<relaytest%{remote}%{domain}@{domain}>"),
    Trick("imceasmtp", "<antispam@{remote}>", "<IMCEASMTP-relaytest+40{remote}@{domain}>"),
    Trick("quoted-imcea", "<antispam@{remote}>", '<"IMCEASMTP-relaytest+40{remote}"@{domain}>'),
    Trick("trailing-dot", "<antispam@{remote}>", "<relaytest@{remote}.>"),
    Trick("upper-case", "<antispam@{remote}>", "<RELAYTEST@RELAY-TEST.MAILGUARD.INVALID>"),
    Trick("remote-literal-v4", "<antispam@{remote}>", "<relaytest@[192.0.2.1]>"),
    Trick("remote-literal-v6", "<antispam@{remote}>", "<relaytest@[IPv6:2001:db8::1]>"),
    Trick("no-brackets", "antispam@{remote}", "relaytest@{remote}"),
    Trick("source-route-two-hops", "<antispam@{remote}>", "<@{domain},@[{ip}]:relaytest@{remote}>"),
    Trick("postmaster-sender", "<postmaster@{domain}>", "<relaytest@{remote}>"),
    Trick("space-before-path", "<antispam@{remote}>", " <relaytest@{remote}>"),
    Trick("idn-remote", "<antispam@{remote}>", "<relaytest@bücher.invalid>"),
    Trick("unqualified", "<antispam@{remote}>", "<relaytest>"),
)


@dataclass
class Outcome:
    trick: Trick
    sender: str
    rcpt: str
    code: int
    text: str

    @property
    def relayed(self) -> bool:
        return 200 <= self.code < 300


def _target(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
    if not host:
        host, port = text, ""
    return host, int(port) if port else 25


def run(host: str, port: int, source: str | None, domain: str | None, timeout: float) -> list[Outcome]:
    """Run the catalogue; each trick in its own session so one refusal cannot taint the next."""
    ip = socket.gethostbyname(host)
    outcomes = []
    for trick in CATALOGUE:
        conn = smtplib.SMTP(timeout=timeout, source_address=(source, 0) if source else None,
                            local_hostname="relay-test.mailguard.invalid")
        conn.command_encoding = "utf-8"
        try:
            conn.connect(host, port)
            code, greeting = conn.ehlo()
            if code != 250:
                conn.helo()
            words = greeting.decode("ascii", "replace").split()
            server_domain = domain or (words[0] if words else host)
            sender, rcpt = trick.render(server_domain, ip)
            code, text = conn.docmd("MAIL FROM:" + sender)
            if 200 <= code < 300:
                code, text = conn.docmd("RCPT TO:" + rcpt)
            else:
                text = b"(MAIL refused) " + text
            outcomes.append(Outcome(trick, sender, rcpt, code, text.decode("utf-8", "replace")))
            conn.docmd("RSET")
            conn.quit()
        except (OSError, smtplib.SMTPException) as e:
            outcomes.append(Outcome(trick, trick.sender, trick.rcpt, 0, f"(error: {e})"))
        finally:
            conn.close()
    return outcomes


def main(args: argparse.Namespace) -> int:
    """The CLI entry: print one line per trick, then the verdict."""
    host, port = _target(args.target)
    try:
        outcomes = run(host, port, args.source, args.domain, args.timeout)
    except OSError as e:
        print(f"mailguard relay-test: cannot reach {args.target}: {e}", file=sys.stderr)
        return 2
    relayed = [o for o in outcomes if o.relayed]
    errors = [o for o in outcomes if o.code == 0]
    for i, o in enumerate(outcomes, 1):
        status = "RELAYED" if o.relayed else ("error" if o.code == 0 else "refused")
        print(f"{i:3} {status:8} {o.trick.name:24} MAIL FROM:{o.sender} RCPT TO:{o.rcpt} -> {o.code} {o.text}")
    if relayed:
        print(f"verdict: OPEN RELAY: {len(relayed)} of {len(outcomes)} tricks accepted at RCPT")
        return 1
    if len(errors) == len(outcomes):
        print(f"verdict: not tested: every session failed against {host}:{port}")
        return 2
    print(f"verdict: not an open relay: {len(outcomes) - len(errors)} of {len(outcomes)} tricks refused"
          + (f", {len(errors)} sessions failed" if errors else ""))
    return 0
