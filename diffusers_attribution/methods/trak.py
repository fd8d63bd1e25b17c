"""TRAK and D-TRAK (Park et al., ICML 2023; Zheng et al., "Intriguing Properties of Data Attribution on
Diffusion Models", ICLR 2024): kernel scores over time-averaged projected gradients.

    φ(z) = P g(z),  g(z) = (1/(K·D)) Σ_t Σ_d ∇θ f(z, t, ε_{t,d})       (reduction "mean": featurize.Featurizer)
    τ(q) = φ(q) (ΦᵀΦ + λI)⁻¹ Φᵀ                                        (scoring.KernelScorer)

f is the training loss for TRAK and the squared norm of the denoiser output for D-TRAK. The default
damping ratios and D-TRAK's K = 30 were chosen on the digits benchmark's validation queries, never on
evaluation queries (docs/benchmarks.md, "Choosing the defaults").
"""

from __future__ import annotations

from .base import Method, register_method


class KernelMethod(Method):
    """A method scored through the kernel of its stored features, with the declared parts' defaults."""

    calibrated = True
    kernel = True
    per_step_queries = True


@register_method
class TRAK(KernelMethod):
    name = "trak"
    title = "TRAK (Park et al., 2023)"
    default_output = "loss"
    defaults = {"damping_ratio": 0.18}
    lora_defaults = {"damping_ratio": 1e4}  # the LoRA benchmark's rule (the grid's top; docs/benchmarks.md)


@register_method
class DTRAK(KernelMethod):
    name = "d-trak"
    aliases = ("dtrak",)
    title = "D-TRAK (Zheng et al., ICLR 2024)"
    default_output = "squared-norm"
    defaults = {"damping_ratio": 0.0018, "num_timesteps": 30}
    lora_defaults = {"damping_ratio": 180.0}  # the LoRA benchmark's rule (docs/benchmarks.md)
