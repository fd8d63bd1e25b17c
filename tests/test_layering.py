"""The package's layers (docs/design.md, "Layers"): no module imports a module of a higher layer, the store never
imports a method, featurization writes through the writer only, and a config is made without torch.

Imports are parsed, never run (tests/import_graph.py): imports inside functions count, `if TYPE_CHECKING:` ones
do not.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from import_graph import NAME, import_graph

ROOT = Path(__file__).resolve().parents[1]

# Lowest first; a name is a module or a package (all its modules), relative to diffusers_attribution; a module
# belongs to the layer of its longest name. The same list is in docs/design.md ("Layers").
LAYERS = [
    ["diffusers_attribution", "version", "lazy", "discovery", "config", "store.errors", "methods.registry",
     "projection.registry"],
    ["data", "fingerprint", "seeding", "distributed"],
    ["adapters", "checkpoints"],
    ["gradients", "objectives"],
    ["projection", "curvature"],
    ["store"],
    ["scoring", "search", "result", "plotting"],
    ["featurize", "checkpoint_features", "image_features"],
    ["methods"],
    ["api", "mixin", "trajectory", "ensemble"],
    ["cli", "explorer", "demo", "evaluation", "__main__"],
]

# Modules allowed to break the layering, and why (none since issue 22's redesign).
HIGHER_IMPORTS_TODAY: set[str] = set()
STORE_IMPORTS_METHODS_TODAY: set[str] = set()
ISSUE_22 = pytest.mark.xfail(strict=True, reason="an exception to the layering")

GRAPH = import_graph()


def _short(module: str) -> str:
    return module if module == NAME else module.removeprefix(f"{NAME}.")


def _full(name: str) -> str:
    return name if name == NAME else f"{NAME}.{name}"


def layer_of(module: str) -> int | None:
    """The layer of `module` (a full dotted name): that of the longest layer name it is or lies under."""
    best, layer = "", None
    for index, names in enumerate(LAYERS):
        for name in map(_full, names):
            inside = module == name or (name != NAME and module.startswith(f"{name}."))
            if inside and len(name) > len(best):
                best, layer = name, index
    return layer


def _cases(modules, known: set[str]) -> list:
    return [pytest.param(m, id=_short(m), marks=ISSUE_22 if _short(m) in known else ()) for m in sorted(modules)]


def test_every_module_has_a_layer_and_every_layer_name_a_module():
    assert [_short(m) for m in sorted(GRAPH) if layer_of(m) is None] == []
    names = [name for names in LAYERS for name in names]
    assert len(names) == len(set(names))
    assert [name for name in names if _full(name) not in GRAPH] == []


def test_the_layers_are_the_ones_docs_design_md_lists():
    text = (ROOT / "docs" / "design.md").read_text()
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    written = {int(number): names.split(", ")
               for number, names in re.findall(r"^\s*(\d+)\s+([\w.]+(?:, [\w.]+)*)", block, re.MULTILINE)}
    assert [written.get(index) for index in range(len(LAYERS))] == LAYERS and len(written) == len(LAYERS)


def test_the_known_exceptions_name_modules():
    for name in HIGHER_IMPORTS_TODAY | STORE_IMPORTS_METHODS_TODAY:
        assert _full(name) in GRAPH, name


@pytest.mark.parametrize("module", _cases(GRAPH, HIGHER_IMPORTS_TODAY))
def test_no_module_imports_a_higher_layer(module):
    layer = layer_of(module)
    higher = sorted(f"{_short(m)} (layer {layer_of(m)})" for m in GRAPH[module] if layer_of(m) > layer)
    assert higher == [], f"{_short(module)} (layer {layer}) imports {higher}"


@pytest.mark.parametrize("module", _cases([m for m in GRAPH if m.startswith(f"{NAME}.store")],
                                          STORE_IMPORTS_METHODS_TODAY))
def test_the_store_imports_nothing_from_methods(module):
    """A store is a plain container: config.json says what a method needs, the store never asks a method."""
    assert sorted(m for m in GRAPH[module] if m.startswith(f"{NAME}.methods")) == []


def test_featurize_imports_only_the_writer_from_the_store():
    """Featurization hands tensors and named state to `store/writer.py`; it reads no store itself."""
    from_store = sorted(m for m in GRAPH[f"{NAME}.featurize"] if m.startswith(f"{NAME}.store"))
    assert from_store == [f"{NAME}.store.writer"]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_importing_the_package_imports_no_torch():
    proc = _run("import sys\nimport diffusers_attribution\nassert 'torch' not in sys.modules, 'torch imported'")
    assert proc.returncode == 0, proc.stderr


def test_a_config_is_made_without_torch():
    """Method names, defaults and the fields each reads are declarations: validating a config needs no torch."""
    proc = _run("import sys\nfrom diffusers_attribution import AttributionConfig\n"
                "AttributionConfig()\nAttributionConfig(method='d-trak')\n"
                "assert 'torch' not in sys.modules, 'torch imported'")
    assert proc.returncode == 0, proc.stderr
