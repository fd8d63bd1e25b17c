"""DAS, the Diffusion Attribution Score (Lin et al., ICLR 2025), with λ from the library's non-oracle rule:

    s_i(q) = φ(q) (ΦᵀΦ + λI)⁻¹ φ_iᵀ · r_i,      λ = damping_ratio · tr(ΦᵀΦ) / min(N, k)   (scoring.KernelScorer)
    φ_i = (1/(K·D)) Σ_{t,d} ψ_{i,t,d} / ‖ψ_{i,t,d}‖,  ψ = P ∇θ mean(ε_θ(x_t, t, c_i))    (queries alike)
    r_i = mean_t sqrt(ℓ_{i,t}) / ‖(sqrt(ℓ_{i,t}))_t‖₂,   ℓ_{i,t} = the training loss of z_i at (t, ε_t)

Declared parts: the training output is the mean output, reduced "unit-pairs"; the loss ℓ is a recorded output
of the same forward passes; the residuals r are the state collected per batch; the scorer is the kernel scorer
with the residuals as row weights.

The public code (Jinxu-Lin/DAS) normalizes the full gradient at each timestep before projecting and measures
ℓ at 1000 timesteps; here ψ is normalized after the projection (‖P g‖ = ‖g‖ (1 ± O(1/sqrt(k))), as for ReTrac)
and ℓ at the featurization's own (t, ε) pairs. Its scoring script picks λ on the evaluation ground truth; here
λ follows the rule above, whose ratio is chosen on validation queries only.
"""

from __future__ import annotations

from .base import Method, register_method


@register_method
class DAS(Method):
    name = "das"
    title = "DAS, the Diffusion Attribution Score (Lin et al., ICLR 2025)"
    default_output = "mean"
    records = ("loss",)
    reduction = "unit-pairs"
    # damping_ratio: the grid ratio with the best mean validation LDS on the digits benchmark (docs/benchmarks.md)
    defaults = {"num_timesteps": 10, "damping_ratio": 0.00056}
    lora_defaults = {"damping_ratio": 32.0}  # the LoRA benchmark's rule (docs/benchmarks.md): 0.00056 scores ≈ 0 there
    calibrated = True
    kernel = True
    row_weights = "residuals"
    per_step_queries = True

    def collector(self, featurizer):
        return ResidualCollector()

    def combine(self, parts: list[dict]) -> dict:
        import torch

        return {"residuals": torch.cat([part["residuals"] for part in parts])}


def das_residuals(losses):
    """r [B] from per-pair training losses ℓ [B, P]: mean_p sqrt(ℓ_p) / ‖sqrt(ℓ)‖₂ (the DAS code's normalization)."""
    roots = losses.double().clamp_min(0).sqrt()
    return (roots / roots.norm(dim=1, keepdim=True).clamp_min(1e-8)).mean(1)


class ResidualCollector:
    """DAS's state of a range of rows: r_i of each example, from the losses recorded with its gradients."""

    def __init__(self):
        self.residuals = []

    def on_records(self, records: dict) -> None:
        self.residuals.append(das_residuals(records["loss"]))

    def state(self) -> dict:
        import torch

        return {"residuals": torch.cat(self.residuals) if self.residuals else torch.empty(0, dtype=torch.float64)}
