"""Influence with the projected pair-level Fisher (curvature.py): τ(q) = φ(q) (F + λI)⁻¹ Φᵀ,

    F = Σ_i (1/(K·D)) Σ_{t,d} ψ_{i,t,d} ψ_{i,t,d}ᵀ,   ψ = P ∇θ ℓ(z_i, t, ε_{t,d}),   λ = damping_ratio · tr(F) / k

F is accumulated from the per-(example, timestep, noise) projected loss gradients while featurizing and saved
with the store (method_state.safetensors); TRAK's kernel ΦᵀΦ is the special case of one pair per example.
"""

from __future__ import annotations

from typing import Any

import torch

from ..curvature import FisherAccumulator, pair_features
from ..method_state import ShardStateFeaturizer
from ..scoring import StreamingScorer, damped_inverse, resolve_damping
from .base import Method, register_method


@register_method
class ProjectedFisher(Method):
    name = "fisher"
    aliases = ("projected-fisher",)
    title = "Influence with the projected pair-level Fisher (after Mlodozeniec et al., ICLR 2025)"
    default_output = "loss"
    # damping_ratio: the grid ratio with the best mean validation LDS on the digits benchmark (docs/benchmarks.md)
    defaults = {"num_timesteps": 10, "damping_ratio": 0.1}
    calibrated = True

    def check_config(self, config) -> None:
        if config.output != "loss":
            raise ValueError("method='fisher' is the curvature of the training loss: its features must be loss "
                             f"gradients (output='loss'), not output={config.output!r}")

    def featurizer(self, pipe, config, store=None, **options):
        return self.projected_featurizer(FisherFeaturizer, pipe, config, store, options)

    def scorer(self, store, damping=None, damping_ratio=None):
        return FisherScorer(store, damping, damping_ratio)


class FisherFeaturizer(ShardStateFeaturizer):
    """`Featurizer` whose training pass also sums ψ ψᵀ over every (example, t, d) pair (`store.method_state`)."""

    accumulator: FisherAccumulator | None = None

    def features(self, images, captions, keys) -> torch.Tensor:
        if self.accumulator is None:  # queries: the core task's time-averaged features
            return super().features(images, captions, keys)
        inputs = self.adapter.encode(images, list(captions), list(keys), self.config.noise_seed)
        return pair_features(self, inputs, list(keys), self.accumulator)

    def start_collecting(self) -> None:
        self.accumulator = FisherAccumulator(self.projector.dim, self.task.num_columns)

    def stop_collecting(self) -> dict[str, torch.Tensor]:
        accumulator, self.accumulator = self.accumulator, None
        return accumulator.state_dict()

    def combine(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Σ of the shards' partial F (and pair counts), in shard order."""
        return {"pair_fisher": sum(part["pair_fisher"].double() for part in parts), "pairs": sum(part["pairs"] for part in parts)}


class FisherScorer(StreamingScorer):
    """`StreamingScorer`'s primal form with F in place of ΦᵀΦ: τ = φ(q) (F + λI)⁻¹ Φᵀ, λ = ratio · tr(F) / k."""

    def __init__(self, store, damping: float | None = None, damping_ratio: float | None = None,
                 block_rows: int | None = None):
        self.store, self.block_rows, self.dual = store, block_rows, False
        fisher = (store.method_state or {}).get("pair_fisher")
        if fisher is None:
            raise ValueError("the store holds no projected Fisher (method_state['pair_fisher']): featurize it with "
                             "method='fisher'")
        fisher = fisher.double()
        if fisher.shape != (store.dim, store.dim):
            raise ValueError(f"the store's Fisher is {tuple(fisher.shape)}, expected {store.dim} × {store.dim}")
        ratio = store.config.damping_ratio if damping_ratio is None else damping_ratio
        self.damping = resolve_damping(damping, ratio, fisher.diagonal().sum(), store.dim, store.dim)  # λ = ratio·tr F/k
        self.inverse = damped_inverse(fisher, self.damping)
        # F is not the Gram matrix of Φ: StreamingScorer's check tr K = ‖Φ‖²_F does not apply
        self._trace, self._norms = float(fisher.trace()), 0.0

    @property
    def metadata(self) -> dict[str, Any]:
        return {"damping": self.damping}
