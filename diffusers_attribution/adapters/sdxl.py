"""Stable Diffusion XL: VAE latents, two CLIP text encoders, pooled text embeddings and size micro-conditioning."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from .base import ModelInputs, PipelineAdapter, UnsupportedPipelineError
from .registry import register_adapter


@register_adapter
class StableDiffusionXLAdapter(PipelineAdapter):
    """x0 = VAE latents (as Stable Diffusion); c = (encoder_hidden_states, text_embeds, time_ids):

    - encoder_hidden_states: both text encoders' penultimate hidden states, concatenated (`pipe.encode_prompt`);
    - text_embeds: the pooled, projected output of `text_encoder_2`;
    - time_ids: (original_size, crops_coords_top_left, target_size) = ((H, W), (0, 0), (H, W)) of the
      training image itself, i.e. an uncropped image at its own resolution (what `pipe(...)` uses by default).
      Pipelines configured with `requires_aesthetics_score` (the refiner) use ((H, W), (0, 0), aesthetic_score).
    """

    family = "stable-diffusion-xl"
    priority = 70  # before stable-diffusion (60): an SDXL UNet is also a UNet2DConditionModel
    options = ("aesthetic_score",)
    aesthetic_score: float = 6.0  # the refiner's default micro-condition

    @classmethod
    def supports(cls, pipe) -> bool:
        components = getattr(pipe, "components", {})
        unet = components.get("unet")
        return (
            isinstance(unet, UNet2DConditionModel)
            and unet.config.addition_embed_type == "text_time"
            and components.get("vae") is not None
            and components.get("text_encoder_2") is not None
            and hasattr(pipe, "encode_prompt")
        )

    def expected_image_shape(self) -> tuple[int, int, int]:
        return self.latent_image_shape()

    def add_time_ids(self, height: int, width: int, projection_dim: int) -> torch.Tensor:
        """[1, n] micro-conditioning ids, checked against the UNet's added-embedding width like `_get_add_time_ids`."""
        if getattr(self.pipe.config, "requires_aesthetics_score", False):
            ids = [height, width, 0, 0, self.aesthetic_score]
        else:
            ids = [height, width, 0, 0, height, width]
        passed = self.denoiser.config.addition_time_embed_dim * len(ids) + projection_dim
        expected = self.denoiser.add_embedding.linear_1.in_features
        if passed != expected:
            raise UnsupportedPipelineError(
                f"the UNet expects added embeddings of width {expected} but time ids {ids} and pooled text "
                f"embeddings of width {projection_dim} give {passed}"
            )
        return torch.tensor([ids], dtype=torch.float32)

    @torch.no_grad()
    def encode(self, images, captions, keys, seed) -> ModelInputs:
        latents = self.encode_latents(images, keys, seed)
        embeddings, _, pooled, _ = self.pipe.encode_prompt(
            prompt=self.text_prompts(captions), device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        text_encoder_2 = self.pipe.text_encoder_2
        projection_dim = int(text_encoder_2.config.projection_dim) if text_encoder_2 is not None else pooled.shape[-1]
        time_ids = self.add_time_ids(int(images.shape[-2]), int(images.shape[-1]), projection_dim)
        dtype = next(self.denoiser.parameters()).dtype
        conditioning = {
            "encoder_hidden_states": embeddings.to(dtype),
            "text_embeds": pooled.to(dtype),
            "time_ids": time_ids.to(self.device, dtype).expand(len(images), -1),
        }
        return ModelInputs(latents.to(self.device, dtype), conditioning)

    def denoiser_kwargs(self, x_t, t, conditioning) -> dict:
        return {
            "sample": x_t,
            "timestep": t,
            "encoder_hidden_states": conditioning["encoder_hidden_states"],
            "added_cond_kwargs": {"text_embeds": conditioning["text_embeds"], "time_ids": conditioning["time_ids"]},
        }
