"""Stable Diffusion 3 / 3.5: flow matching on VAE latents, two CLIP encoders + T5, pooled projections."""

from __future__ import annotations

import torch
from diffusers import SD3Transformer2DModel

from ..data import InvalidImageError
from .base import ModelInputs
from .flow_matching import FlowMatchingAdapter
from .registry import register_adapter


@register_adapter
class StableDiffusion3Adapter(FlowMatchingAdapter):
    """x0 = (z - shift_factor) · scaling_factor; c = `pipe.encode_prompt` (CLIP-L ⊕ CLIP-G hidden states padded
    to T5's width, then T5 tokens, at the pipeline's default `max_sequence_length`
    unless the `max_sequence_length` option is set) and the pooled CLIP-L ⊕ CLIP-G
    projections. The transformer is called as in the pipeline: timestep = σ_t · T (`scheduler.timesteps`).
    Images: any size whose latents are a multiple of the patch size, up to `pos_embed_max_size` patches.
    """

    family = "stable-diffusion-3"
    priority = 50
    options = ("max_sequence_length",)
    max_sequence_length: int | None = None  # None: the pipeline's default (256)

    @classmethod
    def supports(cls, pipe) -> bool:
        components = getattr(pipe, "components", {})
        return (
            isinstance(components.get("transformer"), SD3Transformer2DModel)
            and components.get("vae") is not None
            and hasattr(pipe, "encode_prompt")
        )

    def expected_image_shape(self) -> tuple[int, int, int]:
        """The pipeline's default size (other sizes are accepted, see `validate_images`)."""
        return self.latent_image_shape()

    def validate_images(self, images, what="images") -> None:
        config = self.denoiser.config
        multiple = self.vae_scale_factor * config.patch_size
        self.flexible_image_check(images, what, multiple)
        largest = (config.pos_embed_max_size or 0) * multiple
        if largest and max(images.shape[-2:]) > largest:
            raise InvalidImageError(
                f"{what} are {tuple(images.shape[-2:])} pixels but this SD3 transformer's position embeddings "
                f"cover at most {largest} pixels per side"
            )

    @torch.no_grad()
    def encode(self, images, captions, keys, seed) -> ModelInputs:
        latents = self.encode_latents(images, keys, seed)
        embeddings, _, pooled, _ = self.pipe.encode_prompt(
            prompt=self.text_prompts(captions), prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False, **self.sequence_length_kwargs(),
        )
        dtype = next(self.denoiser.parameters()).dtype
        conditioning = {"encoder_hidden_states": embeddings.to(dtype), "pooled_projections": pooled.to(dtype)}
        return ModelInputs(latents.to(self.device, dtype), conditioning)

    def denoiser_kwargs(self, x_t, t, conditioning) -> dict:
        return {
            "hidden_states": x_t,
            "timestep": self.sigma(t, x_t) * self.num_train_timesteps,
            "encoder_hidden_states": conditioning["encoder_hidden_states"],
            "pooled_projections": conditioning["pooled_projections"],
        }
