"""``mailguard status`` against the running server, and the listings ``alias list``, ``list show``, ``contact list``."""

from __future__ import annotations

import re

from .conftest import ALLOWED_HOST, DOMAIN, OFFICE_CONFIG, OFFICE_USERS, ServerFactory, populate_office
from .harness import make_message


def test_status_and_listings(fresh_server_factory: ServerFactory) -> None:
    """Running, every listener answering, the queued message and its error, the directory; then stopped."""
    server = fresh_server_factory("status", OFFICE_CONFIG)
    populate_office(server)
    assert server.cli_ok("status").stdout.splitlines()[-2:] == [
        "queue: empty", f"directory: sqlite {server.data_dir / 'directory.sqlite'}, {len(OFFICE_USERS)} mailbox(es)"]
    with server.smtp(source=ALLOWED_HOST) as c:        # the smarthost is down: it waits, deferred
        assert c.sendmail(f"bob@{DOMAIN}", ["far@remote.example"],
                          make_message(f"bob@{DOMAIN}", "far@remote.example", "status-queued")) == {}
    logged = server.wait_for_log(r"mailguard outbound: id=\S+ msg=\S+ to=<far@remote.example> state=deferred",
                                 timeout=30)
    queue_id = re.search(r"id=(\S+)", logged).group(1)       # type: ignore[union-attr]
    reply = logged.split(" reply=", 1)[1]

    lines = server.cli_ok("status").stdout.splitlines()
    assert server.process is not None
    assert lines[0] == f"server: running (process {server.process.pid})"
    listening = [f"listening: smtp tcp:{server.smtp_port}:interface=127.0.0.1 (answers)"] + [
        f"listening: {kind} {'ssl' if kind in ('submissions', 'pop3s') else 'tcp'}:{server.ports[kind]}"
        f":interface=127.0.0.1 (answers)" for kind in ("submission", "submissions", "pop3", "pop3s")]
    assert lines[1:6] == listening
    assert re.fullmatch(r"queue: 1 message\(s\), oldest \d+m\d\ds \(since \d{4}-\d\d-\d\d \d\d:\d\d UTC\)", lines[6])
    assert lines[7] == f"last delivery error: {reply} (to <far@remote.example>, queue id {queue_id})"
    assert lines[8] == f"directory: sqlite {server.data_dir / 'directory.sqlite'}, {len(OFFICE_USERS)} mailbox(es)"

    assert server.cli_ok("alias", "list").stdout == f"sales@{DOMAIN} -> alice@{DOMAIN}\n"
    assert server.cli_ok("list", "show", f"team@{DOMAIN}").stdout == \
        f"senders: anyone\nalice@{DOMAIN}\nbob@{DOMAIN}\n"
    missing = server.cli("list", "show", f"nobody@{DOMAIN}")
    assert (missing.returncode, missing.stderr) == (1, f"mailguard: no list nobody@{DOMAIN}\n")
    server.cli_ok("contact", "add", f"partner@{DOMAIN}", "someone@partner.example")
    assert server.cli_ok("contact", "list").stdout == f"partner@{DOMAIN} -> someone@partner.example\n"

    server.stop()
    stopped = server.cli("status")
    assert stopped.returncode == 1
    out = stopped.stdout.splitlines()
    assert out[0] == (f"server: not running (no {server.data_dir / 'mailguard.pid'}: "
                      "mailguard is not running on this data folder)")
    assert out[1] == f"listening: smtp tcp:{server.smtp_port}:interface=127.0.0.1 (NOT ANSWERING)"
