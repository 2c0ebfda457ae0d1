"""The policy core type-checks under ``mypy --strict`` (house style, item 8)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORE = ["core/address.py", "config/__init__.py", "directory/sqlite.py", "core/dotstuff.py", "core/policy.py",
        "core/replies.py", "config/ldap.py", "directory/ldapfilter.py", "directory/ldapconn.py",
        "directory/ldap.py"]


def test_policy_core_is_strictly_typed() -> None:
    """mypy --strict finds nothing in the modules that decide what mail is accepted."""
    files = [str(REPO / "mailguard" / name) for name in CORE]
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir=/dev/null",
         *files],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Success: no issues found in {len(CORE)} source files" in result.stdout
