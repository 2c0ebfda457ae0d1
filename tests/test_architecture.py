"""The subpackages keep to the imports README.rst ("Architecture") allows each of them.

Only imports that run count: those under ``if TYPE_CHECKING:`` are annotations.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "mailguard"

#: Parts of ``app`` that protocol and storage code may use: logging, limits, TLS, the transport type.
APP_LEAVES = {"app.maillog", "app.limits", "app.tls", "app.connection"}
DIRECTORY_SEAM = {"directory.base", "directory.facts"}

#: subpackage -> the mailguard subpackages (or modules) it may import at run time, besides itself.
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "config": {"core", "directory.ldapfilter", "milter.codec"},
    "dns": set(),
    "directory": {"core", "config", "app.maillog"},
    "auth": {"core", "config", "app.maillog", "app.limits"},
    "storage": {"core", "config"} | DIRECTORY_SEAM,
    "senderauth": {"core", "config", "dns", "app.maillog"},
    "dkim": {"core", "config", "dns", "app.maillog"},
    "milter": {"core", "config", "app.maillog"} | DIRECTORY_SEAM,
    "checks": {"core", "config", "dns", "senderauth", "app.maillog"} | DIRECTORY_SEAM,
    "outbound": {"core", "config", "dns", "storage", "dkim", "app.maillog", "app.connection"},
    "smtp": ({"core", "config", "auth", "storage", "checks", "dkim", "milter", "senderauth", "dns"}
             | DIRECTORY_SEAM | APP_LEAVES),
    "pop3": {"core", "config", "auth", "storage"} | DIRECTORY_SEAM | APP_LEAVES,
}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(path: Path, package: str | None = None) -> list[tuple[str, int]]:
    """The mailguard modules ``path`` imports outside ``if TYPE_CHECKING:`` blocks, with their lines.

    :param package: the package ``path`` belongs to (default: from its place in the repository).
    """
    if package is None:
        package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            out.extend((f"{base}.{alias.name}", node.lineno) for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return [(name, line) for name, line in out if name.startswith("mailguard.")]


#: The one place for durable, atomic file writes: any package that writes files may use it.
SHARED = {"storage.safeio"}
PURE = {"core", "config", "dns"}


def allowed(owner: str, name: str) -> bool:
    """May subpackage ``owner`` import module ``name`` (``mailguard.x.y...``)?"""
    parts = name.split(".")[1:]
    if not parts or parts[0] == owner:
        return True
    rules = ALLOWED[owner] | (set() if owner in PURE else SHARED)
    return any(".".join(parts[:n]) in rules for n in range(1, len(parts) + 1))


def test_every_subpackage_has_a_rule() -> None:
    """A new subpackage needs its paragraph in README.rst and its line in ALLOWED (app may import anything)."""
    found = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert found - {"app"} == set(ALLOWED), sorted(found - {"app"} ^ set(ALLOWED))


def test_imports_follow_the_layers() -> None:
    """No subpackage reaches above its layer; in particular only app imports app.service or app.cli."""
    wrong: list[str] = []
    for owner in sorted(ALLOWED):
        for path in sorted((PACKAGE / owner).rglob("*.py")):
            for name, line in runtime_imports(path):
                if not allowed(owner, name):
                    wrong.append(f"{path.relative_to(REPO)}:{line}: {name}")
    assert wrong == [], "\n".join(wrong)


def test_the_check_sees_a_forbidden_import(tmp_path: Path) -> None:
    """The checker itself: an smtp module importing the service is caught, a TYPE_CHECKING one is not."""
    module = tmp_path / "probe.py"
    module.write_text("from typing import TYPE_CHECKING\n"
                      "from ..app import service\n"
                      "if TYPE_CHECKING:\n    from mailguard.app.cli import main\n", encoding="utf-8")
    names = [name for name, _ in runtime_imports(module, package="mailguard.smtp")]
    assert names == ["mailguard.app.service"]
    assert not allowed("smtp", "mailguard.app.service")
    assert allowed("smtp", "mailguard.app.maillog")
    assert not allowed("core", "mailguard.config.Config")
    assert allowed("dkim", "mailguard.storage.safeio") and not allowed("dkim", "mailguard.storage.queue")
