"""Imports run one way: core <- serving <- (ls_bridge | trainer) <- labelloop (the app).

Read from the source, not from ``sys.modules``, so a lazy import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What each package may import from the project besides itself.
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset(),
    "serving": frozenset({"core"}),
    "ls_bridge": frozenset({"core", "serving"}),
    "trainer": frozenset({"core", "serving"}),
    "labelloop": frozenset({"core", "serving", "ls_bridge", "trainer"}),
}


def _project_imports(path: Path) -> set[str]:
    """The project packages a module imports, at any depth of the module's code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        found.update(n.split(".")[0] for n in names if n.split(".")[0] in ALLOWED)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_upward_import(package: str) -> None:
    upward = {
        f"{path.relative_to(ROOT)} imports {target}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for target in _project_imports(path) - ALLOWED[package] - {package}
    }
    assert not upward, "imports that run against the layers:\n" + "\n".join(sorted(upward))


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ls_bridge.app import create_app\n")
    assert _project_imports(module) == {"ls_bridge"}
