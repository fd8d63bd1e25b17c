"""The one registry of pipeline families: `register_adapter` and `get_adapter(pipe)`.

A family is one file in `adapters/` whose `PipelineAdapter` subclass is decorated with `@register_adapter`;
the registry imports every module of the package on first use, so nothing else lists the families:

    @register_adapter
    class MyFamilyAdapter(PipelineAdapter):
        family = "my-family"
        priority = 80  # tried before every family of lower priority (a more general one)
        @classmethod
        def supports(cls, pipe): ...
"""

from __future__ import annotations

from ..discovery import discover
from .base import PipelineAdapter, UnsupportedPipelineError

_ADAPTERS: list[type[PipelineAdapter]] = []  # in registration order


def register_adapter(adapter_cls: type[PipelineAdapter]) -> type[PipelineAdapter]:
    """Class decorator: register a `PipelineAdapter` subclass for a pipeline family.

    The families of this package are tried by `priority`, highest first (then by `family`); a family registered
    from outside it is tried before all of them, the one registered last first.
    """
    if not (isinstance(adapter_cls, type) and issubclass(adapter_cls, PipelineAdapter)):
        raise TypeError(f"register_adapter takes a PipelineAdapter subclass, got {adapter_cls!r}")
    if adapter_cls in _ADAPTERS:
        _ADAPTERS.remove(adapter_cls)
    _ADAPTERS.append(adapter_cls)
    return adapter_cls


def _in_package(adapter_cls: type[PipelineAdapter]) -> bool:
    return adapter_cls.__module__.startswith(f"{__package__}.")


def adapter_classes() -> tuple[type[PipelineAdapter], ...]:
    """The registered families in the order `get_adapter` tries them (modules added to the package since the
    last call are imported first)."""
    discover(__package__, refresh=True)
    registered_outside = [cls for cls in reversed(_ADAPTERS) if not _in_package(cls)]
    built_in = sorted((cls for cls in _ADAPTERS if _in_package(cls)), key=lambda cls: (-cls.priority, cls.family))
    return (*registered_outside, *built_in)


def get_adapter(pipe) -> PipelineAdapter:
    """The adapter for `pipe`, or an `UnsupportedPipelineError` that names what is missing."""
    adapters = adapter_classes()
    for adapter_cls in adapters:
        if adapter_cls.supports(pipe):
            return adapter_cls(pipe)
    components = getattr(pipe, "components", None)
    if components is None:
        raise UnsupportedPipelineError(f"{type(pipe).__name__} is not a diffusers pipeline (it has no `components`)")
    described = {name: type(value).__name__ for name, value in components.items() if value is not None}
    families = ", ".join(cls.family for cls in adapters)
    raise UnsupportedPipelineError(
        f"No attribution adapter supports {type(pipe).__name__} with components {described}. "
        f"Supported families: {families}. Add one with diffusers_attribution.adapters.register_adapter."
    )
