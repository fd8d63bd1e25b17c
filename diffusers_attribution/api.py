"""`featurize` and `attribute`: the two calls everything else makes (the mixin, ensembles, Journey-TRAK, the CLI).

    store = featurize(pipe, train_dataset, AttributionConfig(method="d-trak"))     # Φ [N, k] + metadata
    result = attribute(pipe, images, store)                                        # scores [n, N]

Each `AttributionConfig.method` brings its featurizer and scorer (methods/); `attribute` builds the featurizer
once, uses the store's fitted projection for the queries, and checks the store matches the pipeline.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from .config import AttributionConfig
from .data import to_image_batch
from .methods.base import get_method
from .result import AttributionResult
from .store.format import FeatureStore


def make_featurizer(pipe, config: AttributionConfig, store: FeatureStore | None = None, **options):
    """The featurizer of `config.method` for `pipe` (`options`: `checkpoints=` for TracIn/ReTrac, `encoder=` /
    `processor=` for embedding-cosine); `store`: the store queries will be scored against (its fitted projection)."""
    return get_method(config.method).featurizer(pipe, config, store=store, **options)


def make_scorer(store: FeatureStore, damping: float | None = None, damping_ratio: float | None = None):
    """The scorer of the store's method; `damping` / `damping_ratio` override the store's (they never change features)."""
    return get_method(store.config.method).scorer(store, damping, damping_ratio)


def featurize(pipe, train_dataset: Any, config: AttributionConfig | None = None, *, progress: bool = True,
              output_dir: str | os.PathLike | None = None, accelerator: Any = None, **store_kwargs) -> FeatureStore:
    """Training features of `train_dataset` under `config` (default `AttributionConfig()`), with their metadata.

    `output_dir`: write safetensors shards there as they finish (a killed run resumes where it stopped); under
    `accelerate launch` or with an `accelerator`, every process takes its share of the shards. `store_kwargs`:
    `shard_rows`, `max_shard_size`, `compute_kernel`, `dataset_name` (docs/stores.md).
    """
    config = config or AttributionConfig()
    return make_featurizer(pipe, config).featurize_dataset(train_dataset, progress=progress, output_dir=output_dir,
                                        accelerator=accelerator, **store_kwargs)


def featurize_and_store(pipe, train_data: Any, config: AttributionConfig | None, *, given_config: bool = True,
                        check_compatibility: bool = True, progress: bool = True):
    """(featurizer for queries, store): `train_data` is a `FeatureStore`, a store's folder or Hub repo id, or a
    training set featurized here with `config`. A store's own config is used; a `config` that differs from it
    in anything that changes features is a `StoreMismatchError` (`given_config=False`: `config` is only the
    default for a training set), as is a pipeline, LoRA or projection other than the store's."""
    if isinstance(train_data, (str, os.PathLike)):
        train_data = FeatureStore.from_pretrained(train_data)
    if not isinstance(train_data, FeatureStore):
        config = config or AttributionConfig()
        featurizer = make_featurizer(pipe, config)
        return featurizer, featurizer.featurize_dataset(train_data, progress=progress)
    store = train_data
    if config is not None and given_config and check_compatibility:
        store.check_compatible(config, {})
    featurizer = make_featurizer(pipe, store.config, store=store)
    if check_compatibility:
        store.check_compatible(store.config, featurizer.metadata())
    return featurizer, store


def attribute(pipe, images: Any, train_data: Any, config: AttributionConfig | None = None, *,
              prompts: Sequence[str] | str | None = None, progress: bool = True,
              check_compatibility: bool = True) -> AttributionResult:
    """Score `images` against a store (or its folder / Hub repo id) or a training set (featurized first).

    With a store, the store's config is used except for the score-only fields (`config.damping`,
    `config.damping_ratio`); anything else that differs is a `StoreMismatchError` unless
    `check_compatibility=False`.
    """
    featurizer, store = featurize_and_store(pipe, train_data, config, check_compatibility=check_compatibility,
                                            progress=progress)
    score_fields = {}  # the query config's score-role fields override the store's: they never change features
    if config is not None and isinstance(train_data, (FeatureStore, str, os.PathLike)):
        score_fields = {name: getattr(config, name) for name in config.fields_with_role("score")}
    query_features = featurizer.featurize_queries(images, prompts)
    scorer = make_scorer(store, **score_fields)
    return AttributionResult(scores=scorer.scores(query_features), config=store.config,
                             query_images=to_image_batch(images), metadata=scorer.metadata)
