"""The whole package type-checks under ``mypy --strict``, as configured in ``mypy.ini``."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_mypy_ini_checks_the_whole_package_strictly() -> None:
    """``mypy`` with no arguments means: strict, over ``mailguard``, with the zope plugin."""
    ini = configparser.ConfigParser()
    ini.read(REPO / "mypy.ini")
    assert ini.getboolean("mypy", "strict")
    assert ini.get("mypy", "files").strip() == "mailguard"
    assert "mypy_zope:plugin" in ini.get("mypy", "plugins")


def test_package_is_strictly_typed() -> None:
    """``mypy`` from the repository root (reading ``mypy.ini``) finds nothing anywhere in mailguard."""
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "mypy.ini"), "--cache-dir=/dev/null"],
        capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    checked = sum(1 for _ in (REPO / "mailguard").rglob("*.py"))
    assert f"Success: no issues found in {checked} source files" in result.stdout
