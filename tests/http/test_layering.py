"""The protocol wing stays below the proxy layer: nothing in sidecar/http imports it."""

from __future__ import annotations

import ast
from pathlib import Path

import sidecar

WING = Path(sidecar.__file__).parent / "http"
# What sidecar/http may import from the rest of the package: the sidecar's own errors.
ALLOWED = {"sidecar.errors"}


def _imports(path: Path, package: str = "sidecar.http") -> set[str]:
    """Absolute names of the sidecar modules that `path` (a module of `package`) imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names.add(module)
    return {name for name in names if name == "sidecar" or name.startswith("sidecar.")}


def test_the_wing_imports_only_itself_and_errors() -> None:
    files = sorted(WING.glob("*.py"))
    assert {f.name for f in files} >= {"server.py", "client.py", "headers.py", "messages.py", "tunnel.py"}
    upward = {
        f.name: sorted(
            name for name in _imports(f) if not name.startswith("sidecar.http") and name not in ALLOWED
        )
        for f in files
    }
    assert {name: mods for name, mods in upward.items() if mods} == {}


def test_the_check_sees_relative_imports() -> None:
    # the same walk over a module that does import the proxy layer must find it
    assert "sidecar.forward" in _imports(WING.parent / "inbound.py", "sidecar")
    assert "sidecar.errors" in _imports(WING / "server.py")
