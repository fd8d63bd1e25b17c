"""The one registry of projectors: `AttributionConfig.projector` name → a factory of `Projector`s.

A projector is one file in `projection/` whose factory is decorated with `@register_projector(name)`:

    @register_projector("my-projector")
    def make(config, denoiser, parameters) -> Projector: ...

The registry imports every module of the package on first use, so nothing else lists the names. This module
imports nothing heavy, so that `config.py` can validate names.
"""

from __future__ import annotations

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


def projector_names() -> tuple[str, ...]:
    _discover()
    return tuple(_FACTORIES)


def make_projector(config, denoiser, parameters):
    """The projector named by `config.projector` for the selected `parameters` of `denoiser`."""
    _discover()
    if config.projector not in _FACTORIES:
        raise ValueError(f"unknown projector {config.projector!r}; registered: {list(_FACTORIES)}")
    return _FACTORIES[config.projector](config, denoiser, parameters)
