"""The similarity baselines' featurizers: features from the images alone, no gradients (methods/similarity.py).

    pixels:     φ(z) = vec x(z)         x = the image in [-1, 1] (pixels, not latents)
    embedding:  φ(z) = E(z)             E = a transformers image encoder

E is CLIP's projected image embedding (`CLIPVisionModelWithProjection.image_embeds`, or `CLIPModel.
get_image_features`), else the pooled output (DINOv2's `pooler_output`: the layer-normed CLS token), else the
first token of the last hidden state. Images go through the encoder's own image processor when one is given
or can be loaded from `config.encoder`; otherwise they are resized to the encoder's `image_size` (bicubic) and
normalized with CLIP's (CLIP models) or ImageNet's mean and std. Grayscale images are repeated to 3 channels.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .config import AttributionConfig
from .data import TrainingData, to_image_batch, training_batches
from .featurize import FeaturizerBase, check_finite_features
from .fingerprint import state_fingerprint

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _ImageFeaturizer(FeaturizerBase):
    """Images [B, C, H, W] in [-1, 1] → features [B, d] (`embed`), through the loop of featurize.py like any
    other featurizer (resumable, several processes). `method`: the baseline's `Method` (its facts)."""

    kind = "base"

    def __init__(self, pipe, config: AttributionConfig, method: Any = None):
        self.config = config
        self.method = method
        self.adapter = None
        self._dim: int | None = None
        if pipe is not None:
            from .adapters import get_adapter

            self.adapter = get_adapter(pipe)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        return {"projection": {"kind": self.kind}}

    def _validate(self, images: torch.Tensor, what: str) -> None:
        if self.adapter is not None:
            self.adapter.validate_images(images, what)

    def facts(self) -> dict[str, Any]:
        return self.method.facts() if self.method is not None else {"title": None, "fingerprints": [], "kernel": False}

    def training_data(self, dataset: Any, num_examples: int | None = None) -> TrainingData:
        data = super().training_data(dataset, num_examples)
        if self._dim is None:  # the width of a row: the embedding of the first example (data is never empty)
            self._dim = int(self.embed(data.batch([0])[0]).shape[1])
        return data

    @property
    def dim(self) -> int:
        if self._dim is None:
            raise RuntimeError("the feature width is known once the training data is read (training_data)")
        return self._dim

    def rows(self, data: TrainingData, start: int, stop: int, bar=None):
        """(Φ [stop - start, d], content hashes, None)."""
        features, hashes = [], []
        for indices, images, _, batch_hashes in training_batches(data, start, stop, self.config.batch_size,
                                                                  self._validate):
            hashes.extend(batch_hashes)
            features.append(self.embed(images).float().cpu())
            if bar is not None:
                bar.update(len(indices))
        features = torch.cat(features) if features else torch.empty(0, self.dim)
        check_finite_features(features, start)
        return features, hashes, None

    def featurize_queries(self, images: Any, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        batch = to_image_batch(images)
        self._validate(batch, "query images")
        size = self.config.batch_size
        return torch.cat([self.embed(batch[i : i + size]).float().cpu() for i in range(0, len(batch), size)])


class PixelFeaturizer(_ImageFeaturizer):
    """φ(z) = vec(x), the image in [-1, 1] flattened."""

    kind = "pixels"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).float()


class EmbeddingFeaturizer(_ImageFeaturizer):
    """φ(z) = E(z) for a transformers image encoder (module docstring). `encoder`/`processor` override
    `config.encoder` (a path or Hub id loaded with `load_image_encoder`)."""

    kind = "embedding"

    def __init__(self, pipe, config: AttributionConfig, method: Any = None, encoder=None, processor=None):
        super().__init__(pipe, config, method)
        if encoder is None:
            if config.encoder is None:
                raise ValueError("method='embedding-cosine' needs an image encoder: set AttributionConfig.encoder "
                                 "to a path or Hub id, or pass encoder= (e.g. CLIPVisionModelWithProjection)")
            encoder, loaded = load_image_encoder(config.encoder)
            processor = processor or loaded
        self.encoder = encoder.eval()
        self.processor = processor

    def metadata(self) -> dict[str, Any]:
        name = getattr(self.encoder.config, "_name_or_path", "") or type(self.encoder).__name__
        return {"projection": {"kind": self.kind, "encoder": name,
                               "encoder_fingerprint": state_fingerprint(self.encoder.state_dict())}}

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.preprocess(images)
        if hasattr(self.encoder, "get_image_features"):
            out = self.encoder.get_image_features(pixel_values=pixels)
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        out = self.encoder(pixel_values=pixels)
        if getattr(out, "image_embeds", None) is not None:
            return out.image_embeds
        if getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        return out.last_hidden_state[:, 0]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images → the encoder's `pixel_values`."""
        config = self.encoder.config
        x = (images.float() + 1) / 2
        channels = getattr(config, "num_channels", 3)
        if x.shape[1] == 1 and channels == 3:
            x = x.repeat(1, 3, 1, 1)
        parameter = next(self.encoder.parameters())
        if self.processor is not None:
            pixels = self.processor(images=list(x), do_rescale=False, return_tensors="pt")["pixel_values"]
            return pixels.to(parameter.device, parameter.dtype)
        size = getattr(config, "image_size", 224)
        size = 224 if size > 448 else size  # DINOv2's config says 518; it interpolates position embeddings
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        clip = "clip" in getattr(config, "model_type", "")
        mean, std = (CLIP_MEAN, CLIP_STD) if clip else (IMAGENET_MEAN, IMAGENET_STD)
        x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        return x.to(parameter.device, parameter.dtype)


def load_image_encoder(name: str):
    """(encoder, image processor or None) from a path or Hub id: CLIP → `CLIPVisionModelWithProjection`,
    else `AutoModel` (DINOv2 → `Dinov2Model`)."""
    import transformers

    model_type = transformers.AutoConfig.from_pretrained(name).model_type
    if model_type in ("clip", "clip_vision_model"):
        encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(name)
    else:
        encoder = transformers.AutoModel.from_pretrained(name)
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        processor = None
    return encoder, processor
