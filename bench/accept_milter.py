"""A pymilter milter that looks at every step of every message and accepts it (benchmarks).

It asks for everything (no SMFIP_NO*/NR_* optimisation): connect, HELO, MAIL, RCPT,
headers, body, end of message, each answered CONTINUE, and ACCEPT at the end.  Run with
the system Python that has Debian's python3-milter::

    /usr/bin/python3 bench/accept_milter.py inet:PORT@127.0.0.1
"""

import sys

import Milter


class AcceptMilter(Milter.Base):
    def connect(self, hostname, family, hostaddr):
        return Milter.CONTINUE

    def hello(self, heloname):
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *args):
        return Milter.CONTINUE

    def envrcpt(self, to, *args):
        return Milter.CONTINUE

    def header(self, name, value):
        return Milter.CONTINUE

    def eoh(self):
        return Milter.CONTINUE

    def body(self, chunk):
        return Milter.CONTINUE

    def eom(self):
        return Milter.ACCEPT


def main():
    Milter.factory = AcceptMilter
    Milter.set_flags(0)
    print(f"accept milter on {sys.argv[1]}", flush=True)
    Milter.runmilter("acceptmilter", sys.argv[1], 60)


if __name__ == "__main__":
    main()
