"""Tests for mailguard.config: the validated configuration and its one-line errors."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailguard import config
from mailguard.config import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "mailguard.toml"


def load_text(tmp_path: Path, text: str | bytes) -> config.Config:
    path = tmp_path / "mailguard.toml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return config.load(path)


BROKEN = [
    ("relay.alow", "[relay]\nalow = []\n"),
    ("relais", "[relais]\nallow = []\n"),
    ("relay.allow", '[relay]\nallow = ["10.0.0.0/33"]\n'),
    ("relay.allow", '[relay]\nallow = ["192.168.10.0/24", "not-a-network"]\n'),
    ("relay.allow", "[relay]\nallow = [1]\n"),
    ("relay.allow", '[relay]\nallow = "10.0.0.0/8"\n'),
    ("relay.never", '[relay]\nnever = ["300.1.1.1"]\n'),
    ("relay.internal_addresses", '[relay]\ninternal_addresses = ["10.0.0.0/8"]\n'),
    ("relay.internal_addresses", '[relay]\ninternal_addresses = ["localhost"]\n'),
    ("relay.authenticated", '[relay]\nauthenticated = "yes"\n'),
    ("relay.pop_before_smtp", "[relay]\npop_before_smtp = -1\n"),
    ("replies.relay_denied", '[replies]\nrelay_denied = "550 Relaying prohibited"\n'),
    ("replies.relay_denied", '[replies]\nrelay_denied = "550 4.7.1 class mismatch"\n'),
    ("replies.relay_denied", '[replies]\nrelay_denied = "600 6.7.1 no such class"\n'),
    ("replies.relay_denied", '[replies]\nrelay_denied = "199 1.0.0 too low"\n'),
    ("replies.relay_denied", '[replies]\nrelay_denied = "250 2.0.0 a refusal that accepts"\n'),
    ("replies.unknown_recipient", '[replies]\nunknown_recipient = "550 5.1.1 two\\nlines"\n'),
    ("replies.never_host", "[replies]\nnever_host = 550\n"),
    ("replies.directory_failure", '[replies]\ndirectory_failure = "550 5.3.0 Directory down"\n'),
    ("replies.directory_failure", '[replies]\ndirectory_failure = "250 2.0.0 fine"\n'),
    ("replies.soft_bounce", "[replies]\nsoft_bounce = 1\n"),
    ('domains."dec.example".to', '[domains."dec.example"]\nroute = "reroute"\n'),
    ('domains."dec.example".to', '[domains."dec.example"]\nroute = "reroute"\nto = ""\n'),
    ('domains."dec.example".to', '[domains."dec.example"]\nroute = "reroute"\nto = "dec.example"\n'),
    ('domains."a.example".to', '[domains."a.example"]\nroute = "reroute"\nto = "b.example"\n'
                               '[domains."b.example"]\nroute = "reroute"\nto = "c.example"\n'
                               '[domains."c.example"]\nroute = "reroute"\nto = "a.example"\n'),
    ('domains."a.example".to', '[domains."a.example"]\nroute = "inbound"\nto = "b.example"\n'),
    ('domains."a.example".route', '[domains."a.example"]\nroute = "local"\n'),
    ('domains."a.example".rout', '[domains."a.example"]\nrout = "inbound"\n'),
    ('domains."bad domain"', '[domains."bad domain"]\nroute = "inbound"\n'),
    ('domains."a.example"', 'domains."a.example" = "inbound"\n'),
    ("domains", "domains = 3\n"),
    ("limits.max_recipients", '[limits]\nmax_recipients = "100"\n'),
    ("limits.max_recipients", "[limits]\nmax_recipients = true\n"),
    ("limits.max_recipients", "[limits]\nmax_recipients = 0\n"),
    ("limits.idle_timeout", "[limits]\nidle_timeout = 1.5\n"),
    ("limits.max_message_size", "[limits]\nmax_message_size = 10\n"),
    ("server", "server = 1\n"),
    ("server.hostname", '[server]\nhostname = "two words"\n'),
    ("server.postmaster", '[server]\npostmaster = "bob"\n'),
    ("tls.key", '[tls]\ncertificate = "cert.pem"\n'),
    ("tls.certificate", '[tls]\ncertificate = "missing.pem"\nkey = "missing.key"\n'),
    ("listen.smtp", '[listen]\nsmtp = "tcp:25"\n'),
    ("listen.smtp", '[listen]\nsmtp = ["nonsense"]\n'),
    ("outbound.port", "[outbound]\nport = 70000\n"),
    ("outbound.smarthost", '[outbound]\nsmarthost = "relay.example:smtp"\n'),
    ("outbound.smarthost_tls", '[outbound]\nsmarthost_tls = "yes"\n'),
    ("outbound.dns_servers", '[outbound]\ndns_servers = ["1.2.3.4:99999"]\n'),
    ("outbound.retry_schedule", "[outbound]\nretry_schedule = []\n"),
    ("outbound.retry_schedule", "[outbound]\nretry_schedule = [300, -1]\n"),
    ("directory.backend", '[directory]\nbackend = "mysql"\n'),
    ("directory.ldap.base", '[directory]\nbackend = "ldap"\n'),
    ("directory.ldap.url", '[directory.ldap]\nurl = "http://dc1.example"\n'),
    ("directory.ldap.url", '[directory.ldap]\nurl = "ldap://"\n'),
    ("directory.ldap.url", '[directory.ldap]\nurl = "ldap://dc1.example:99999"\n'),
    ("directory.ldap.url", '[directory.ldap]\nurl = "ldap://dc1.example/dc=example??sub"\n'),
    ("directory.ldap.starttls", '[directory.ldap]\nstarttls = "yes"\n'),
    ("directory.ldap.ca_file", '[directory.ldap]\nca_file = "missing-ca.pem"\n'),
    ("directory.ldap.bind_password", '[directory.ldap]\nbind_dn = "cn=svc,dc=example"\n'),
    ("directory.ldap.schema", '[directory.ldap]\nschema = "novell"\n'),
    ("directory.ldap.mailbox_filter", '[directory.ldap]\nmailbox_filter = "(mail=alice@example.org)"\n'),
    ("directory.ldap.mailbox_filter", '[directory.ldap]\nmailbox_filter = "(&(mail={address})"\n'),
    ("directory.ldap.list_filter", '[directory.ldap]\nlist_filter = "mail={address}"\n'),
    ("directory.ldap.mail_attribute", '[directory.ldap]\nmail_attribute = "mail address"\n'),
    ("directory.ldap.member_attribute", '[directory.ldap]\nmember_attribute = ""\n'),
    ("directory.ldap.cache_ttl", '[directory.ldap]\ncache_ttl = -1\n'),
    ("directory.ldap.cache_ttl", '[directory.ldap]\ncache_ttl = "60"\n'),
    ("directory.ldap.bnid_dn", '[directory.ldap]\nbnid_dn = ""\n'),
    ("directory.ldap", '[directory]\nldap = 1\n'),
    ("submission.enforce_sender", '[submission]\nenforce_sender = "no"\n'),
    ("filters.milters", '[filters]\nmilters = ["127.0.0.1:11332"]\n'),
    ("filters.milters", '[filters]\nmilters = ["inet:127.0.0.1:0"]\n'),
    ("filters.milters", '[filters]\nmilters = "inet:127.0.0.1:11332"\n'),
    ("filters.milter_default_action", '[filters]\nmilter_default_action = "discard"\n'),
    ("filters.milter_timeout", "[filters]\nmilter_timeout = 0\n"),
    ("filters.for_trusted", '[filters]\nfor_trusted = "yes"\n'),
    ("filters.milter", '[filters]\nmilter = ["inet:127.0.0.1:11332"]\n'),
]


@pytest.mark.parametrize("key, text", BROKEN, ids=[f"{i}-{k}" for i, (k, _) in enumerate(BROKEN)])
def test_broken_config_names_file_and_dotted_key_in_one_line(tmp_path: Path, key: str, text: str) -> None:
    """Each broken configuration is a ConfigError whose str is one line: '<file>: <key>: <why>'."""
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    message = str(err.value)
    assert "\n" not in message and "\r" not in message
    assert message.startswith(f"{tmp_path / 'mailguard.toml'}: {key}: "), message
    assert err.value.key == key
    assert len(message) > len(f"{tmp_path / 'mailguard.toml'}: {key}: ")


BAD_TOML = [
    "[relay\nallow = []\n",
    "a = \"\"\"\nunterminated\n",
    "[relay]\nallow = [\n",
    "[relay]\nallow = []\nallow = []\n",
    "= 1\n",
    b"[server]\nhostname = \"\xff\xfe\"\n",
    "a = " + "[" * 5000 + "\n",
    "a = " + "{x = " * 5000 + "\n",
]


@pytest.mark.parametrize("text", BAD_TOML, ids=[f"bad-toml-{i}" for i in range(len(BAD_TOML))])
def test_bad_toml_is_one_line_error(tmp_path: Path, text: str | bytes) -> None:
    """Bad TOML (syntax, duplicate keys, bad UTF-8, deep nesting) is one line naming the file."""
    with pytest.raises(ConfigError) as err:
        load_text(tmp_path, text)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'mailguard.toml'}: not valid TOML"), message


def test_missing_file(tmp_path: Path) -> None:
    """A missing file is one line naming it."""
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value) == f"{path}: cannot read: No such file or directory"


@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_any_bytes_load_or_fail_with_config_error(data: bytes) -> None:
    """Whatever the file holds, load() returns a Config or raises a one-line ConfigError."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mailguard.toml"
        path.write_bytes(data)
        try:
            config.load(path)
        except ConfigError as e:
            assert "\n" not in str(e) and str(e).startswith(str(path))


