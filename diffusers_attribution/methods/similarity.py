"""Similarity baselines: scores from the images alone, no gradients (D-TRAK reports them as baselines).

    pixel-dot:         τ(z, q) = ⟨vec x(z), vec x(q)⟩                  x = the image in [-1, 1] (pixels, not latents)
    pixel-cosine:      τ(z, q) = ⟨x(z), x(q)⟩ / (‖x(z)‖ ‖x(q)‖)
    embedding-cosine:  τ(z, q) = cos(E(z), E(q))                        E = a transformers image encoder

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

from ..config import AttributionConfig
from ..data import as_training_data, to_image_batch, training_batches
from ..featurize import check_finite_features
from ..fingerprint import state_fingerprint
from ..result import AttributionResult
from ..store.format import FeatureStore
from ..store.writer import finish_store
from .base import Method, get_method, register_method

SIMILARITY_METHODS = ("pixel-dot", "pixel-cosine", "embedding-cosine")
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class _ImageFeaturizer:
    """Shared loop: images [B, C, H, W] in [-1, 1] → features [B, d] (`embed`), stored like any other store."""

    kind = "base"

    def __init__(self, pipe, config: AttributionConfig):
        self.config = config
        self.adapter = None
        if pipe is not None:
            from ..adapters import get_adapter

            self.adapter = get_adapter(pipe)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        return {"projection": {"kind": self.kind}}

    def _validate(self, images: torch.Tensor, what: str) -> None:
        if self.adapter is not None:
            self.adapter.validate_images(images, what)

    def featurize_dataset(self, dataset: Any, progress: bool = True, **store_options) -> FeatureStore:
        """Φ [N, d]; `store_options` as `TracInFeaturizer.featurize_dataset`."""
        data = as_training_data(dataset, self.config.image_column, self.config.caption_column)
        features, hashes = [], []
        for _, images, _, batch_hashes in training_batches(data, 0, len(data), self.config.batch_size, self._validate):
            hashes.extend(batch_hashes)
            features.append(self.embed(images).float().cpu())
        check_finite_features(torch.cat(features))
        metadata = {**self.metadata(), "num_examples": len(data), "example_hashes": hashes}
        return finish_store(FeatureStore(torch.cat(features), self.config, metadata), **store_options)

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

    def __init__(self, pipe, config: AttributionConfig, encoder=None, processor=None):
        super().__init__(pipe, config)
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


class DotScorer:
    """τ = Q Φᵀ."""

    metadata: dict[str, Any] = {}

    def __init__(self, train_features: torch.Tensor):
        self.train_features = train_features.double()

    def scores(self, query_features: torch.Tensor) -> torch.Tensor:
        return (query_features.double() @ self.train_features.T).float()


class CosineScorer(DotScorer):
    """τ = (Q / ‖Q‖)(Φ / ‖Φ‖)ᵀ, row-normalized; a zero vector scores 0."""

    def __init__(self, train_features: torch.Tensor):
        super().__init__(_unit_rows(train_features.double()))

    def scores(self, query_features: torch.Tensor) -> torch.Tensor:
        return super().scores(_unit_rows(query_features.double()))


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


class _SimilarityMethod(Method):
    """A baseline from the images alone: no gradients, no timesteps, no noise."""

    reads = ()
    fingerprints = ()  # pixels depend on no model
    featurizer_class: type = PixelFeaturizer
    scorer_class: type = CosineScorer

    def featurizer(self, pipe, config, store=None, **options):
        return self.featurizer_class(pipe, config, **options)

    def scorer(self, store, damping=None, damping_ratio=None):
        return self.scorer_class(store.features)


@register_method
class PixelDot(_SimilarityMethod):
    name = "pixel-dot"
    title = "pixel inner product (baseline)"
    scorer_class = DotScorer


@register_method
class PixelCosine(_SimilarityMethod):
    name = "pixel-cosine"
    title = "pixel cosine similarity (baseline)"


@register_method
class EmbeddingCosine(_SimilarityMethod):
    name = "embedding-cosine"
    title = "image-embedding cosine similarity (baseline)"
    reads = ("encoder",)
    fingerprints = ("projection.encoder_fingerprint",)
    featurizer_class = EmbeddingFeaturizer


def similarity_scores(
    train_dataset: Any,
    images: Any,
    method: str = "pixel-cosine",
    *,
    encoder=None,
    processor=None,
    config: AttributionConfig | None = None,
    pipe=None,
) -> AttributionResult:
    """Scores [n_queries, N] of a similarity baseline, without a pipeline (pass `pipe` to check image shapes)."""
    config = config or AttributionConfig(method=method)
    if config.method not in SIMILARITY_METHODS:
        raise ValueError(f"{config.method!r} is not a similarity method {SIMILARITY_METHODS}")
    method_ = get_method(config.method)
    options = {"encoder": encoder, "processor": processor} if config.method == "embedding-cosine" else {}
    featurizer = method_.featurizer(pipe, config, **options)
    store = train_dataset if isinstance(train_dataset, FeatureStore) else featurizer.featurize_dataset(train_dataset)
    scores = method_.scorer(store).scores(featurizer.featurize_queries(images))
    return AttributionResult(scores=scores, config=config, query_images=to_image_batch(images),
                             metadata={"example_hashes": store.example_hashes})
