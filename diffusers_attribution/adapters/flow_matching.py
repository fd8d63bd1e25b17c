"""Flow matching (rectified flow) families: the noising, target and timestep conventions SD3 and Flux share."""

from __future__ import annotations

import torch

from .base import PipelineAdapter, UnsupportedPipelineError


class FlowMatchingAdapter(PipelineAdapter):
    """Rectified flow: x_σ = (1 - σ) x0 + σ ε, training target v = ε - x0, prediction v_θ(x_σ, σ, c).

    Timestep index t ∈ {0, …, T-1} (T = `num_train_timesteps`) maps to the scheduler's training sigmas:

        s = (t + 1) / T,   σ_t = shift · s / (1 + (shift - 1) · s)

    i.e. σ_t = `FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).sigmas[T - 1 - t]`, the
    table diffusers' SD3/Flux training scripts sample from: t = 0 is the least noisy (σ = shift-adjusted 1/T),
    t = T-1 is pure noise (σ = 1). With `use_dynamic_shifting` (Flux-dev) that table is unshifted (shift = 1);
    the resolution-dependent shift μ is a sampling-time choice and is not applied.

    Per-sample outputs (objectives.py) on v_θ: `loss` = mean (v_θ - (ε - x0))², `squared-norm` = mean v_θ²;
    `weighted-mse` is refused (its weight β_t / (2 α_t (1 - ᾱ_t)) is defined for DDPM schedules only).
    """

    prediction_type = "flow"

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = self.find_denoiser(pipe)
        self.noise_scheduler = None  # no DDPM schedule: the noising below is the whole definition
        config = pipe.scheduler.config
        if "shift" in config:  # FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler, ...
            shift = config["shift"]
        elif config.get("use_flow_sigmas", False):  # DPM-Solver / UniPC run in flow mode
            shift = config.get("flow_shift", 1.0)
        else:
            raise UnsupportedPipelineError(
                f"{type(pipe).__name__} is a flow-matching model but its scheduler "
                f"{type(pipe.scheduler).__name__} has no flow shift (`shift` or `use_flow_sigmas`); "
                "use the FlowMatchEulerDiscreteScheduler it was released with"
            )
        self.shift = 1.0 if config.get("use_dynamic_shifting", False) else float(shift)
        self._num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        s = torch.arange(1, self._num_train_timesteps + 1, dtype=torch.float64) / self._num_train_timesteps
        self.sigmas = self.shift * s / (1 + (self.shift - 1) * s)  # [T], ascending in t

    @property
    def num_train_timesteps(self) -> int:
        return self._num_train_timesteps

    def sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """σ_t [R] in the dtype and on the device of `like`."""
        return self.sigmas[t.cpu()].to(like.device, like.dtype)

    def _broadcast(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return sigma.view(-1, *([1] * (x.ndim - 1)))

    def add_noise(self, x0, noise, t):
        sigma = self._broadcast(self.sigma(t, x0), x0)
        return (1 - sigma) * x0 + sigma * noise

    def target(self, x0, noise, t):
        return noise - x0

    def timestep_weight(self, t):
        """Unused: `configure` refuses `weighted-mse`, the only output that reads it."""
        return torch.ones(len(t), dtype=torch.float32)

    def configure(self, config) -> None:
        super().configure(config)
        if config.output == "weighted-mse":
            raise ValueError(
                f"output='weighted-mse' is not defined for flow-matching pipelines ({type(self.pipe).__name__}): "
                "its weight β_t / (2 α_t (1 - ᾱ_t)) belongs to DDPM schedules. Use 'loss' (TRAK) or "
                "'squared-norm' (D-TRAK) — see docs/families.md"
            )

    def flexible_image_check(self, images: torch.Tensor, what: str, multiple: int) -> None:
        """Any H × W divisible by `multiple` (these transformers are resolution-agnostic), the VAE's channels."""
        from ..data import InvalidImageError

        channels = int(self.pipe.vae.config.in_channels)
        if images.ndim != 4 or images.shape[1] != channels or images.shape[2] % multiple or images.shape[3] % multiple:
            raise InvalidImageError(
                f"{what} have shape {tuple(images.shape[1:])} (C, H, W) but {type(self.pipe).__name__} expects "
                f"{channels} channels and a height and width divisible by {multiple}"
            )
        if not torch.isfinite(images).all():
            raise InvalidImageError(f"{what} contain NaN or infinite values")
