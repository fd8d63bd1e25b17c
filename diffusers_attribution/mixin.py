"""`AttributionMixin` gives any supported `DiffusionPipeline` `.featurize(...)` and `.attribute(...)`.

    enable_attribution(pipe)                       # the same object, now also an AttributionMixin
    store = pipe.featurize(train_dataset, config=AttributionConfig(method="d-trak"))
    result = pipe.attribute(images, store)         # or pipe.attribute(images, train_dataset, config=...)
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from .adapters import get_adapter
from .config import AttributionConfig
from .featurize import Featurizer
from .result import AttributionResult
from .scoring import KernelScorer
from .store import FeatureStore


class AttributionMixin:
    """Attribution methods for a pipeline; list it as a base of your own pipeline class, or call
    `enable_attribution(pipe)` on an existing pipeline."""

    attribution_config: AttributionConfig | None = None

    def _attribution_config(self, config: AttributionConfig | None) -> AttributionConfig:
        return config or self.attribution_config or AttributionConfig()

    def featurize(self, train_dataset: Any, config: AttributionConfig | None = None, *, progress: bool = True) -> FeatureStore:
        """Projected training features Φ [N, k] of `train_dataset` under `config`, with their metadata."""
        return Featurizer(self, self._attribution_config(config)).featurize_dataset(train_dataset, progress=progress)

    def attribute(
        self,
        images: Any,
        train_data: Any,
        config: AttributionConfig | None = None,
        *,
        prompts: Sequence[str] | str | None = None,
        progress: bool = True,
    ) -> AttributionResult:
        """Score `images` against a `FeatureStore`, a store's directory, or a training set (featurized first).

        With a store, the store's own config is used; a `config` that differs from it is an error.
        """
        if isinstance(train_data, (str, os.PathLike)):
            train_data = FeatureStore.from_pretrained(train_data)
        if isinstance(train_data, FeatureStore):
            store = train_data
            if config is not None:
                store.check_compatible(config, {})
            config = store.config
        else:
            store = self.featurize(train_data, config, progress=progress)
            config = store.config
        featurizer = Featurizer(self, config)
        store.check_compatible(config, featurizer.metadata())
        query_features = featurizer.featurize_queries(images, prompts)
        scorer = KernelScorer(store.features, config.damping, config.damping_ratio)
        from .data import to_image_batch

        return AttributionResult(
            scores=scorer.scores(query_features),
            config=config,
            query_images=to_image_batch(images),
            metadata={"damping": scorer.damping},
        )


_ATTRIBUTION_CLASSES: dict[type, type] = {}


def enable_attribution(pipe, config: AttributionConfig | None = None):
    """Mix `AttributionMixin` into `pipe`'s own class, in place, and return `pipe`.

    The new class keeps the pipeline class's name and module, so `save_pretrained` writes the stock
    `_class_name` and the saved pipeline loads without this package. Unsupported pipelines raise
    `UnsupportedPipelineError` here, before any work is done.
    """
    get_adapter(pipe)
    cls = type(pipe)
    if not isinstance(pipe, AttributionMixin):
        if cls not in _ATTRIBUTION_CLASSES:
            mixed = type(cls.__name__, (cls, AttributionMixin), {"__module__": cls.__module__})
            mixed.__qualname__ = cls.__qualname__
            _ATTRIBUTION_CLASSES[cls] = mixed
        pipe.__class__ = _ATTRIBUTION_CLASSES[cls]
    if config is not None:
        pipe.attribution_config = config
    return pipe
