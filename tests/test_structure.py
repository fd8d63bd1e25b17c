"""The package's structure: no import cycles between its modules, and one registry per extension point."""

from __future__ import annotations

import ast
from pathlib import Path

import diffusers_attribution

PACKAGE = Path(diffusers_attribution.__file__).parent
NAME = "diffusers_attribution"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
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


def import_cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return cycles


def test_scanner_sees_lazy_imports():
    """The scan counts imports inside functions (a lazy import still makes a cycle)."""
    modules = _modules()
    assert f"{NAME}.ensemble" in _imports(f"{NAME}.mixin", modules[f"{NAME}.mixin"], modules)
    assert f"{NAME}.store.hub" in _imports(f"{NAME}.store.format", modules[f"{NAME}.store.format"], modules)


def test_no_import_cycles():
    assert import_cycles() == []


def test_every_registered_method_and_projector_is_found_without_a_list():
    """Methods and projectors register themselves in their own file; nothing else names them."""
    from diffusers_attribution.methods.base import get_method, method_names
    from diffusers_attribution.projection.registry import projector_names

    assert set(method_names()) >= {"trak", "d-trak", "journey-trak", "tracin", "retrac", "pixel-dot", "pixel-cosine",
                                   "embedding-cosine"}
    assert set(projector_names()) == {"factored", "identity", "gaussian", "rademacher"}
    assert get_method("dtrak").name == "d-trak"
    names = set(method_names())
    for path in PACKAGE.rglob("*.py"):
        if "methods" in path.relative_to(PACKAGE).parts:
            continue
        literals = {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)}
        listed = sorted(names & literals)
        assert len(listed) <= 1, f"{path} lists methods {listed}: they belong to methods/"