toml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10**8) | st.text(max_size=20)
    | st.sampled_from(["10.0.0.0/8", "::1", "550 5.7.1 No", "451 4.3.0 Later", "inbound", "reroute", "relay",
                       "x.example", "tcp:25", "a@b.example"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["route", "to", "allow", "never", "x.example", "y.example", "hostname"]), inner, max_size=3),
    max_leaves=8)
sections = st.dictionaries(
    st.sampled_from(list(config.DEFAULTS) + ["domains", "bogus"]),
    st.dictionaries(st.sampled_from(sorted({k for s in config.DEFAULTS.values() for k in s}
                                           | {"x.example", "route", "to"})), toml_values, max_size=4),
    max_size=4)


@given(sections)
def test_any_document_validates_or_fails_with_config_error(data: dict[str, object]) -> None:
    """Random documents (wrong types, odd values) give a Config or a one-line ConfigError."""
    data.pop("tls", None)                 # certificate paths would touch the file system
    try:
        config.parse(data, "x.toml", Path("/nonexistent"))
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("x.toml: ")


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """data_dir, the directory path and TLS files are relative to the config file's folder, not the cwd."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "tls").mkdir()
    (etc / "tls" / "cert.pem").write_text("x")
    (etc / "tls" / "key.pem").write_text("x")
    (etc / "mailguard.toml").write_text(
        '[server]\ndata_dir = "../var"\n[tls]\ncertificate = "tls/cert.pem"\nkey = "tls/key.pem"\n'
        '[directory]\npath = "gal.sqlite"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = config.load("../etc/mailguard.toml")
    assert cfg.server.data_dir.resolve() == (tmp_path / "var").resolve()
    assert cfg.queue_dir.resolve() == (tmp_path / "var" / "queue").resolve()
    assert cfg.mail_dir.resolve() == (tmp_path / "var" / "mail").resolve()
    assert cfg.tls.certificate is not None and cfg.tls.certificate.resolve() == (etc / "tls" / "cert.pem").resolve()
    assert cfg.directory.path.resolve() == (etc / "gal.sqlite").resolve()


def test_absolute_paths_kept(tmp_path: Path) -> None:
    """An absolute data_dir is used as written; the directory db defaults to data_dir/directory.sqlite."""
    cfg = load_text(tmp_path, f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    assert cfg.server.data_dir == tmp_path / "data"
    assert cfg.directory.path == tmp_path / "data" / "directory.sqlite"


def test_defaults(tmp_path: Path) -> None:
    """defaults() serves at once: localhost inbound, data under ./var, the documented ports and replies."""
    cfg = config.defaults(tmp_path)
    assert cfg.server.hostname == "localhost"
    assert cfg.server.data_dir == tmp_path / "var"
    assert dict(cfg.domains) == {"localhost": config.DomainRoute("inbound")}
    assert cfg.listen.smtp == ("tcp:2525:interface=127.0.0.1",)
    assert cfg.listen.submissions == ("ssl:2465:interface=127.0.0.1",)
    assert str(cfg.replies.relay_denied) == "550 5.7.1 Relaying prohibited"
    assert str(cfg.replies.directory_failure) == "451 4.3.0 Directory temporarily unavailable"
    assert cfg.relay.authenticated and cfg.relay.allow == () and cfg.relay.never == ()
    assert cfg.limits.max_recipients == 100 and cfg.tls.auth_requires_tls
    assert cfg.tls.certificate is None


def test_find_prefers_explicit_then_local_file_then_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """find(): --config, else ./etc/mailguard.toml, else the built-in defaults."""
    monkeypatch.chdir(tmp_path)
    assert config.find(None).source == "(built-in defaults)"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mailguard.toml").write_text('[server]\nhostname = "local.example"\n')
    assert config.find(None).server.hostname == "local.example"
    other = tmp_path / "other.toml"
    other.write_text('[server]\nhostname = "other.example"\n')
    assert config.find(str(other)).server.hostname == "other.example"


def test_office_config_values(tmp_path: Path) -> None:
    """A full office configuration parses into the expected frozen values."""
    cfg = load_text(tmp_path, """
