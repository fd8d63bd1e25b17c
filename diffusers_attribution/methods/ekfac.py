"""EK-FAC influence (Mlodozeniec et al., "Influence Functions for Scalable Data Attribution in Diffusion Models",
ICLR 2025), with stored training features and query-side preconditioning (curvature.py for the math):

    τ(z, q) = Σ_coordinates H(q) H(z) / (Λ + λ)  ≈  φ̃(q) · φ(z),   φ(z) = H(z) M,  φ̃(q) = (H(q) ⊘ (Λ + λ)) M

with H the gradient in the per-layer EK-FAC eigenbases (Q_S, Q_A of the K-FAC-expand factors), Λ the corrected
eigenvalues measured over (example, timestep, noise) pairs, M the calibrated projector's seeded mix (a signed
partition), and λ = damping_ratio · mean(Λ) (or `config.damping`), never chosen on queries. `ekfac` uses the MC
Fisher (GGN, the paper's default), `ekfac-empirical` the empirical Fisher.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors.torch import save_file

from ..curvature import PreconditionedProjector
from ..featurize import Featurizer
from ..method_state import PARTS
from ..store.files import atomic_write, open_shard
from .base import Method, refuse_options, register_method
from .similarity import DotScorer

CURVATURE_PART = "ekfac-curvature.safetensors"  # Λ, in method_state_parts/ of a store featurized in a directory


class _EKFACMethod(Method):
    """damping_ratio: the grid ratio with the best mean validation LDS on the digits benchmark (docs/benchmarks.md)."""

    default_output = "loss"
    defaults = {"num_timesteps": 10, "damping_ratio": 0.1}
    calibrated = True
    fisher = "mc"

    def check_config(self, config) -> None:
        if config.projector != "factored" or not config.calibration_examples:
            raise ValueError(f"method={config.method!r} measures its curvature like the calibrated factored "
                             f"projection: it needs projector='factored' and calibration_examples > 0 (got "
                             f"{config.projector!r}, {config.calibration_examples})")

    def featurizer(self, pipe, config, store=None, **options):
        refuse_options(config, options)
        if store is None:
            return EKFACFeaturizer(pipe, config, fisher=self.fisher)
        return EKFACFeaturizer(pipe, config, store.projection_state, store.method_state, fisher=self.fisher,
                               projection_spec=store.metadata.get("projection"))

    def scorer(self, store, damping=None, damping_ratio=None):
        """τ = Φ̃_q Φᵀ: the queries carry 1/(Λ + λ) with the store config's λ (`EKFACFeaturizer.featurize_queries`),
        so another λ here would be silently ignored: it is an error instead."""
        from ..curvature import MEAN_EIGENVALUE

        state = store.method_state or {}
        if MEAN_EIGENVALUE not in state:
            raise ValueError(f"the store of method {store.config.method!r} holds no EK-FAC curvature (method_state)")
        mean = float(state[MEAN_EIGENVALUE][0])
        config = store.config

        def resolve(value, ratio):
            return float(value) if value is not None else float(ratio) * mean

        stored = resolve(config.damping, config.damping_ratio)
        asked = resolve(damping if damping is not None else (config.damping if damping_ratio is None else None),
                        config.damping_ratio if damping_ratio is None else damping_ratio)
        if abs(asked - stored) > 1e-9 * max(abs(stored), 1e-30):
            raise ValueError(f"EK-FAC preconditions the queries with λ = {stored:.4g} (the store's config); for "
                             f"λ = {asked:.4g} featurize them with featurize_queries(images, damping={asked:.4g}) "
                             "and score with this scorer")
        return DotScorer(store.features)


@register_method
class EKFAC(_EKFACMethod):
    name = "ekfac"
    aliases = ("ek-fac",)
    title = "EK-FAC influence, MC Fisher (Mlodozeniec et al., ICLR 2025)"


@register_method
class EKFACEmpirical(_EKFACMethod):
    name = "ekfac-empirical"
    title = "EK-FAC influence, empirical Fisher (after Mlodozeniec et al., ICLR 2025)"
    defaults = {"num_timesteps": 10, "damping_ratio": 0.32}
    fisher = "empirical"


class EKFACFeaturizer(Featurizer):
    """Training features in EK-FAC eigenbases (mixed to k), queries preconditioned by 1 / (Λ + λ) first.

    `fisher`: "mc" (one Monte-Carlo sample of the likelihood, the GGN; the paper's default) or "empirical". The
    bases travel like any calibrated projection (projection.safetensors); Λ goes into the store's method_state
    (in a directory: written beside the shards when the curvature is fitted, so a resumed run keeps it)."""

    _curvature_file: Path | None = None

    def __init__(self, pipe, config, projection_state: dict[str, torch.Tensor] | None = None,
                 method_state: dict[str, torch.Tensor] | None = None, fisher: str = "mc",
                 projection_spec: dict | None = None):
        super().__init__(pipe, config)
        self.projector = PreconditionedProjector(
            self.adapter.denoiser, self.parameters, config.projection_dim, config.projection_seed,
            sketch_dim=config.sketch_dim, examples=config.calibration_examples, fisher=fisher,
            damping_ratio=config.damping_ratio)
        if projection_state is not None:
            self.projector.load_state_dict(projection_state, projection_spec)
        if method_state is not None:
            self.projector.load_curvature(method_state)

    def fit_projection(self, data, progress: bool = False) -> None:
        super().fit_projection(data, progress)
        if self._curvature_file is not None:  # a directory run: saved before any shard, beside them
            self._curvature_file.parent.mkdir(parents=True, exist_ok=True)
            tensors = self.projector.curvature_state()
            atomic_write(self._curvature_file, lambda path: save_file(tensors, path))

    def featurize_dataset(self, dataset: Any, progress: bool = True, **options):
        data = self.training_data(dataset)
        if options.get("output_dir") is None:
            store = super().featurize_dataset(data, progress, **options)
            store.method_state = self.projector.curvature_state()
            return store
        self._curvature_file = Path(options["output_dir"]) / PARTS / CURVATURE_PART
        try:
            store = super().featurize_dataset(data, progress, **options)
        finally:
            self._curvature_file = None
        self.projector.load_curvature(store.method_state)  # this process may have loaded the bases only
        return store

    def method_state_from_parts(self, directory: Path, plan: list[dict]) -> dict[str, torch.Tensor]:
        """Λ as saved when the curvature was fitted (called by the main process when it finalizes the store)."""
        with open_shard(Path(directory) / PARTS / CURVATURE_PART) as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}

    def damping(self, damping: float | None = None, damping_ratio: float | None = None) -> float:
        """λ: `damping`, else `config.damping`, else ratio · mean(Λ) (ratio: the argument or `config.damping_ratio`)."""
        if damping is None:
            damping = self.config.damping
        if damping is not None:
            return float(damping)
        ratio = self.config.damping_ratio if damping_ratio is None else damping_ratio
        return float(ratio * self.projector.mean_eigenvalue)

    def featurize_queries(self, images: Any, prompts: Sequence[str] | str | None = None, *,
                          damping: float | None = None, damping_ratio: float | None = None) -> torch.Tensor:
        """φ̃(q) = (H(q) ⊘ (Λ + λ)) M [n, k]: preconditioned before the mix, so scores are plain dot products."""
        return self.projector.precondition(self.query_sketch(images, prompts), self.damping(damping, damping_ratio))

    def query_sketch(self, images: Any, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        """H(q) [n, k_mid]: the queries' rotated coordinates before preconditioning and mix (any λ from one pass)."""
        train = self.projector
        self.projector = train.sketch
        try:
            return super().featurize_queries(images, prompts)
        finally:
            self.projector = train
