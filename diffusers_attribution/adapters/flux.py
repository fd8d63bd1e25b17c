"""Flux.1: flow matching on packed VAE latents, CLIP pooled + T5 conditioning, RoPE ids, guidance embedding."""

from __future__ import annotations

import torch
from diffusers import FluxTransformer2DModel

from .base import ModelInputs, UnsupportedPipelineError
from .flow_matching import FlowMatchingAdapter
from .registry import register_adapter


@register_adapter
class FluxAdapter(FlowMatchingAdapter):
    """x0 = `pipe._pack_latents((z - shift_factor) · scaling_factor)`: [B, (h/2)(w/2), 4·C] tokens of 2×2 latent
    patches, exactly what the transformer reads. Noise is drawn in that packed layout and every objective is
    computed on packed tensors: the objectives are means/norms over elements, unchanged by the packing
    permutation, so no unpacking is needed.

    c = `pipe.encode_prompt` (T5 tokens at the pipeline's default `max_sequence_length` unless the option is
    set, pooled CLIP, text ids) plus image ids (`pipe._prepare_latent_image_ids`). The transformer is called
    as in the pipeline: timestep = σ_t · T / 1000 (it multiplies by 1000 itself), and, when
    `transformer.config.guidance_embeds` (Flux-dev), guidance = the `guidance_scale` option (3.5, the
    pipeline's and diffusers' training scripts' default). Images: any height and width divisible by
    2 · vae_scale_factor.
    """

    family = "flux"
    priority = 40
    options = ("max_sequence_length", "guidance_scale")
    max_sequence_length: int | None = None  # None: the pipeline's default (512)
    guidance_scale: float = 3.5

    @classmethod
    def supports(cls, pipe) -> bool:
        components = getattr(pipe, "components", {})
        transformer, vae = components.get("transformer"), components.get("vae")
        return (
            isinstance(transformer, FluxTransformer2DModel)
            and vae is not None
            and hasattr(pipe, "encode_prompt")
            and hasattr(pipe, "_pack_latents")
            and hasattr(pipe, "_prepare_latent_image_ids")
        )

    def __init__(self, pipe):
        super().__init__(pipe)
        latent_channels = int(pipe.vae.config.latent_channels)
        if self.denoiser.config.in_channels != 4 * latent_channels:
            raise UnsupportedPipelineError(
                f"{type(pipe).__name__}'s transformer reads {self.denoiser.config.in_channels} channels per token, "
                f"not 4 × {latent_channels} packed latent channels: pipelines that concatenate image conditions "
                "(Fill, Depth, Canny) are not supported"
            )

    def expected_image_shape(self) -> tuple[int, int, int]:
        """The pipeline's default size (other sizes are accepted, see `validate_images`)."""
        size = int(getattr(self.pipe, "default_sample_size", 128)) * self.vae_scale_factor
        return int(self.pipe.vae.config.in_channels), size, size

    def validate_images(self, images, what="images") -> None:
        self.flexible_image_check(images, what, 2 * self.vae_scale_factor)

    @torch.no_grad()
    def encode(self, images, captions, keys, seed) -> ModelInputs:
        latents = self.encode_latents(images, keys, seed)
        batch, channels, height, width = latents.shape
        dtype = next(self.denoiser.parameters()).dtype
        packed = self.pipe._pack_latents(latents, batch, channels, height, width)
        embeddings, pooled, text_ids = self.pipe.encode_prompt(
            prompt=self.text_prompts(captions), prompt_2=None, device=self.device, num_images_per_prompt=1,
            **self.sequence_length_kwargs(),
        )
        image_ids = self.pipe._prepare_latent_image_ids(batch, height // 2, width // 2, self.device, embeddings.dtype)
        conditioning = {
            "encoder_hidden_states": embeddings.to(dtype),
            "pooled_projections": pooled.to(dtype),
            # ids are the same for every example; batched here so that rows can be sliced and repeated.
            "txt_ids": text_ids.expand(batch, -1, -1),
            "img_ids": image_ids.expand(batch, -1, -1),
        }
        if self.denoiser.config.guidance_embeds:
            conditioning["guidance"] = torch.full([batch], self.guidance_scale, device=self.device, dtype=torch.float32)
        return ModelInputs(packed.to(self.device, dtype), conditioning)

    def denoiser_kwargs(self, x_t, t, conditioning) -> dict:
        return {
            "hidden_states": x_t,
            "timestep": self.sigma(t, x_t) * self.num_train_timesteps / 1000,
            "guidance": conditioning.get("guidance"),
            "pooled_projections": conditioning["pooled_projections"],
            "encoder_hidden_states": conditioning["encoder_hidden_states"],
            "txt_ids": conditioning["txt_ids"][0],
            "img_ids": conditioning["img_ids"][0],
        }