[server]
hostname = "Mail.RealDomain.example"
postmaster = "Admin@RealDomain.example"
[domains."RealDomain.example."]
route = "inbound"
[domains."dec.example"]
route = "reroute"
to = "Compaq.Example"
[domains."compaq.example"]
route = "inbound"
[domains."partner.example"]
route = "relay"
[relay]
allow = ["192.168.10.0/24", "10.1.2.3", "2001:db8::/32"]
never = ["192.168.10.66"]
internal_addresses = ["10.9.9.9"]
pop_before_smtp = 600
[replies]
relay_denied = "451 4.7.1 Try later"
soft_bounce = true
[outbound]
dns_servers = ["127.0.0.1:5353", "10.0.0.1"]
""")
    assert cfg.route_for("realdomain.example") == config.DomainRoute("inbound")
    assert cfg.route_for("dec.example") == config.DomainRoute("reroute", "compaq.example")
    assert cfg.route_for("remote.example") is None
    assert cfg.inbound_domains() == ["compaq.example", "realdomain.example"]
    assert cfg.server.postmaster == "admin@realdomain.example"
    assert [str(n) for n in cfg.relay.allow] == ["192.168.10.0/24", "10.1.2.3/32", "2001:db8::/32"]
    assert cfg.relay.pop_before_smtp == 600
    assert str(cfg.replies.relay_denied) == "451 4.7.1 Try later" and cfg.replies.soft_bounce
    assert cfg.outbound.dns_servers == (("127.0.0.1", 5353), ("10.0.0.1", 53))
    with pytest.raises(AttributeError):
        cfg.relay.pop_before_smtp = 0  # type: ignore[misc]


def test_domains_table_replaces_the_localhost_default(tmp_path: Path) -> None:
    """Once [domains] is given, localhost is no longer implied."""
    cfg = load_text(tmp_path, '[domains."office.example"]\nroute = "inbound"\n')
    assert list(cfg.domains) == ["office.example"]


def test_routing_table_lists_every_rule(tmp_path: Path) -> None:
    """check-config's routing table names each domain's route and the relay rules in order."""
    cfg = load_text(tmp_path, '[domains."a.example"]\nroute = "inbound"\n[domains."b.example"]\n'
                              'route = "reroute"\nto = "a.example"\n[relay]\nnever = ["10.0.0.66"]\n')
    text = "\n".join(config.routing_table(cfg))
    assert "a.example: inbound" in text and "b.example: reroute to a.example" in text
    assert text.index("never: 10.0.0.66/32") < text.index("allow: (none)")


# -- the shipped sample configuration -----------------------------------------------------


def test_shipped_sample_documents_every_key_with_its_default() -> None:
    """etc/mailguard.toml loads, names every key of config.DEFAULTS, and gives each its default."""
    cfg = config.load(SHIPPED)
    with open(SHIPPED, "rb") as f:
        doc = tomllib.load(f)
    missing = [f"{s}.{k}" for s, keys in config.DEFAULTS.items() for k in keys if k not in doc.get(s, {})]
    assert missing == []
    differing = [f"{s}.{k}" for s, keys in config.DEFAULTS.items() for k, v in keys.items() if doc[s][k] != v]
    # One deliberate difference: the shipped file puts data in ./var of the checkout,
    # where the built-in defaults (no config file) put it too (SPEC "Start").
    assert differing == ["server.data_dir"]
    assert doc["server"]["data_dir"] == "../var"
    assert doc["domains"] == config.DEFAULT_DOMAINS
    assert cfg.relay == config.defaults(SHIPPED.parent).relay
    assert cfg.server.data_dir.resolve() == (SHIPPED.parent.parent / "var").resolve()


def test_shipped_sample_comments_every_key() -> None:
    """Every key line in etc/mailguard.toml carries a comment, except the four reply strings."""
    uncommented = []
    section = ""
    for line in SHIPPED.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#") and "#" not in line:
            key = line.split("=")[0].strip()
            if not (section == "replies" and key != "soft_bounce") and key != "smarthost_password":
                uncommented.append(f"{section}.{key}")
    assert uncommented == []


def test_the_smarthost_password_is_kept_once(tmp_path: Path) -> None:
    """The parsed file is not kept: the password lives only in outbound.smarthost_password."""
    cfg = load_text(tmp_path, '[outbound]\nsmarthost = "relay.example:587"\n'
                              'smarthost_user = "joe"\nsmarthost_password = "s3cret-Pw"\n')
    found: list[str] = []

    def walk(value: object, where: str, seen: set[int]) -> None:
        if value == "s3cret-Pw":
            found.append(where)
            return
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, dict) or hasattr(value, "items"):
            for k, v in value.items():  # type: ignore[attr-defined]
                walk(v, f"{where}[{k!r}]", seen)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]", seen)
        elif hasattr(value, "__dataclass_fields__"):
            for name in value.__dataclass_fields__:
                walk(getattr(value, name), f"{where}.{name}", seen)

    walk(cfg, "cfg", set())
    assert found == ["cfg.outbound.smarthost_password"]


def test_ldap_directory_settings_and_schema_defaults(tmp_path: Path) -> None:
    """[directory.ldap] is read into cfg.directory.ldap; schema = "ad" brings the AD filters."""
    cfg = load_text(tmp_path, '[directory]\nbackend = "ldap"\n[directory.ldap]\n'
                              'url = "ldaps://dc1.realdomain.example"\nbase = "dc=realdomain,dc=example"\n'
                              'schema = "ad"\n')
    ldap = cfg.directory.ldap
    assert ldap is not None
    assert (ldap.host, ldap.port, ldap.tls) == ("dc1.realdomain.example", 636, "ldaps")
    assert "proxyAddresses=smtp:{address}" in ldap.mailbox_filter
    assert ldap.list_filter == "(&(objectClass=group)(|(mail={address})(proxyAddresses=smtp:{address})))"
    cfg = load_text(tmp_path, '[directory]\nbackend = "ldap"\n[directory.ldap]\n'
                              'url = "ldap://127.0.0.1:3389"\nbase = "o=x"\nstarttls = false\n'
                              'list_filter = "(&(objectClass=groupOfUniqueNames)(mail={address}))"\n')
    assert cfg.directory.ldap is not None
    assert (cfg.directory.ldap.port, cfg.directory.ldap.tls) == (3389, "none")
    assert cfg.directory.ldap.list_filter == "(&(objectClass=groupOfUniqueNames)(mail={address}))"
    assert config.defaults().directory.ldap is None
