"""Import hygiene: no DNS lookup when the server is imported; a pure core."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import socket, sys
def refuse(*args, **kwargs):
    raise SystemExit("blocking DNS lookup at import: socket.%s%r" % (refuse.name, args))
for name in ("getfqdn", "gethostbyname", "gethostbyaddr", "getaddrinfo"):
    def f(*args, _name=name, **kwargs):
        refuse.name = _name
        refuse(*args)
    setattr(socket, name, f)
import mailguard.app.tap, mailguard.smtp.server, mailguard.pop3.server, mailguard.app.service, mailguard.outbound.runner
print("imported")
"""


def test_importing_the_server_makes_no_dns_lookup() -> None:
    """twisted.mail.smtp calls socket.getfqdn() at import; mailguard's import of it must not."""
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "imported"


FORBIDDEN = ("twisted", "sqlite3", "socket")


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module name ``path`` imports (absolute names; relative ones resolved), with its line."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return out


def _module_file(name: str) -> Path | None:
    """The source file of a mailguard module (or package), None for anything else."""
    if name != "mailguard" and not name.startswith("mailguard."):
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_core_imports_no_twisted_sqlite_or_socket() -> None:
    """Every module of mailguard/core, and every mailguard module it imports in turn (config,
    say), imports nothing from Twisted, sqlite3 or socket: the policy stays pure."""
    todo = sorted((REPO / "mailguard" / "core").glob("*.py"))
    assert len(todo) >= 5, todo
    seen: set[Path] = set()
    bad: list[str] = []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name, line in _imports(path):
            if name.split(".")[0] in FORBIDDEN:
                bad.append(f"{path.relative_to(REPO)}:{line}: imports {name}")
            found = _module_file(name)
            if found is not None:
                todo.append(found)
    assert not bad, "\n".join(bad)
