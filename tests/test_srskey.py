"""Tests for mailguard.storage.srskey: the SRS secret is made once, durably, and kept."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from mailguard.storage import safeio, srskey


def test_the_secret_is_made_durably_once_and_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new key is synced before it gets its name, and the name is synced; later loads read it."""
    events: list[str] = []
    real_fsync, real_fsync_dir = safeio.fsync, safeio.fsync_dir

    def fsync(fd: int) -> None:
        events.append("fsync data")
        real_fsync(fd)

    def fsync_dir(path: Any) -> None:
        events.append(f"fsync dir {os.fspath(path)} key={'yes' if (tmp_path / 'srs.key').exists() else 'no'}")
        real_fsync_dir(path)

    monkeypatch.setattr(safeio, "fsync", fsync)
    monkeypatch.setattr(safeio, "fsync_dir", fsync_dir)
    key = srskey.load_or_create(tmp_path / "srs.key")
    assert len(key) == srskey.SIZE
    assert events == ["fsync data", f"fsync dir {tmp_path} key=yes"]
    assert oct((tmp_path / "srs.key").stat().st_mode & 0o777) == "0o600"
    assert os.listdir(tmp_path) == ["srs.key"]
    events.clear()
    assert srskey.load_or_create(tmp_path / "srs.key") == key
    assert events == []
