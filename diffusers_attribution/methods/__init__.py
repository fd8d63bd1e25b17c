"""Attribution methods, one file each; every file registers its `Method`s (base.py) when the registry first
looks (docs/methods.md):

    registry.py    the registry: register_method, get_method, method_names (imports nothing heavy)
    base.py        Method: its declared parts
    trak.py        TRAK, D-TRAK: kernel scores over time-averaged projected gradients
    das.py         DAS: per-pair normalized gradients, residual-weighted kernel scores
    fisher.py      influence with the projected pair-level Fisher
    ekfac.py       EK-FAC influence (MC and empirical Fisher)
    journey.py     Journey-TRAK's training features (per-step queries: trajectory.py)
    tracin.py      Diffusion-TracIn and Diffusion-ReTrac            (api.tracin_scores, api.retrac_scores)
    similarity.py  pixel dot / cosine, image-embedding cosine       (api.similarity_scores)

Method modules are declarations: they import nothing heavy at module level. Ensembles: ensemble.py. Names below
are imported on first use (nothing is imported with the package).
"""

from __future__ import annotations

from ..lazy import lazy_getattr

_PUBLIC = {
    "CheckpointSet": "..checkpoints", "load_checkpoint": "..checkpoints",
    "ensemble_attribute": "..ensemble", "featurize_ensemble": "..ensemble",
    "JourneyResult": "..trajectory", "attribute_trajectory": "..trajectory",
    "get_method": ".registry", "method_names": ".registry", "register_method": ".registry", "Method": ".base",
    "similarity_scores": "..api",
    "CheckpointFeaturizer": "..checkpoint_features", "retrac_scores": "..api", "tracin_scores": "..api",
}

__all__ = sorted(_PUBLIC)


__getattr__ = lazy_getattr(__name__, _PUBLIC)
