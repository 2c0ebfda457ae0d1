"""``[log]`` and the log file of ``twistd --logfile`` (mailguard.app.logfile)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mailguard import config
from mailguard.app import logfile
from mailguard.config.log import LogConfig


def test_log_section_defaults_and_errors(tmp_path: Path) -> None:
    """1 MB and ten files kept by default; a tiny rotate_length or an unknown key is one clear error."""
    assert config.parse({}, "m.toml", tmp_path).log == LogConfig(1_000_000, 10)
    cfg = config.parse({"log": {"rotate_length": 0, "max_rotated_files": 0}}, "m.toml", tmp_path)
    assert cfg.log == LogConfig(0, 0)
    with pytest.raises(config.ConfigError) as e:
        config.parse({"log": {"rotate_length": 100}}, "m.toml", tmp_path)
    assert str(e.value) == ("m.toml: log.rotate_length: 100 bytes would rotate every few lines; "
                            "give at least 10000, or 0 to never rotate")
    with pytest.raises(config.ConfigError) as e:
        config.parse({"log": {"max_rotated": 3}}, "m.toml", tmp_path)
    assert str(e.value) == "m.toml: log.max_rotated: unknown key"


@pytest.mark.parametrize(("options", "path"), [
    ({"logfile": "/var/log/mailguard/twistd.log"}, "/var/log/mailguard/twistd.log"),
    ({"logfile": "mg.log", "nodaemon": True}, "CWD/mg.log"),
    ({}, "CWD/twistd.log"),                         # a daemon without --logfile: twistd.log
    ({"nodaemon": True}, None),                     # standard output
    ({"logfile": "-", "nodaemon": True}, None),
    ({"logfile": "x.log", "syslog": True}, None),
    ({"logfile": "x.log", "logger": "my.observer"}, None),
])
def test_which_file_twistd_would_write(options: dict[str, object], path: str | None) -> None:
    """Only a file twistd would write is taken over; standard output, syslog and --logger stay twistd's."""
    expected = path.replace("CWD", os.getcwd()) if path else None
    assert logfile.twistd_log_path(options.get) == expected


def test_open_log_removes_rotated_files_beyond_the_count(tmp_path: Path) -> None:
    """max_rotated_files = 2: after rotations only .1 and .2 exist, older files are gone."""
    for n in range(1, 6):
        (tmp_path / f"m.log.{n}").write_text("old\n")
    log = logfile.open_log(str(tmp_path / "m.log"), LogConfig(10_000, 2))
    for n in range(3):
        log.write(f"line {n}\n" + "x" * 10_000 + "\n")
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.log", "m.log.1", "m.log.2"]
    assert [(tmp_path / n).read_text()[:7] for n in ("m.log", "m.log.1", "m.log.2")] == [
        "line 2\n", "line 1\n", "line 0\n"]
