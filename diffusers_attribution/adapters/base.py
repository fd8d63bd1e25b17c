"""`PipelineAdapter`: what attribution needs from a pipeline family, found through the pipeline's own components.

A training example z = (x0, c) becomes a per-sample output in four steps, each one method here:
`encode` (images → x0, captions → conditioning), `add_noise` (x0, ε, t → x_t), `target` (ε, x0 or v),
and `predict` (x_t, t, c → the denoiser's output, learned-variance channels removed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler

from ..seeding import seeded_randn


class UnsupportedPipelineError(TypeError):
    """The pipeline lacks a component attribution needs, or no adapter knows its family."""


@dataclass
class ModelInputs:
    """A batch of training examples ready for the denoiser: x0 [B, ...] and batched conditioning tensors."""

    x0: torch.Tensor
    conditioning: dict[str, torch.Tensor] = field(default_factory=dict)

    def repeat_rows(self, repeats: int) -> "ModelInputs":
        """Each example repeated `repeats` times, example-major: rows (0,0..r-1), (1,0..r-1), ..."""
        def rep(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.repeat_interleave(repeats, dim=0)

        return ModelInputs(rep(self.x0), {name: rep(value) for name, value in self.conditioning.items()})


class PipelineAdapter:
    """Base class for one pipeline family. Subclasses implement `supports`, `encode` and `denoiser_kwargs`.

    The default noising is DDPM's x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε with ᾱ from
    `DDPMScheduler.from_config(pipe.scheduler.config)` (never the sampler's own `add_noise`, which is
    variance-exploding for Euler-type schedulers), and the target follows `prediction_type`.
    """

    family: str = "base"
    # `get_adapter` tries the families of this package highest priority first: a family whose pipelines another
    # family's `supports` also accepts needs the higher one (SDXL's UNet is also a UNet2DConditionModel).
    priority: int = 0
    options: tuple[str, ...] = ()  # attributes that `AttributionConfig.adapter_options` may set (docs/families.md)

    def __init__(self, pipe):
        self.pipe = pipe
        self.denoiser = self.find_denoiser(pipe)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.prediction_type = self.noise_scheduler.config.prediction_type

    @classmethod
    def supports(cls, pipe) -> bool:
        raise NotImplementedError

    @staticmethod
    def find_denoiser(pipe) -> torch.nn.Module:
        components = getattr(pipe, "components", {})
        for name in ("unet", "transformer"):
            if components.get(name) is not None:
                return components[name]
        raise UnsupportedPipelineError(
            f"{type(pipe).__name__} has no `unet` or `transformer` component (components: {sorted(components)})"
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def expected_image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the images this pipeline is trained on."""
        raise NotImplementedError

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: the pipeline's own `vae_scale_factor`, else 2^(VAE blocks - 1)."""
        factor = getattr(self.pipe, "vae_scale_factor", None)
        return int(factor or 2 ** (len(self.pipe.vae.config.block_out_channels) - 1))

    def latent_image_shape(self) -> tuple[int, int, int]:
        """(RGB channels, H, W) = the denoiser's latent `sample_size` times the VAE scale factor."""
        size = self.denoiser.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        scale = self.vae_scale_factor
        return int(self.pipe.vae.config.in_channels), int(height * scale), int(width * scale)

    def validate_images(self, images: torch.Tensor, what: str = "images") -> None:
        from ..data import InvalidImageError

        expected = self.expected_image_shape()
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise InvalidImageError(
                f"{what} have shape {tuple(images.shape[1:])} (C, H, W) but {type(self.pipe).__name__} "
                f"expects {expected}"
            )
        if not torch.isfinite(images).all():
            raise InvalidImageError(f"{what} contain NaN or infinite values")

    def encode(self, images: torch.Tensor, captions: list[str | None], keys: list, seed: int) -> ModelInputs:
        """Images [B, C, H, W] in [-1, 1] and captions → x0 and conditioning on the denoiser's device."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_latents(self, images: torch.Tensor, keys: list, seed: int) -> torch.Tensor:
        """x0 = (z - shift_factor) · scaling_factor, z = μ + σ·η ~ vae.encode(image), η seeded by (seed, key).

        Returns [B, C_latent, h, w] on the VAE's device in its dtype; one draw per example, any batch.
        """
        vae = self.pipe.vae
        distribution = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        eps = torch.stack([seeded_randn(distribution.mean.shape[1:], seed, "latent", key) for key in keys])
        latents = distribution.mean + distribution.std * eps.to(distribution.mean)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def text_prompts(self, captions: list) -> list[str]:
        """Captions as prompts: None → "" (the unconditional prompt); anything but a string is an error."""
        prompts = []
        for caption in captions:
            if caption is not None and not isinstance(caption, str):
                raise TypeError(
                    f"{type(self.pipe).__name__} is conditioned on text: captions must be strings or None, "
                    f"got {type(caption).__name__} {caption!r}"
                )
            prompts.append(caption or "")
        return prompts

    def sequence_length_kwargs(self) -> dict:
        """`max_sequence_length=` for `encode_prompt` when the `max_sequence_length` option is set, else nothing
        (the pipeline's own default)."""
        length = getattr(self, "max_sequence_length", None)
        return {} if length is None else {"max_sequence_length": int(length)}

    def configure(self, config) -> None:
        """Take this family's `options` from `config.adapter_options` (so they are part of the config's hash),
        and raise for an option it does not take or if `config.output` (objectives.py) is undefined for this
        family. Called once by `AttributionTask`."""
        unknown = sorted(set(config.adapter_options) - set(self.options))
        if unknown:
            raise ValueError(f"AttributionConfig.adapter_options {unknown} do not apply to {type(self.pipe).__name__} "
                             f"({self.family} family), which takes {list(self.options) or 'none'}")
        for name in self.options:
            if name in config.adapter_options:
                setattr(self, name, config.adapter_options[name])

    def denoiser_kwargs(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: dict) -> dict:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.noise_scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        if self.prediction_type == "sample":
            return x0
        raise UnsupportedPipelineError(f"unsupported prediction_type {self.prediction_type!r}")

    def timestep_weight(self, t: torch.Tensor) -> torch.Tensor:
        """w_t = β_t / (2 α_t (1 - ᾱ_t)), the ELBO weight of D-TRAK's `weighted-mse` output."""
        s = self.noise_scheduler
        t = t.cpu()
        # on the CPU: the scheduler's `add_noise` moves its `alphas_cumprod` to the model's device (CUDA), not betas
        weight = s.betas.cpu()[t] / (2 * s.alphas.cpu()[t] * (1 - s.alphas_cumprod.cpu()[t]))
        return weight.to(torch.float32)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, conditioning: dict, denoiser=None) -> torch.Tensor:
        """The denoiser's prediction for the training target; learned-variance channels are split off."""
        denoiser = denoiser or self.denoiser
        output = denoiser(**self.denoiser_kwargs(x_t, t, conditioning), return_dict=False)[0]
        if output.shape[1] == 2 * x_t.shape[1]:
            output = output[:, : x_t.shape[1]]
        return output
