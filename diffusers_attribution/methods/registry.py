"""The one registry of methods: `register_method`, `get_method`, `method_names`, `default_method` (and `PerPair`,
a default counted in training pairs, which config.py resolves).

It imports nothing but discovery.py: `config.py` asks it for names and defaults, and the registry imports the
method modules (declarations, light) on first use, never at import time.
"""

from __future__ import annotations

from typing import Any

from ..discovery import discover

REDUCTIONS = ("mean", "pairs", "unit-pairs")  # how a method reduces per-(t, ε) rows (methods/base.py)


class PerPair:
    """A method default counted in the training set's (t, ε) pairs: `PerPair(3)` for `query_samples` is S = 3·K·D,
    so the default follows a config's own K and D (config.py resolves it after K and D)."""

    def __init__(self, factor: int):
        self.factor = int(factor)

    def __repr__(self) -> str:
        return f"PerPair({self.factor})"

    def of(self, num_timesteps: int, noise_draws: int | None) -> int:
        return self.factor * int(num_timesteps) * int(noise_draws or 1)

_REGISTRY: dict[str, Any] = {}
_ALIASES: dict[str, str] = {}


def register_method(cls: type) -> type:
    """Class decorator: register a `Method` subclass under its name and aliases."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.reduction not in REDUCTIONS or (cls.query_reduction or cls.reduction) not in REDUCTIONS:
        raise ValueError(f"{cls.__name__}: reduction must be one of {REDUCTIONS}")
    for key in (cls.name, *cls.aliases):
        owner = _ALIASES.get(key)
        if owner is not None and owner != cls.name:
            raise ValueError(f"method name {key!r} of {cls.__name__} is already taken by {owner!r}")
        _ALIASES[key] = cls.name
    _REGISTRY[cls.name] = cls()
    return cls


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    discover(__package__)
    return tuple(_REGISTRY)


def get_method(name: str) -> Any:
    """The `Method` registered as `name` (or an alias); `ValueError` listing the choices otherwise."""
    discover(__package__)
    key = _ALIASES.get(str(name).lower())
    if key is None:
        discover(__package__, refresh=True)  # a module added to the package's path since the first look
        key = _ALIASES.get(str(name).lower())
    if key is None:
        raise ValueError(f"AttributionConfig.method={name!r} is not one of {list(_REGISTRY)}")
    return _REGISTRY[key]


def default_method(parameters: Any = "all") -> str:
    """The name of the method that declares itself the default for a `parameters` setting (`Method.default_for`:
    "all" for every parameter or glob patterns, "lora" for the LoRA weights); each was chosen by the
    validation-only rule on its setting's benchmark (docs/benchmarks.md)."""
    setting = parameters if parameters in ("all", "lora") else "all"
    discover(__package__)
    chosen = [name for name, method in _REGISTRY.items() if setting in method.default_for]
    if len(chosen) != 1:
        raise RuntimeError(f"{len(chosen)} methods declare themselves the default for parameters={setting!r}: {chosen}")
    return chosen[0]
