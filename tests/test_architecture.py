"""The package's layering, as docs/architecture.md draws it: each room imports only the rooms below it.

Read from the source with ``ast`` (module-level and function-level imports alike), so a lazy
import inside a function cannot hide an upward dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import aligndistil

PKG = Path(aligndistil.__file__).resolve().parent

# room -> rooms it may import (besides itself). Top-level modules are rooms of their own.
ALLOWED = {
    "errors": set(),
    "fileio": set(),
    "config": {"errors"},
    "losses": {"errors"},
    "data": {"errors", "fileio"},
    "model": {"errors", "fileio", "data"},
    "rewards": {"errors", "fileio", "data", "model", "config"},
    "train": {"errors", "fileio", "config", "data", "model", "losses", "rewards"},
    "workflows": {"errors", "fileio", "config", "data", "model", "losses", "rewards", "train"},
    "cli": {"errors", "fileio", "config", "data", "model", "losses", "rewards", "train", "workflows"},
    "__main__": {"cli"},
    "__init__": set(),
}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aligndistil"):
            if node.module == "aligndistil":  # `from aligndistil import losses`
                out.update(f"aligndistil.{a.name}" for a in node.names)
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("aligndistil"))
    return out


def test_no_relative_imports_and_every_room_is_known():
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        rel = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
        assert not rel, f"{path.relative_to(PKG)}: relative imports at lines {rel}"
        room = path.relative_to(PKG).parts[0].removesuffix(".py")
        assert room in ALLOWED, f"{room} is a new room: add it to ALLOWED and docs/architecture.md"


def test_rooms_import_only_downward():
    bad = []
    for path in PKG.rglob("*.py"):
        room = path.relative_to(PKG).parts[0].removesuffix(".py")
        for mod in _imports(path):
            target = _room(mod)
            if target != room and target not in ALLOWED[room]:
                bad.append(f"{path.relative_to(PKG)} imports {mod}")
    assert not bad, "upward or sideways imports:\n" + "\n".join(sorted(bad))


def test_no_module_is_a_god_module():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py") if (n := len(p.read_text().splitlines())) > 520}
    assert not long, f"modules over ~500 lines: {long}"
