"""Diffusion-TracIn and Diffusion-ReTrac (Xie et al., "Timestep-induced Bias in Influence Estimation", TMLR 2024).

Over checkpoints c = 1..C with learning rates η_c (the paper's code uses η_c = lr · batch size · epochs
between checkpoints / N; pass that product):

    TracIn:  τ(z, q) = Σ_c η_c ⟨g_c(z), g_c(q)⟩
             g_c(z) = (1/(K·D)) Σ_{t ~ U[0, T)} Σ_{d < D} ∇θ f(z, t, ε_d)   (K = num_timesteps, 1 by default;
                                                                          D = noise_draws, 1 by default)
             g_c(q) = (1/(Kq·D)) Σ_{t ∈ grid of Kq} Σ_{d < D} ∇θ f(q, t, ε_d) (Kq = query_timesteps, D = query_noise_draws)
    ReTrac:  the same with every per-(t, d) gradient divided by its L2 norm before averaging:
             ĝ_c = (1/(K·D)) Σ g_{c,t,d} / ‖g_{c,t,d}‖, training and query alike.

Gradients are projected (φ = P g) with the configured projector, and ReTrac normalizes in the projected space:
‖P g‖ = ‖g‖ (1 ± O(1/sqrt(k))) (JL), so P g / ‖P g‖ equals P (g / ‖g‖) up to that factor, while normalizing
before the projection would mean forming every (query, timestep, noise) gradient, which the factored
projector never does. With `projector="identity"` the two are the same, exactly.

Declared parts: the featurizer is checkpoint_features.CheckpointFeaturizer (a store holds [φ_1(z), ..., φ_C(z)],
one block of k columns per checkpoint); the scorer is the dot product with η_c on each query block.
"""

from __future__ import annotations

from typing import Sequence

from .base import Method, register_method

TRACIN_METHODS = ("tracin", "retrac")


class _TracInMethod(Method):
    """TracIn's defaults (METHODS.md): each training gradient at one random timestep; the query gradient over
    100 evenly spaced timesteps × 16 noises."""

    default_output = "loss"
    reduction = "pairs"
    defaults = {"num_timesteps": 1, "timestep_schedule": "random", "query_timesteps": 100, "query_noise_draws": 16}
    reads = ("checkpoints", "learning_rates", "query_timesteps", "query_noise_draws", "noise_draws")

    def featurizer(self, pipe, config, fitted=None, checkpoints: Sequence | None = None):
        from ..checkpoint_features import CheckpointFeaturizer

        return CheckpointFeaturizer(pipe, config, self, checkpoints=checkpoints)

    def scorer(self, store, damping=None, damping_ratio=None):
        """τ = Σ_c η_c Q_c Φ_cᵀ over the per-checkpoint column blocks (C = k_store / the recorded block width)."""
        import torch

        from ..scoring import DotScorer

        block = int(store.metadata.get("checkpoint_block_dim") or store.dim)
        if block < 1 or store.dim % block:
            raise ValueError(f"{store.dim} feature columns do not split into blocks of {block}")
        count = store.dim // block
        rates = store.config.learning_rates
        rates = [1.0] * count if rates is None else [float(x) for x in rates]
        if len(rates) != count:
            raise ValueError(f"{len(rates)} learning rates for {count} checkpoints")
        weights = torch.tensor(rates, dtype=torch.float64).repeat_interleave(block)
        return DotScorer(store, column_weights=weights, metadata={"learning_rates": rates})


@register_method
class TracIn(_TracInMethod):
    name = "tracin"
    title = "Diffusion-TracIn (Xie et al., 2024)"


@register_method
class ReTrac(_TracInMethod):
    name = "retrac"
    title = "Diffusion-ReTrac (Xie et al., 2024)"
    reduction = "unit-pairs"


def __getattr__(name: str):
    if name == "TracInFeaturizer":  # the name before the featurizer left the method's module (0.2)
        from ..checkpoint_features import CheckpointFeaturizer

        return CheckpointFeaturizer
    raise AttributeError(name)
