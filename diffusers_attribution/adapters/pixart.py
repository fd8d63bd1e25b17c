"""PixArt-α / PixArt-Σ: VAE latents, T5 text embeddings with their attention mask, learned variance."""

from __future__ import annotations

import torch
from diffusers import PixArtTransformer2DModel

from .base import ModelInputs, PipelineAdapter
from .registry import register_adapter


@register_adapter
class PixArtAdapter(PipelineAdapter):
    """x0 = VAE latents · scaling_factor; c = (T5 embeddings, attention mask) from `pipe.encode_prompt`
    (its own `max_sequence_length` default — 120 for α, 300 for Σ — unless the option is set; no caption
    cleaning), plus the
    resolution / aspect-ratio micro-conditions (the image's own (H, W) and H/W) when the transformer
    uses them (`use_additional_conditions`, PixArt-α at 1024 px), else None as in the pipeline.
    Only the ε half of the learned-variance output enters the objective.
    """

    family = "pixart"
    priority = 30
    options = ("max_sequence_length",)
    max_sequence_length: int | None = None  # None: the pipeline's default

    @classmethod
    def supports(cls, pipe) -> bool:
        components = getattr(pipe, "components", {})
        return (
            isinstance(components.get("transformer"), PixArtTransformer2DModel)
            and components.get("vae") is not None
            and components.get("text_encoder") is not None
            and hasattr(pipe, "encode_prompt")
        )

    def expected_image_shape(self) -> tuple[int, int, int]:
        return self.latent_image_shape()

    @torch.no_grad()
    def encode(self, images, captions, keys, seed) -> ModelInputs:
        latents = self.encode_latents(images, keys, seed)
        embeddings, mask, _, _ = self.pipe.encode_prompt(
            self.text_prompts(captions), do_classifier_free_guidance=False, device=self.device,
            **self.sequence_length_kwargs(),
        )
        dtype = next(self.denoiser.parameters()).dtype
        conditioning = {"encoder_hidden_states": embeddings.to(dtype), "encoder_attention_mask": mask}
        if getattr(self.denoiser, "use_additional_conditions", False):
            height, width = int(images.shape[-2]), int(images.shape[-1])
            rows = [len(images), 1]
            conditioning["resolution"] = torch.tensor([[height, width]], device=self.device, dtype=dtype).repeat(rows)
            conditioning["aspect_ratio"] = torch.tensor([[height / width]], device=self.device, dtype=dtype).repeat(rows)
        return ModelInputs(latents.to(self.device, dtype), conditioning)

    def denoiser_kwargs(self, x_t, t, conditioning) -> dict:
        return {
            "hidden_states": x_t,
            "timestep": t,
            "encoder_hidden_states": conditioning["encoder_hidden_states"],
            "encoder_attention_mask": conditioning["encoder_attention_mask"],
            "added_cond_kwargs": {
                "resolution": conditioning.get("resolution"),
                "aspect_ratio": conditioning.get("aspect_ratio"),
            },
        }
