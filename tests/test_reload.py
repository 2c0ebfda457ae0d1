"""The reload's pure part: which changed sections need a restart."""

from __future__ import annotations

from pathlib import Path

from mailguard import config
from mailguard.app.reload import restart_keys


def test_restart_keys_name_only_what_a_reload_cannot_change(tmp_path: Path) -> None:
    """[listen], [directory] and [dns] need a restart; [relay] and [limits] do not."""
    old = config.parse({}, "a.toml", tmp_path)
    new = config.parse({"relay": {"allow": ["192.0.2.0/24"]}, "limits": {"max_recipients": 5}}, "a.toml", tmp_path)
    assert restart_keys(old, new) == []
    moved = config.parse({"listen": {"smtp": ["tcp:25"]}, "dns": {"servers": ["192.0.2.53"]}}, "a.toml", tmp_path)
    assert restart_keys(old, moved) == ["listen", "dns"]
