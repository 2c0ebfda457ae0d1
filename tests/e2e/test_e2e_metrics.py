"""``[metrics] listen``: /metrics scraped from the real server and parsed with prometheus_client.parser.

Each counter moves by exactly what the test did between two scrapes: a connection,
an accepted and a refused recipient, a stored message, a deferred delivery, a
failed POP3 login; the queue gauges show the waiting message.
"""

from __future__ import annotations

import poplib
import ssl
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from mailguard import config

from .conftest import ALLOWED_HOST, DOMAIN, OFFICE_CONFIG, OUTSIDER, ServerFactory, populate_office
from .harness import MailguardServer, deep_merge, free_port, make_message, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_metrics_count_what_happened(fresh_server_factory: ServerFactory) -> None:
    """Connections, decisions by rule, store latency, outbound, queue gauges and failed logins."""
    port = free_port()
    server: MailguardServer = fresh_server_factory(
        "metrics", deep_merge(OFFICE_CONFIG, {"metrics": {"listen": [f"tcp:{port}:interface=127.0.0.1"]}}))
    populate_office(server)
    before = scrape(port)
    assert before[("mailguard_queue_messages", ())] == 0
    assert before[("mailguard_queue_oldest_age_seconds", ())] == 0

    with server.dialog(source=OUTSIDER) as d:
        assert d.cmd("EHLO outside.example").code == 250
        assert d.cmd("MAIL FROM:<x@outside.example>").code == 250
        assert d.cmd(f"RCPT TO:<alice@{DOMAIN}>").code == 250
        assert d.cmd("RCPT TO:<victim@elsewhere.example>").last == config.DEFAULTS["replies"]["relay_denied"]
        assert d.data(make_message("x@outside.example", f"alice@{DOMAIN}", "metrics-in")).code == 250
    with server.smtp(source=ALLOWED_HOST) as c:       # relayed; the smarthost is down: deferred
        assert c.sendmail(f"bob@{DOMAIN}", ["far@remote.example"],
                          make_message(f"bob@{DOMAIN}", "far@remote.example", "metrics-out")) == {}
    server.wait_for_log(r"mailguard outbound: id=\S+ msg=\S+ to=<far@remote.example> state=deferred", timeout=30)

    box = poplib.POP3("127.0.0.1", server.ports["pop3"], timeout=30)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    box.stls(ctx)
    box.user(f"alice@{DOMAIN}")
    try:
        box.pass_("not the password")
        raise AssertionError("a wrong password was accepted")
    except poplib.error_proto:
        pass
    box.quit()

    after: Samples = {}

    def counted() -> bool:
        after.update(scrape(port))
        return delta(before, after, "mailguard_auth_failures_total", service="pop3") >= 1

    wait_for(counted, 10.0, "the failed POP3 login in /metrics")
    assert delta(before, after, "mailguard_connections_total", service="smtp") == 2
    assert delta(before, after, "mailguard_connections_total", service="pop3") == 1
    assert delta(before, after, "mailguard_smtp_decisions_total", rule="inbound", result="accepted") == 1
    assert delta(before, after, "mailguard_smtp_decisions_total", rule="relay_denied", result="refused") == 1
    assert delta(before, after, "mailguard_store_seconds_count") == 2
    assert after[("mailguard_store_seconds_sum", ())] > 0
    assert delta(before, after, "mailguard_outbound_total", state="deferred") == 1
    assert delta(before, after, "mailguard_auth_failures_total", service="pop3") == 1
    assert after[("mailguard_queue_messages", ())] == 1
    assert after[("mailguard_queue_oldest_age_seconds", ())] > 0
    assert not server.log_lines(r"GET /metrics")          # no access line per scrape
