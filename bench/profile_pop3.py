#!/usr/bin/env python3
"""Profile mailguard's POP3 server with py-spy while a client runs LIST+UIDL+RETR of all
messages, then login+STAT, on generated maildirs.

    python3 bench/profile_pop3.py [--messages 5000] [--stat-messages 20000] [--gil]

Starts mailguard from this checkout (plaintext login allowed on loopback), fills a
mailbox with ``gen_maildir.py``, makes one unmeasured session (first access), then
records the second and third sessions with ``py-spy record --threads --function``
and prints the top functions as in ``profile_ingest.py``.  ``--gil``: Python CPU only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_maildir import generate  # noqa: E402
from pop3_compare import PASSWORD, session  # noqa: E402
from profile_ingest import report  # noqa: E402
from servers import DOMAIN, Mailguard  # noqa: E402

PYSPY = shutil.which("py-spy") or "py-spy"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--stat-messages", type=int, default=20000)
    ap.add_argument("--rate", type=int, default=500)
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--gil", action="store_true")
    ap.add_argument("--raw", default="/var/tmp/mailguard-pop3-profile.txt")
    a = ap.parse_args()
    mg = Mailguard(extra_toml="\n[tls]\nauth_requires_tls = false\n")
    try:
        for user, n in (("full", a.messages), ("stat", a.stat_messages)):
            mg.add_user(f"{user}@{DOMAIN}", PASSWORD)
            generate(str(mg.data_dir / "mail" / DOMAIN / user), n)
        mg._user_made = True
        mg.start()
        for user, mode in (("full", "full"), ("stat", "stat")):
            session(mg.host, mg.pop3_port, f"{user}@{DOMAIN}", mode, mg.pid)   # first access
        spy = subprocess.Popen([PYSPY, "record", "--pid", str(mg.pid), "--rate", str(a.rate), "--threads",
                                "--function", "--nonblocking", "--format", "raw", "-o", a.raw]
                               + (["--gil"] if a.gil else []),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        for _ in range(2):
            print("full", session(mg.host, mg.pop3_port, f"full@{DOMAIN}", "full", mg.pid))
            print("stat", session(mg.host, mg.pop3_port, f"stat@{DOMAIN}", "stat", mg.pid))
        spy.send_signal(2)
        spy.communicate(timeout=60)
    finally:
        mg.cleanup()
    report(a.raw, a.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
