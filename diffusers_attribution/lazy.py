"""`lazy_getattr`: a package's public names imported on first use (PEP 562), as diffusers does."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_getattr(package: str, public: dict[str, str]) -> Callable[[str], Any]:
    """`__getattr__ = lazy_getattr(__name__, {name: ".module"})` in a package's __init__.py: each name is
    imported from its module (relative to `package`) when first read, then kept in the package."""

    def __getattr__(name: str) -> Any:
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(public[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
