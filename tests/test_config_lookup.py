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
