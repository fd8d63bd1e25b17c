"""Similarity baselines: scores from the images alone, no gradients (D-TRAK reports them as baselines).

    pixel-dot:         τ(z, q) = ⟨vec x(z), vec x(q)⟩                  x = the image in [-1, 1] (pixels, not latents)
    pixel-cosine:      τ(z, q) = ⟨x(z), x(q)⟩ / (‖x(z)‖ ‖x(q)‖)
    embedding-cosine:  τ(z, q) = cos(E(z), E(q))                        E = a transformers image encoder

Declared parts: the featurizer (image_features.py: pixels or an image encoder's embedding) and the dot-product
scorer, plain or cosine. No gradients, no timesteps, no noise.
"""

from __future__ import annotations

from .base import Method, register_method

SIMILARITY_METHODS = ("pixel-dot", "pixel-cosine", "embedding-cosine")


class _SimilarityMethod(Method):
    """A baseline from the images alone: no gradients, no timesteps, no noise."""

    reads = ()
    fingerprints = ()  # pixels depend on no model
    embedding = False
    cosine = True

    def featurizer(self, pipe, config, fitted=None, **options):
        from .. import image_features

        if self.embedding:
            return image_features.EmbeddingFeaturizer(pipe, config, self, **options)
        if options:
            raise TypeError(f"method {config.method!r} takes no featurizer options, got {sorted(options)}")
        return image_features.PixelFeaturizer(pipe, config, self)

    def scorer(self, store, damping=None, damping_ratio=None):
        from ..scoring import DotScorer

        return DotScorer(store, cosine=self.cosine)


@register_method
class PixelDot(_SimilarityMethod):
    name = "pixel-dot"
    title = "pixel inner product (baseline)"
    cosine = False


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
    embedding = True
