"""diffusers-attribution: which training images made a diffusion model generate this image?"""

from .version import __version__
from .adapters import PipelineAdapter, UnsupportedPipelineError, get_adapter, register_adapter
from .config import AttributionConfig
from .data import InvalidImageError
from .mixin import AttributionMixin, enable_attribution
from .result import AttributionResult, TopK
from .store.errors import CorruptStoreError, StoreMismatchError
from .store.format import FeatureStore

__all__ = [
    "AttributionConfig",
    "AttributionMixin",
    "AttributionResult",
    "CorruptStoreError",
    "FeatureStore",
    "InvalidImageError",
    "PipelineAdapter",
    "StoreMismatchError",
    "TopK",
    "UnsupportedPipelineError",
    "__version__",
    "enable_attribution",
    "get_adapter",
    "register_adapter",
]
