"""Which featurizer and scorer each `AttributionConfig.method` uses; the mixin dispatches through here.

A featurizer has `featurize_dataset(dataset, progress) -> FeatureStore`, `featurize_queries(images, prompts)
-> Tensor [n, d]` and `metadata()`; a scorer has `scores(query_features) -> Tensor [n, N]` and `metadata`.

    trak, d-trak, journey-trak   Featurizer          TrakScorer     φ(q)(ΦᵀΦ + λI)⁻¹Φᵀ (scoring.StreamingScorer)
    tracin, retrac               TracInFeaturizer    TracInScorer   Σ_c η_c ⟨φ_c(z), φ_c(q)⟩
    pixel-dot                    PixelFeaturizer     DotScorer      ⟨x(z), x(q)⟩
    pixel-cosine                 PixelFeaturizer     CosineScorer   cos(x(z), x(q))
    embedding-cosine             EmbeddingFeaturizer CosineScorer   cos(E(z), E(q))
"""

from __future__ import annotations

from typing import Any

from ..config import AttributionConfig
from ..featurize import Featurizer
from ..scoring import StreamingScorer
from ..store import FeatureStore

KERNEL_METHODS = ("trak", "d-trak", "journey-trak")


class TrakScorer(StreamingScorer):
    """`StreamingScorer` with the `metadata` every scorer reports (its damping λ)."""

    @property
    def metadata(self) -> dict[str, Any]:
        return {"damping": self.damping}


def make_featurizer(pipe, config: AttributionConfig, store: FeatureStore | None = None, **kwargs):
    """The featurizer of `config.method` for `pipe`; `kwargs` go to it (`checkpoints=` for TracIn/ReTrac,
    `encoder=`/`processor=` for embedding-cosine). `store`: the store queries will be scored against, whose
    calibrated projection (if any) the query features must use."""
    method = config.method
    if method in KERNEL_METHODS:
        if kwargs:
            raise TypeError(f"method {method!r} takes no featurizer options, got {sorted(kwargs)}")
        return Featurizer(pipe, config, projection_state=store.projection_state if store is not None else None)
    if method in ("tracin", "retrac"):
        from .tracin import TracInFeaturizer

        return TracInFeaturizer(pipe, config, **kwargs)
    from .similarity import SIMILARITY_METHODS, make_similarity_featurizer

    if method in SIMILARITY_METHODS:
        return make_similarity_featurizer(pipe, config, **kwargs)
    raise ValueError(f"no featurizer for method {method!r}")


def make_scorer(store: FeatureStore, damping: float | None = None, damping_ratio: float | None = None):
    """The scorer of the store's method, built from the store's features and config.

    `damping` / `damping_ratio` (kernel methods) override the store's: λ changes scores, never features.
    """
    config = store.config
    if config.method in KERNEL_METHODS:
        ratio = config.damping_ratio if damping_ratio is None else damping_ratio
        return TrakScorer(store, config.damping if damping is None else damping, ratio)
    if config.method in ("tracin", "retrac"):
        from .tracin import TracInScorer

        return TracInScorer.from_store(store)
    from .similarity import SIMILARITY_METHODS, make_similarity_scorer

    if config.method in SIMILARITY_METHODS:
        return make_similarity_scorer(store)
    raise ValueError(f"no scorer for method {config.method!r}")


def finish_store(store: FeatureStore, output_dir=None, accelerator=None, **store_kwargs) -> FeatureStore:
    """For featurizers that compute in memory (TracIn, similarity): write the store to `output_dir` if given."""
    if accelerator is not None:
        raise NotImplementedError(f"method {store.config.method!r} featurizes in one process; drop accelerator=")
    if output_dir is not None:
        kernel = store.config.method in KERNEL_METHODS
        save_options = {k: v for k, v in store_kwargs.items() if k in ("shard_rows", "max_shard_size")}
        store.save_pretrained(output_dir, kernel=store_kwargs.get("compute_kernel", True) and kernel, **save_options)
    return store
