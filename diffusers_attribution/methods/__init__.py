"""Attribution methods, one file each; every file registers its `Method`s (base.py) when the registry first
looks (docs/methods.md):

    base.py        Method (name, defaults, fields it reads, featurizer, scorer) and the registry: get_method
    trak.py        TRAK, D-TRAK: kernel scores over time-averaged projected gradients
    journey.py     Journey-TRAK per-step attribution               attribute_trajectory → JourneyResult
    tracin.py      Diffusion-TracIn and Diffusion-ReTrac            tracin_scores, retrac_scores
    similarity.py  pixel dot / cosine, image-embedding cosine       similarity_scores
    ensemble.py    scores averaged over models or checkpoints       ensemble_attribute, featurize_ensemble

Names below are imported on first use (nothing is imported with the package).
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_PUBLIC = {
    "CheckpointSet": "..checkpoints", "load_checkpoint": "..checkpoints",
    "ensemble_attribute": ".ensemble", "featurize_ensemble": ".ensemble",
    "JourneyResult": ".journey", "attribute_trajectory": ".journey",
    "get_method": ".base", "method_names": ".base", "register_method": ".base", "Method": ".base",
    "similarity_scores": ".similarity",
    "TracInFeaturizer": ".tracin", "TracInScorer": ".tracin", "retrac_scores": ".tracin", "tracin_scores": ".tracin",
}

__all__ = sorted(_PUBLIC)


__getattr__ = lazy_getattr(__name__, _PUBLIC)
