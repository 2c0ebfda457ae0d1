"""Tests for the [dns] and [checks] sections, the check replies and the rate limit keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailguard import config
from mailguard.config import ConfigError


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "mailguard.toml"
    path.write_text(text, encoding="utf-8")
    return config.load(path)


BROKEN = [
    ("dns.servers", '[dns]\nservers = ["ns.example:53"]\n'),
    ("dns.servers", '[dns]\nservers = ["127.0.0.1:0"]\n'),
    ("dns.timeout", "[dns]\ntimeout = 0\n"),
    ("dns.timout", "[dns]\ntimout = 3\n"),
    ("checks.reject_clients", '[checks]\nreject_clients = ["10.0.0.0/33"]\n'),
    ("checks.reject_senders", '[checks]\nreject_senders = ["spammer"]\n'),
    ("checks.reject_senders", '[checks]\nreject_senders = ["@bad domain"]\n'),
    ("checks.sender_domain", '[checks]\nsender_domain = "yes"\n'),
    ("checks.reverse_dns", '[checks]\nreverse_dns = "strict"\n'),
    ("checks.dnsbl", '[checks]\ndnsbl = ["not a zone"]\n'),
    ("checks.spf", '[checks]\nspf = "on"\n'),
    ("checks.dmarc", '[checks]\ndmarc = true\n'),
    ("checks.greylist", "[checks]\ngreylist = -5\n"),
    ("checks.greylst", "[checks]\ngreylst = 5\n"),
    ("limits.messages_per_ip_per_minute", "[limits]\nmessages_per_ip_per_minute = -1\n"),
    ("limits.messages_per_user_per_hour", '[limits]\nmessages_per_user_per_hour = "10"\n'),
    ("replies.greylisted", '[replies]\ngreylisted = "550 5.7.1 Go away"\n'),
    ("replies.rate_limited", '[replies]\nrate_limited = "554 5.7.0 Too much"\n'),
    ("replies.client_rejected", '[replies]\nclient_rejected = "554 Access denied"\n'),
    ("replies.dnsbl_listed", '[replies]\ndnsbl_listed = "250 2.0.0 fine"\n'),
]


@pytest.mark.parametrize("key,text", BROKEN)
def test_broken_check_keys_name_the_dotted_key(tmp_path: Path, key: str, text: str) -> None:
    """Every bad [dns]/[checks]/rate/reply value is one error line naming file and dotted key."""
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert e.value.key == key
    assert str(e.value).startswith(f"{tmp_path / 'mailguard.toml'}: {key}: ")


def test_defaults_leave_every_check_off() -> None:
    """Without the keys, no check runs and the SPEC's reply texts apply."""
    cfg = config.defaults()
    c = cfg.checks
    assert (c.reject_clients, c.reject_senders, c.sender_domain, c.dnsbl, c.greylist) == ((), (), False, (), 0)
    assert (c.reverse_dns, c.spf, c.dkim_verify, c.dmarc) == ("log", "off", False, "off")
    assert (c.messages_per_ip_per_minute, c.messages_per_user_per_hour) == (0, 0)
    assert str(c.replies.client_rejected) == "554 5.7.1 Access denied"
    assert str(c.replies.no_reverse_dns) == "450 4.7.25 Client host has no verified reverse DNS name"
    assert str(c.replies.rate_limited) == "451 4.7.0 Too much mail, slow down"
    assert cfg.dns.servers == () and cfg.dns.timeout == 5


def test_dns_servers_and_the_older_spelling(tmp_path: Path) -> None:
    """[dns] servers wins; [outbound] dns_servers is used when it is empty."""
    cfg = load(tmp_path, '[outbound]\ndns_servers = ["127.0.0.1:5353"]\n')
    assert cfg.dns.servers == (("127.0.0.1", 5353),)
    cfg = load(tmp_path, '[outbound]\ndns_servers = ["127.0.0.1:5353"]\n[dns]\nservers = ["[::1]:53", "10.0.0.1"]\n')
    assert cfg.dns.servers == (("::1", 53), ("10.0.0.1", 53))


def test_sender_patterns_are_normalised(tmp_path: Path) -> None:
    """reject_senders entries are lower-cased; the three forms are kept apart."""
    cfg = load(tmp_path, '[checks]\nreject_senders = ["Joe@Spam.Example", "@Spam.Example", "@.Spam.Example."]\n')
    assert cfg.checks.reject_senders == ("joe@spam.example", "@spam.example", "@.spam.example")
