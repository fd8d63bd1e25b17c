"""Pipeline adapters: one file per pipeline family. `get_adapter(pipe)` picks the first that supports it.

A new family is one `PipelineAdapter` subclass passed to `register_adapter` (tried before the built-ins).
"""

from .base import ModelInputs, PipelineAdapter, UnsupportedPipelineError
from .dit import DiTAdapter
from .flow_matching import FlowMatchingAdapter
from .flux import FluxAdapter
from .pixart import PixArtAdapter
from .sd3 import StableDiffusion3Adapter
from .sdxl import StableDiffusionXLAdapter
from .stable_diffusion import StableDiffusionAdapter
from .unconditional import UnconditionalAdapter

# Tried in order, most specific first (SDXL's UNet is also a UNet2DConditionModel).
ADAPTERS: list[type[PipelineAdapter]] = [
    StableDiffusionXLAdapter,
    StableDiffusionAdapter,
    StableDiffusion3Adapter,
    FluxAdapter,
    PixArtAdapter,
    DiTAdapter,
    UnconditionalAdapter,
]


def register_adapter(adapter_cls: type[PipelineAdapter]) -> type[PipelineAdapter]:
    """Add an adapter for a new pipeline family (usable as a class decorator)."""
    ADAPTERS.insert(0, adapter_cls)
    return adapter_cls


def get_adapter(pipe) -> PipelineAdapter:
    """The adapter for `pipe`, or an `UnsupportedPipelineError` that names what is missing."""
    for adapter_cls in ADAPTERS:
        if adapter_cls.supports(pipe):
            return adapter_cls(pipe)
    components = getattr(pipe, "components", None)
    if components is None:
        raise UnsupportedPipelineError(f"{type(pipe).__name__} is not a diffusers pipeline (it has no `components`)")
    described = {name: type(value).__name__ for name, value in components.items() if value is not None}
    families = ", ".join(cls.family for cls in ADAPTERS)
    raise UnsupportedPipelineError(
        f"No attribution adapter supports {type(pipe).__name__} with components {described}. "
        f"Supported families: {families}. Add one with diffusers_attribution.adapters.register_adapter."
    )


__all__ = [
    "ADAPTERS",
    "DiTAdapter",
    "FlowMatchingAdapter",
    "FluxAdapter",
    "ModelInputs",
    "PixArtAdapter",
    "PipelineAdapter",
    "StableDiffusion3Adapter",
    "StableDiffusionAdapter",
    "StableDiffusionXLAdapter",
    "UnconditionalAdapter",
    "UnsupportedPipelineError",
    "get_adapter",
    "register_adapter",
]
