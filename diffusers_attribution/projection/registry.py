"""The one registry of projectors: `AttributionConfig.projector` name → a factory of `Projector`s.

A projector is one file in `projection/` whose factory is decorated with `@register_projector(name)`:

    @register_projector("my-projector")
    def make(config, denoiser, parameters) -> Projector: ...

The registry imports every module of the package on first use, so nothing else lists the names. This module
imports nothing heavy, and `projector_names` reads the names from the modules' source (their
`@register_projector("...")` lines) without importing them, so that `config.py` validates names without torch.
"""

from __future__ import annotations

import threading

from ..discovery import discover
from typing import Callable

_FACTORIES: dict[str, Callable] = {}


def register_projector(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register `factory(config, denoiser, parameters) -> Projector` as projector `name`."""
    def decorate(factory: Callable) -> Callable:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"projector name {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory
    return decorate


def _discover() -> None:
    discover(__package__)


_DECLARED: tuple[str, ...] | None = None  # the names the package's modules declare, read once (`projector_names`)
_SCAN = threading.Lock()


def projector_names(refresh: bool = False) -> tuple[str, ...]:
    """The registered names, and those the package's projector modules declare (read from their source once per
    process, not imported; `refresh`: read again, for a module added to the package's path since)."""
    global _DECLARED
    with _SCAN:  # one reader at a time: CPython's ast is not safe to run in two threads at once
        if _DECLARED is None or refresh:
            _DECLARED = _declared_names()
        declared = _DECLARED
    return tuple(dict.fromkeys([*_FACTORIES, *declared]))


def _declared_names() -> tuple[str, ...]:
    import ast
    import importlib
    import importlib.util
    import pkgutil

    names = []
    for module in pkgutil.iter_modules(importlib.import_module(__package__).__path__):
        spec = importlib.util.find_spec(f"{__package__}.{module.name}")
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        with open(spec.origin, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "register_projector" and node.args \
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    return tuple(names)


def make_projector(config, denoiser, parameters):
    """The projector named by `config.projector` for the selected `parameters` of `denoiser`."""
    _discover()
    if config.projector not in _FACTORIES:
        discover(__package__, refresh=True)  # a module added to the package's path since the first look
    if config.projector not in _FACTORIES:
        raise ValueError(f"unknown projector {config.projector!r}; registered: {list(_FACTORIES)}")
    return _FACTORIES[config.projector](config, denoiser, parameters)
