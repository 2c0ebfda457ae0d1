"""A test milter on pymilter (Sendmail's libmilter): every action, chosen by the message.

Run with the system Python that has Debian's python3-milter::

    /usr/bin/python3 action_milter.py inet:PORT@127.0.0.1 [--noreply]

The action comes from the ``X-Test-Action`` header (several, comma separated):
``reject``, ``reject-plain``, ``tempfail``, ``tempfail-plain``, ``discard``, ``accept``,
``quarantine``, ``add-header``, ``insert-header``, ``change-header``, ``delete-header``,
``replace-body``, ``change-from``, ``add-rcpt:ADDR``, ``del-rcpt:ADDR``, ``sleep:SECONDS``,
``macros`` (adds ``X-Macros`` with what the MTA sent).  A recipient whose local part
starts with ``refuse-`` is refused at RCPT.  ``--noreply`` makes the milter ask for the
no-reply steps (SMFIP_NR_*) on connect, HELO, MAIL, headers and body; ``--skip`` makes it
answer SMFIR_SKIP to the first body chunk.
"""

import sys
import time

import Milter

NOREPLY = "--noreply" in sys.argv
SKIP = "--skip" in sys.argv
MACROS = ("j", "{daemon_name}", "{client_addr}", "{client_name}", "{auth_authen}", "i", "{mail_addr}",
          "{rcpt_addr}", "{tls_version}")


def maybe_noreply(func):
    return Milter.noreply(func) if NOREPLY else func


class ActionMilter(Milter.Base):
    def __init__(self):
        self.actions = []
        self.seen = {}
        self.body_chunks = 0
        self.body_data = b""

    def _macros(self):
        for name in MACROS:
            value = self.getsymval(name)
            if value is not None and name not in self.seen:
                self.seen[name] = value

    @maybe_noreply
    def connect(self, hostname, family, hostaddr):
        self._macros()
        self.client = (hostname, hostaddr)
        return Milter.CONTINUE

    @maybe_noreply
    def hello(self, heloname):
        self._macros()
        self.helo = heloname
        return Milter.CONTINUE

    @maybe_noreply
    def envfrom(self, mailfrom, *args):
        self._macros()
        self.mailfrom = mailfrom
        return Milter.CONTINUE

    def envrcpt(self, to, *args):
        self._macros()
        if to.strip("<>").startswith("refuse-"):
            self.setreply("550", "5.1.1", "Recipient refused by the test milter")
            return Milter.REJECT
        return Milter.CONTINUE

    @maybe_noreply
    def header(self, name, value):
        if name.lower() == "x-test-action":
            self.actions.extend(a.strip() for a in value.split(",") if a.strip())
        return Milter.CONTINUE

    @maybe_noreply
    def eoh(self):
        self._macros()
        for action in self.actions:
            if action == "accept":
                return Milter.ACCEPT
        return Milter.CONTINUE

    @maybe_noreply
    def body(self, chunk):
        self.body_chunks += 1
        self.body_data += chunk
        if SKIP:
            return Milter.SKIP
        return Milter.CONTINUE

    def eom(self):
        self._macros()
        for action in self.actions:
            name, _, arg = action.partition(":")
            if name == "sleep":
                time.sleep(float(arg))
            elif name == "reject":
                self.setreply("550", "5.7.1", "Rejected by the test milter")
                return Milter.REJECT
            elif name == "reject-plain":
                return Milter.REJECT
            elif name == "tempfail":
                self.setreply("451", "4.7.1", "Try again later, says the test milter")
                return Milter.TEMPFAIL
            elif name == "tempfail-plain":
                return Milter.TEMPFAIL
            elif name == "discard":
                return Milter.DISCARD
            elif name == "quarantine":
                self.quarantine("held by the test milter")
            elif name == "add-header":
                self.addheader("X-Test-Added", "yes")
            elif name == "insert-header":
                self.addheader("X-Test-Inserted", "first", 0)
            elif name == "change-header":
                self.chgheader("Subject", 1, "changed by the test milter")
            elif name == "delete-header":
                self.chgheader("X-Test-Secret", 1, "")
            elif name == "replace-body":
                self.replacebody(b"The test milter replaced this body.\r\n")
            elif name == "change-from":
                self.chgfrom("<changed@sender.example>")
            elif name == "add-rcpt":
                self.addrcpt(f"<{arg}>")
            elif name == "del-rcpt":
                self.delrcpt(f"<{arg}>")
            elif name == "macros":
                self.addheader("X-Macros", " ".join(f"{k}={v}" for k, v in sorted(self.seen.items())))
            elif name == "body-info":
                self.addheader("X-Body-Info", f"chunks={self.body_chunks} size={len(self.body_data)}")
        return Milter.CONTINUE


def main():
    socket = sys.argv[1]
    Milter.factory = ActionMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGBODY | Milter.ADDRCPT | Milter.DELRCPT
                     | Milter.CHGFROM | Milter.QUARANTINE)
    sys.stdout.write(f"action milter on {socket}\n")
    sys.stdout.flush()
    Milter.runmilter("actionmilter", socket, 60)


if __name__ == "__main__":
    main()
