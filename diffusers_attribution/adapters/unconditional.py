"""Unconditional pixel-space pipelines (DDPMPipeline, DDIMPipeline, any pipeline with a bare UNet2DModel)."""

from __future__ import annotations

from diffusers import UNet2DModel

from .base import ModelInputs, PipelineAdapter
from .registry import register_adapter


@register_adapter
class UnconditionalAdapter(PipelineAdapter):
    """x0 = the image itself in [-1, 1]; no conditioning."""

    family = "unconditional"
    priority = 10

    @classmethod
    def supports(cls, pipe) -> bool:
        components = getattr(pipe, "components", {})
        return isinstance(components.get("unet"), UNet2DModel) and components.get("vae") is None

    def expected_image_shape(self) -> tuple[int, int, int]:
        config = self.denoiser.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(config.in_channels), int(height), int(width)

    def encode(self, images, captions, keys, seed) -> ModelInputs:
        dtype = next(self.denoiser.parameters()).dtype
        return ModelInputs(images.to(self.device, dtype))

    def denoiser_kwargs(self, x_t, t, conditioning) -> dict:
        return {"sample": x_t, "timestep": t}
