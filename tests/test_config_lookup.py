"""The configuration file lookup order: --config, $MAILGUARD_CONFIG, ./etc, /etc/mailguard."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailguard.config import lookup


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step wins over the ones after it; a missing ./etc or /etc file is skipped."""
    monkeypatch.chdir(tmp_path)
    system = tmp_path / "system" / "mailguard.toml"
    assert lookup.locate(None, {}, system) is None
    system.parent.mkdir()
    system.write_text("")
    assert lookup.locate(None, {}, system) == lookup.Located(system, str(system.parent))
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "mailguard.toml").write_text("")
    assert lookup.locate(None, {}, system) == lookup.Located(lookup.LOCAL, "./etc")
    env = {"MAILGUARD_CONFIG": "/x/env.toml"}
    assert lookup.locate(None, env, system) == lookup.Located(Path("/x/env.toml"), "$MAILGUARD_CONFIG")
    assert lookup.locate("given.toml", env, system) == lookup.Located(Path("given.toml"), "--config")
    assert lookup.locate(None, {"MAILGUARD_CONFIG": ""}, system) == lookup.Located(lookup.LOCAL, "./etc")


def test_metrics_listen_is_validated(tmp_path: Path) -> None:
    """[metrics] listen takes endpoint strings; anything else is one error naming metrics.listen."""
    from mailguard import config

    assert config.parse({}, "m.toml", tmp_path).metrics.listen == ()
    cfg = config.parse({"metrics": {"listen": ["tcp:9125:interface=127.0.0.1"]}}, "m.toml", tmp_path)
    assert cfg.metrics.listen == ("tcp:9125:interface=127.0.0.1",)
    with pytest.raises(config.ConfigError) as e:
        config.parse({"metrics": {"listen": ["localhost"]}}, "m.toml", tmp_path)
    assert str(e.value) == "m.toml: metrics.listen: 'localhost' is not an endpoint description like 'tcp:9125'"
