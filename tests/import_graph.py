"""The package's import graph, parsed (never imported): which of its modules each module imports, at any depth
(imports inside functions included, relative imports resolved), for tests/test_structure.py and
tests/test_layering.py."""

from __future__ import annotations

import ast
from pathlib import Path

import diffusers_attribution

PACKAGE = Path(diffusers_attribution.__file__).parent
NAME = "diffusers_attribution"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its __init__.py)."""
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module of the package `name` imports, at any depth (function-level imports included), except under
    `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    """module → the modules of the package it imports."""
    found = modules()
    return {name: imports(name, path, found) for name, path in found.items()}
