"""diffusers-attribution: which training images made a diffusion model generate this image?

The public names below are imported on first use (PEP 562), as diffusers does: `import diffusers_attribution`
and the CLI's `--help` stay fast and never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_getattr
from .version import __version__

_PUBLIC = {
    "AttributionConfig": ".config",
    "AttributionMixin": ".mixin",
    "AttributionResult": ".result",
    "CorruptStoreError": ".store.errors",
    "FeatureStore": ".store.format",
    "ImageFolder": ".data",
    "InvalidImageError": ".data",
    "PipelineAdapter": ".adapters",
    "StoreMismatchError": ".store.errors",
    "TopK": ".result",
    "UnsupportedPipelineError": ".adapters",
    "enable_attribution": ".mixin",
    "get_adapter": ".adapters",
    "register_adapter": ".adapters",
}

__all__ = sorted([*_PUBLIC, "__version__"])

if TYPE_CHECKING:
    from .adapters import PipelineAdapter, UnsupportedPipelineError, get_adapter, register_adapter
    from .config import AttributionConfig
    from .data import ImageFolder, InvalidImageError
    from .mixin import AttributionMixin, enable_attribution
    from .result import AttributionResult, TopK
    from .store.errors import CorruptStoreError, StoreMismatchError
    from .store.format import FeatureStore


__getattr__ = lazy_getattr(__name__, _PUBLIC)


def __dir__():
    return __all__
