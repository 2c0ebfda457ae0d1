#!/usr/bin/env python3
"""Recipient lookups per second: LDAP (cold and cached) beside SQLite.

One command::

    python3 bench/ldap_lookups.py                  # 2000 mailboxes, 20 lookups in flight
    python3 bench/ldap_lookups.py --users 5000 --concurrency 50 --lookups 20000

It starts a real OpenLDAP slapd (as the tests do: loopback, generated slapd.conf,
StartTLS with a test CA) holding ``--users`` inetOrgPerson mailboxes, each with a
``mailLocalAddress`` alias, and an SQLite directory with the same mailboxes.  Each
run calls the backend's ``expand()`` — what every ``RCPT TO`` costs — ``--lookups``
times with ``--concurrency`` calls in flight, in this process's reactor:

- ``ldap cold``: ``cache_ttl = 0``, every lookup is two searches (mailbox and list
  filter) over the pooled, StartTLS-protected service connections;
- ``ldap cached``: ``cache_ttl = 60`` after one warm-up pass: answers from memory;
- ``sqlite``: the SQLite backend (its own thread pool), the same addresses.

Addresses alternate between mailboxes, aliases and unknown ones (1 in 10).  It prints
lookups/s and the p50/p99 latency of each run, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from twisted.internet import defer, task  # noqa: E402

from ldap_server import SERVICE_DN, SERVICE_PW, SUFFIX, Slapd, person  # noqa: E402
from mailguard.config import ldap as ldap_config  # noqa: E402
from mailguard.directory.ldap import LDAPDirectory  # noqa: E402

DOMAIN = "realdomain.example"


def addresses(users: int, count: int) -> list[str]:
    rng = random.Random(7)
    out = []
    for i in range(count):
        n = rng.randrange(users)
        kind = i % 10
        if kind == 9:
            out.append(f"nobody{n}@{DOMAIN}")
        elif kind % 2:
            out.append(f"alias{n}@{DOMAIN}")
        else:
            out.append(f"user{n}@{DOMAIN}")
    return out


async def measure(expand: Callable[[str], defer.Deferred[Any]], names: list[str], concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    it = iter(names)

    async def worker() -> None:
        for name in it:
            t0 = time.perf_counter()
            await expand(name)
            latencies.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"lookups": len(latencies), "per_second": round(len(latencies) / elapsed),
            "p50_ms": round(statistics.median(latencies) * 1000, 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2)}


def sqlite_backend(reactor: Any, path: Path, users: int) -> tuple[Callable[[str], defer.Deferred[Any]], Callable[[], None]]:
    """The SQLite backend filled with the same mailboxes (bulk insert; hashes are not looked at)."""
    import sqlite3

    from mailguard.directory import sqlite as sqlite_mod

    store = sqlite_mod.SQLiteStore(path)
    db = sqlite3.connect(path)
    db.executemany("INSERT INTO mailboxes VALUES (?, 'x', 0)", [(f"user{i}@{DOMAIN}",) for i in range(users)])
    db.executemany("INSERT INTO aliases VALUES (?, ?)", [(f"alias{i}@{DOMAIN}", f"user{i}@{DOMAIN}")
                                                          for i in range(users)])
    db.commit()
    db.close()
    from twisted.python.threadpool import ThreadPool
    pool = ThreadPool(minthreads=0, maxthreads=2, name="bench-hash")
    pool.start()
    directory = sqlite_mod.SQLiteDirectory(store, reactor, pool)

    def close() -> None:
        directory.close()
        pool.stop()
    return directory.expand, close


async def main(reactor: Any, args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="mailguard-ldap-bench-"))
    ldif = "".join(person(f"user{i}", f"user{i}@{DOMAIN}", "pw", aliases=(f"alias{i}@{DOMAIN}",))
                   for i in range(args.users))
    slapd = Slapd(root / "slapd", ldif).start()
    names = addresses(args.users, args.lookups)
    results: dict[str, Any] = {"users": args.users, "concurrency": args.concurrency}
    try:
        def backend(ttl: int) -> LDAPDirectory:
            cfg = ldap_config.parse({"url": slapd.url, "ca_file": str(slapd.ca_file), "base": SUFFIX,
                                     "bind_dn": SERVICE_DN, "bind_password": SERVICE_PW, "cache_ttl": ttl},
                                    lambda k, m: ValueError(f"{k}: {m}"), root, required=True)
            return LDAPDirectory(cfg, reactor, [DOMAIN])

        cold = backend(0)
        await cold.expand(f"user0@{DOMAIN}")                       # connect and bind first
        results["ldap_cold"] = await measure(cold.expand, names, args.concurrency)
        cold.close()
        warm = backend(60)
        await measure(warm.expand, sorted(set(names)), args.concurrency)
        results["ldap_cached"] = await measure(warm.expand, names, args.concurrency)
        warm.close()
        expand, close = sqlite_backend(reactor, root / "directory.sqlite", args.users)
        await expand(f"user0@{DOMAIN}")
        results["sqlite"] = await measure(expand, names, args.concurrency)
        close()
    finally:
        slapd.stop()
    for name in ("ldap_cold", "ldap_cached", "sqlite"):
        r = results[name]
        print(f"{name:12} {r['per_second']:>8} lookups/s   p50 {r['p50_ms']:.2f} ms   p99 {r['p99_ms']:.2f} ms")
    print(json.dumps(results))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--lookups", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=20)
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, parser.parse_args())))
