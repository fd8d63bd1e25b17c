"""Influence with the projected pair-level Fisher (curvature.py): τ(q) = φ(q) (F + λI)⁻¹ Φᵀ,

    F = Σ_i (1/(K·D)) Σ_{t,d} ψ_{i,t,d} ψ_{i,t,d}ᵀ,   ψ = P ∇θ ℓ(z_i, t, ε_{t,d}),   λ = damping_ratio · tr(F) / k

Declared parts: training rows reduced "pairs" (each pair's ψ projected, then averaged), the state F summed from
every ψ while featurizing (saved with the store, method_state.safetensors), queries the averaged gradient
("mean"), and the kernel scorer with F as its curvature. TRAK's kernel ΦᵀΦ is the special case of one pair per
example.
"""

from __future__ import annotations

from .base import Method, register_method


@register_method
class ProjectedFisher(Method):
    name = "fisher"
    aliases = ("projected-fisher",)
    title = "Influence with the projected pair-level Fisher (after Mlodozeniec et al., ICLR 2025)"
    default_output = "loss"
    reduction = "pairs"
    query_reduction = "mean"
    # damping_ratio: the grid ratio with the best mean validation LDS on the digits benchmark (docs/benchmarks.md)
    defaults = {"num_timesteps": 10, "damping_ratio": 0.1}
    lora_defaults = {"damping_ratio": 1e4}  # the LoRA benchmark's rule (the grid's top; docs/benchmarks.md)
    calibrated = True
    curvature = "pair_fisher"
    per_step_queries = True

    def check_config(self, config) -> None:
        if config.output != "loss":
            raise ValueError("method='fisher' is the curvature of the training loss: its features must be loss "
                             f"gradients (output='loss'), not output={config.output!r}")

    def collector(self, featurizer):
        from ..curvature import FisherAccumulator

        return FisherAccumulator(featurizer.dim, featurizer.task.num_columns)

    def combine(self, parts: list[dict]) -> dict:
        """Σ of the ranges' partial F (and pair counts), in row order."""
        return {"pair_fisher": sum(part["pair_fisher"].double() for part in parts),
                "pairs": sum(part["pairs"] for part in parts)}
