"""Pipeline adapters: one file per pipeline family. `get_adapter(pipe)` picks the first that supports it.

A new family is one file here whose `PipelineAdapter` subclass is decorated with `@register_adapter`
(registry.py); called from outside the package, `register_adapter` adds a family tried before the built-ins.
The names below are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_getattr

_PUBLIC = {
    "DiTAdapter": ".dit",
    "FlowMatchingAdapter": ".flow_matching",
    "FluxAdapter": ".flux",
    "ModelInputs": ".base",
    "PipelineAdapter": ".base",
    "PixArtAdapter": ".pixart",
    "StableDiffusion3Adapter": ".sd3",
    "StableDiffusionAdapter": ".stable_diffusion",
    "StableDiffusionXLAdapter": ".sdxl",
    "UnconditionalAdapter": ".unconditional",
    "UnsupportedPipelineError": ".base",
    "adapter_classes": ".registry",
    "get_adapter": ".registry",
    "register_adapter": ".registry",
}

__all__ = sorted(_PUBLIC)

if TYPE_CHECKING:
    from .base import ModelInputs, PipelineAdapter, UnsupportedPipelineError
    from .dit import DiTAdapter
    from .flow_matching import FlowMatchingAdapter
    from .flux import FluxAdapter
    from .pixart import PixArtAdapter
    from .registry import adapter_classes, get_adapter, register_adapter
    from .sd3 import StableDiffusion3Adapter
    from .sdxl import StableDiffusionXLAdapter
    from .stable_diffusion import StableDiffusionAdapter
    from .unconditional import UnconditionalAdapter


__getattr__ = lazy_getattr(__name__, _PUBLIC)


def __dir__():
    return __all__
