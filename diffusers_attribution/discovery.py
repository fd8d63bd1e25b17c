"""`discover(package)`: import every module of a package once, so that each registers what it defines.

The registries of methods (methods/base.py), projectors (projection/registry.py) and store backends
(store/backends.py) find their entries this way: adding one is adding one file, with no list to edit.
"""

from __future__ import annotations

import importlib
import pkgutil

_done: set[str] = set()


def discover(package: str, refresh: bool = False) -> None:
    """Import each module of `package` (e.g. "diffusers_attribution.methods"), once per process; `refresh`: look
    again for modules added to the package's path since (a registry that does not know a name)."""
    if package in _done and not refresh:
        return
    _done.add(package)
    path = importlib.import_module(package).__path__
    for module in sorted(m.name for m in pkgutil.iter_modules(path)):
        importlib.import_module(f"{package}.{module}")
