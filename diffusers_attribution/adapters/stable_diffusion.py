"""Stable Diffusion 1.x/2.x: VAE latents, CLIP text conditioning, a UNet2DConditionModel."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from .base import ModelInputs, PipelineAdapter
from .registry import register_adapter


@register_adapter
class StableDiffusionAdapter(PipelineAdapter):
    """x0 = (z - shift_factor) · scaling_factor with z ~ vae.encode(image), drawn from a per-example seed;
    c = the text encoder's hidden states of the caption ("" when there is none)."""

    family = "stable-diffusion"
    priority = 60

    @classmethod
    def supports(cls, pipe) -> bool:
        components = getattr(pipe, "components", {})
        return (
            isinstance(components.get("unet"), UNet2DConditionModel)
            and components.get("vae") is not None
            and components.get("text_encoder") is not None
            and components.get("text_encoder_2") is None
            and hasattr(pipe, "encode_prompt")
        )

    def expected_image_shape(self) -> tuple[int, int, int]:
        size = self.denoiser.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        scale = self.pipe.vae_scale_factor
        return int(self.pipe.vae.config.in_channels), int(height * scale), int(width * scale)

    @torch.no_grad()
    def encode(self, images, captions, keys, seed) -> ModelInputs:
        latents = self.encode_latents(images, keys, seed)
        embeddings, _ = self.pipe.encode_prompt(self.text_prompts(captions), self.device, 1, False)
        dtype = next(self.denoiser.parameters()).dtype
        return ModelInputs(latents.to(self.device, dtype), {"encoder_hidden_states": embeddings.to(dtype)})

    def denoiser_kwargs(self, x_t, t, conditioning) -> dict:
        return {"sample": x_t, "timestep": t, "encoder_hidden_states": conditioning["encoder_hidden_states"]}
