"""`AttributionMixin` gives any supported `DiffusionPipeline` `.featurize(...)` and `.attribute(...)`.

    enable_attribution(pipe)                       # the same object, now also an AttributionMixin
    store = pipe.featurize(train_dataset, config=AttributionConfig(method="d-trak"))
    result = pipe.attribute(images, store)         # or pipe.attribute(images, train_dataset, config=...)
    journey = pipe.attribute_trajectory(seed, store, num_inference_steps=50)   # Journey-TRAK, per sampling step

Delegation only: the work is in api.py (`featurize`, `attribute`), each method's featurizer and scorer in
methods/; a list of stores is an ensemble (ensemble.py).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from . import api
from .adapters import get_adapter
from .config import AttributionConfig
from .result import AttributionResult
from .store.format import FeatureStore


class AttributionMixin:
    """Attribution methods for a pipeline; list it as a base of your own pipeline class, or call
    `enable_attribution(pipe)` on an existing pipeline. Every method delegates to `api.py`."""

    attribution_config: AttributionConfig | None = None

    def _attribution_config(self, config: AttributionConfig | None) -> AttributionConfig:
        return config or self.attribution_config or AttributionConfig()

    def featurize(self, train_dataset: Any, config: AttributionConfig | None = None, *, progress: bool = True,
                  output_dir: str | os.PathLike | None = None, accelerator: Any = None, **store_kwargs) -> FeatureStore:
        """Projected training features Φ [N, k] of `train_dataset` under `config`, with their metadata.

        `output_dir`: write safetensors shards there as they finish (a killed run resumes where it stopped);
        under `accelerate launch` or with an `accelerator`, every process takes its share of the shards.
        `store_kwargs`: `shard_rows`, `max_shard_size`, `compute_kernel`, `dataset_name`, and `num_examples` for
        a stream that does not say its length (a generator; docs/stores.md, "streams").
        """
        return api.featurize(self, train_dataset, self._attribution_config(config), progress=progress,
                             output_dir=output_dir, accelerator=accelerator, **store_kwargs)

    def attribute(
        self,
        images: Any,
        train_data: Any,
        config: AttributionConfig | None = None,
        *,
        prompts: Sequence[str] | str | None = None,
        progress: bool = True,
        check_compatibility: bool = True,
        trust_remote_references: bool = False,
        top_k: int | None = None,
        exact: bool = False,
        **options,
    ) -> AttributionResult:
        """Score `images` against a `FeatureStore`, a store's directory or Hub dataset repo id (`user/name`),
        or a training set (featurized first).

        With a store, the store's own config is used, except for the damping λ (`config.damping`,
        `config.damping_ratio`), which only changes scores; a `config`, model, LoRA or projection that
        differs from the store's in anything that changes features is a `StoreMismatchError` unless
        `check_compatibility=False`. A store read from disk or the Hub that names checkpoints or an encoder needs
        them passed (`checkpoints=`, `encoder=`) or `trust_remote_references=True`. A list of stores (or store
        directories) is an ensemble: the mean of the scores against each (ensemble.py). `top_k`: only the best
        `top_k` per query (`result.top`, `result.topk()`): one streaming pass, no [n, N] matrix.
        """
        if isinstance(train_data, (list, tuple)) and train_data and all(api.is_store(item) for item in train_data):
            from .ensemble import ensemble_attribute

            return ensemble_attribute([(self, store) for store in train_data], images, prompts=prompts, progress=progress)
        if not api.is_store(train_data):
            config = self._attribution_config(config)
        return api.attribute(self, images, train_data, config, prompts=prompts, progress=progress,
                             check_compatibility=check_compatibility, trust_remote_references=trust_remote_references,
                             top_k=top_k, exact=exact, **options)

    def attribution_session(self, train_data: Any, config: AttributionConfig | None = None, **kwargs):
        """An `api.AttributionSession`: the featurizer and scorer of a store (or of a training set, featurized
        first), built once; `session.attribute(images, top_k=...)` per call (the CLI and the explorer use one)."""
        if not api.is_store(train_data):
            config = self._attribution_config(config)
        return api.AttributionSession(self, train_data, config, **kwargs)

    def attribute_trajectory(self, prompt_or_seed: str | int, train_data: Any, config: AttributionConfig | None = None,
                             num_inference_steps: int = 50, **kwargs):
        """Journey-TRAK: sample, and attribute every sampling step's x̂0 → `JourneyResult` (scores [steps, N],
        `.plot()`). See `trajectory.attribute_trajectory` for the arguments."""
        from .trajectory import attribute_trajectory

        return attribute_trajectory(self, prompt_or_seed, train_data, config, num_inference_steps, **kwargs)


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
