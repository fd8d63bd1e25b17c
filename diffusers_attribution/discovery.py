"""`discover(package)`: import every module of a package once, so that each registers what it defines.

The registries of methods (methods/base.py), projectors (projection/registry.py), pipeline adapters
(adapters/registry.py) and store backends (store/backends.py) find their entries this way: adding one is adding
one file, with no list to edit. A module added later (another folder appended to the package's `__path__`) is
found by `discover(package, refresh=True)`, which a registry calls when it does not know what it is asked for.
"""

from __future__ import annotations

import importlib
import pkgutil

_imported: dict[str, set[str]] = {}  # package → the names of its modules discover has imported


def discover(package: str, refresh: bool = False) -> bool:
    """Import each module of `package` (e.g. "diffusers_attribution.methods") that is not imported yet.

    The first call scans the package's `__path__`; later calls return at once unless `refresh`, which scans it
    again for modules added since. A module is imported at most once. Returns whether any module was imported.
    """
    if package in _imported and not refresh:
        return False
    imported = _imported.setdefault(package, set())
    path = importlib.import_module(package).__path__
    new = sorted({module.name for module in pkgutil.iter_modules(path)} - imported)
    imported.update(new)  # before importing: a module that asks its registry while imported finds no work to redo
    for module in new:
        importlib.import_module(f"{package}.{module}")
    return bool(new)
