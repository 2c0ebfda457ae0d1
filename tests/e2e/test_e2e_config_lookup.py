"""Which configuration the CLI and ``twistd mailguard`` read, and what ``check-config`` catches.

The command line never makes a data folder where it happens to run: with no
configuration file it stops (unless ``--defaults``), and it says which file it
read when that was not given with ``--config``.  A listen endpoint Twisted cannot
parse, or a data folder that cannot be made, is one line naming the key, from
``check-config`` and from ``twistd mailguard`` alike.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from .harness import MailguardServer, child_env, free_port, toml_dumps, twistd_command

SYSTEM_CONFIG = Path("/etc/mailguard/mailguard.toml")
NONE_FOUND = ("mailguard: no configuration file: give --config FILE or set $MAILGUARD_CONFIG, or create "
              "./etc/mailguard.toml or /etc/mailguard/mailguard.toml (--defaults runs on the built-in "
              "defaults, data in ./var)\n")


def run_cli(cwd: Path, *args: str, env_config: str | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m mailguard ARGS`` in ``cwd`` with ``$MAILGUARD_CONFIG`` set only when given."""
    env = child_env()
    env.pop("MAILGUARD_CONFIG", None)
    if env_config is not None:
        env["MAILGUARD_CONFIG"] = env_config
    return subprocess.run([sys.executable, "-m", "mailguard", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL)


def write_config(path: Path, data_dir: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_dumps({"server": {"data_dir": data_dir},
                                "domains": {"lookup.example": {"route": "inbound"}}}), encoding="utf-8")
    return path


def test_cli_without_a_configuration_stops_and_makes_nothing(tmp_path: Path) -> None:
    """No --config, no $MAILGUARD_CONFIG, no ./etc or /etc file: one line, exit 1, no ./var."""
    assert not SYSTEM_CONFIG.exists(), f"{SYSTEM_CONFIG} exists on this machine: the test needs it absent"
    result = run_cli(tmp_path, "user", "list")
    assert (result.returncode, result.stdout, result.stderr) == (1, "", NONE_FOUND)
    assert list(tmp_path.iterdir()) == []
    # --defaults asks for the built-in defaults, data in ./var, explicitly.
    result = run_cli(tmp_path, "--defaults", "user", "list")
    assert (result.returncode, result.stderr) == (0, ""), result
    assert (tmp_path / "var" / "directory.sqlite").is_file()


def test_cli_says_which_file_it_read(tmp_path: Path) -> None:
    """$MAILGUARD_CONFIG beats ./etc/mailguard.toml; each is named on stderr; --config is not."""
    local = write_config(tmp_path / "etc" / "mailguard.toml", "local-var")
    chosen = write_config(tmp_path / "elsewhere.toml", "env-var")
    add = ("user", "add", "ann@lookup.example", "--password-stdin")

    result = run_cli(tmp_path, "user", "list", env_config=str(chosen))
    assert (result.returncode, result.stderr) == (0, f"mailguard: configuration {chosen} (from $MAILGUARD_CONFIG)\n")
    assert (tmp_path / "env-var" / "directory.sqlite").is_file()
    assert not (tmp_path / "etc" / "local-var").exists()

    result = run_cli(tmp_path, "user", "list")
    assert (result.returncode, result.stderr) == (0, "mailguard: configuration etc/mailguard.toml (from ./etc)\n")
    assert (tmp_path / "etc" / "local-var" / "directory.sqlite").is_file()   # relative to the file

    env = child_env()
    env.pop("MAILGUARD_CONFIG", None)
    result = subprocess.run([sys.executable, "-m", "mailguard", "--config", str(local), *add], cwd=tmp_path,
                            input="a long enough password\n", capture_output=True, text=True, timeout=60, env=env)
    assert (result.returncode, result.stderr) == (0, ""), result
    assert run_cli(tmp_path, "user", "list").stdout == "ann@lookup.example\n"


def test_check_config_catches_endpoints_and_the_data_folder(tmp_path: Path) -> None:
    """tcp:notaport, an unknown endpoint option, a bad systemd family, a data folder under a file."""
    (tmp_path / "afile").write_text("not a folder\n")
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml_dumps({
        "server": {"data_dir": "afile/var"},
        "listen": {"smtp": ["tcp:notaport"], "submission": ["tcp:2587:interface=127.0.0.1:bogus=1"],
                   "pop3": ["systemd:domain=INET:index=0"], "pop3s": ["systemd:domain=INETT:index=1"]},
    }), encoding="utf-8")
    result = run_cli(tmp_path, "--config", str(cfg), "check-config")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"mailguard: {cfg}: listen.smtp: 'tcp:notaport': invalid literal for int() with base 10: 'notaport'",
        f"mailguard: {cfg}: listen.submission: 'tcp:2587:interface=127.0.0.1:bogus=1': "
        "_parseTCP() got an unexpected keyword argument 'bogus'",
        f"mailguard: {cfg}: listen.pop3s: 'systemd:domain=INETT:index=1': "
        "domain='INETT' is not an address family (INET, INET6, UNIX)",
        f"mailguard: {cfg}: server.data_dir: {tmp_path}/afile/var: {tmp_path}/afile is not a folder",
    ]


def test_twistd_stops_on_a_bad_endpoint_in_one_line(tmp_path: Path) -> None:
    """``twistd -n mailguard`` with ``tcp:notaport`` exits 1 with one line and no traceback."""
    server = MailguardServer(tmp_path / "srv", {"listen": {"pop3": ["tcp:notaport"]}})
    result = subprocess.run(server.command(), cwd=server.root, capture_output=True, text=True, timeout=60,
                            env=child_env(), stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr == (f"mailguard: {server.config_path}: listen.pop3: 'tcp:notaport': "
                             "invalid literal for int() with base 10: 'notaport'\n")
    assert "Traceback" not in result.stdout
    assert not server.data_dir.exists()


def test_twistd_without_systemd_sockets_says_so(tmp_path: Path) -> None:
    """A ``systemd:`` endpoint with no socket passed (started outside systemd): one line, exit 1."""
    port = free_port()
    server = MailguardServer(tmp_path / "srv", {"listen": {"smtp": ["systemd:domain=INET:index=0"],
                                                          "pop3": [f"tcp:{port}:interface=127.0.0.1"]}})
    env = child_env()
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    result = subprocess.run(twistd_command() + ["-n", "--pidfile=", "mailguard", "--config", str(server.config_path)],
                            cwd=server.root, capture_output=True, text=True, timeout=60, env=env,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 1
    assert result.stderr == (f"mailguard: {server.config_path}: listen.smtp: 'systemd:domain=INET:index=0': "
                             "systemd passed no such socket (is the .socket unit running, and the index or "
                             "name right?)\n")
