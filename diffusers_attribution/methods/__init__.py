"""Attribution methods, one file each; every file registers its `Method`s (base.py) when the registry first
looks (docs/methods.md):

    base.py        Method (its declared parts) and the registry: get_method
    trak.py        TRAK, D-TRAK: kernel scores over time-averaged projected gradients
    das.py         DAS: per-pair normalized gradients, residual-weighted kernel scores
    fisher.py      influence with the projected pair-level Fisher
    ekfac.py       EK-FAC influence (MC and empirical Fisher)
    journey.py     Journey-TRAK's training features (per-step queries: trajectory.py)
    tracin.py      Diffusion-TracIn and Diffusion-ReTrac            tracin_scores, retrac_scores
    similarity.py  pixel dot / cosine, image-embedding cosine       similarity_scores

Method modules are declarations: they import nothing heavy at module level. Ensembles: ensemble.py. Names below
are imported on first use (nothing is imported with the package).
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_PUBLIC = {
    "CheckpointSet": "..checkpoints", "load_checkpoint": "..checkpoints",
    "ensemble_attribute": "..ensemble", "featurize_ensemble": "..ensemble",
    "JourneyResult": "..trajectory", "attribute_trajectory": "..trajectory",
    "get_method": ".base", "method_names": ".base", "register_method": ".base", "Method": ".base",
    "similarity_scores": ".similarity",
    "CheckpointFeaturizer": "..checkpoint_features", "retrac_scores": ".tracin", "tracin_scores": ".tracin",
}

__all__ = sorted(_PUBLIC)


__getattr__ = lazy_getattr(__name__, _PUBLIC)
