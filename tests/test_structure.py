"""The package's structure: no import cycles between its modules, and one registry per extension point."""

from __future__ import annotations

import ast

from import_graph import NAME, PACKAGE, import_graph, imports, modules


def import_cycles() -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    graph = import_graph()
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
    found = modules()
    assert f"{NAME}.ensemble" in imports(f"{NAME}.mixin", found[f"{NAME}.mixin"], found)
    assert f"{NAME}.store.hub" in imports(f"{NAME}.store.format", found[f"{NAME}.store.format"], found)


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
        tree = ast.parse(path.read_text())
        # store/schema.py's frozen facts of the methods whose stores predate `method_facts` are history, not a list
        # to extend when a method is added
        legacy = {id(node) for top in ast.walk(tree) if isinstance(top, ast.AnnAssign)
                  and getattr(top.target, "id", None) == "LEGACY_METHOD_FACTS" for node in ast.walk(top)}
        literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and id(node) not in legacy}
        listed = sorted(names & literals)
        assert len(listed) <= 1, f"{path} lists methods {listed}: they belong to methods/"
