"""Attribution methods beyond the TRAK kernel, one module per method (docs/methods.md):

    tracin.py      Diffusion-TracIn and Diffusion-ReTrac         tracin_scores, retrac_scores
    journey.py     Journey-TRAK per-step attribution             attribute_trajectory → JourneyResult
    ensemble.py    scores averaged over models or checkpoints    ensemble_attribute, featurize_ensemble
    similarity.py  pixel dot / cosine, image-embedding cosine    similarity_scores
    registry.py    featurizer and scorer of each config.method  make_featurizer, make_scorer
    timesteps.py   per-(timestep, noise) features, shared       timestep_features
    checkpoints.py denoiser checkpoints loaded in place         load_checkpoint
"""

from .checkpoints import CheckpointSet, load_checkpoint
from .ensemble import ensemble_attribute, featurize_ensemble
from .journey import JourneyResult, attribute_trajectory
from .registry import make_featurizer, make_scorer
from .similarity import similarity_scores
from .tracin import TracInFeaturizer, TracInScorer, retrac_scores, tracin_scores

__all__ = [
    "CheckpointSet",
    "JourneyResult",
    "TracInFeaturizer",
    "TracInScorer",
    "attribute_trajectory",
    "ensemble_attribute",
    "featurize_ensemble",
    "load_checkpoint",
    "make_featurizer",
    "make_scorer",
    "retrac_scores",
    "similarity_scores",
    "tracin_scores",
]
