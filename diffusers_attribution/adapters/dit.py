"""DiT: class-conditional latent transformer with learned variance (DiTPipeline)."""

from __future__ import annotations

import numbers

import torch
from diffusers.models.embeddings import LabelEmbedding

from .base import ModelInputs, PipelineAdapter
from .registry import register_adapter


@register_adapter
class DiTAdapter(PipelineAdapter):
    """x0 = VAE latents · scaling_factor; c = the class label y, a LongTensor [B].

    A training example's label travels in the caption slot: an integer class id, or a label name that
    `pipe.get_label_ids` knows (`pipe.labels`, from the pipeline's `id2label`). For a `datasets.Dataset` pass
    `caption_column="label"`; a list of `(image, label)` tuples works as is. A missing label (None) is DiT's
    null class (id = number of classes), the class-dropout label it was trained with for guidance.
    Only the ε half of the learned-variance output (out_channels = 2 · in_channels) enters the objective.
    """

    family = "dit"
    priority = 20

    @classmethod
    def supports(cls, pipe) -> bool:
        components = getattr(pipe, "components", {})
        transformer = components.get("transformer")
        return (
            transformer is not None
            and components.get("vae") is not None
            and hasattr(pipe, "get_label_ids")
            and _label_embedding(transformer) is not None
        )

    def __init__(self, pipe):
        super().__init__(pipe)
        embedding = _label_embedding(self.denoiser)
        self.num_classes = int(embedding.num_classes)
        # LabelEmbedding has one extra row, the null class, when it was trained with label dropout.
        self.null_label = self.num_classes if embedding.embedding_table.num_embeddings > self.num_classes else None

    def expected_image_shape(self) -> tuple[int, int, int]:
        return self.latent_image_shape()

    def label_ids(self, captions: list) -> torch.Tensor:
        """Class ids [B] from integer labels, label names (`pipe.get_label_ids`) or None (the null class)."""
        ids = []
        for caption in captions:
            if caption is None:
                if self.null_label is None:
                    raise ValueError("this DiT has no null class (no label dropout): every image needs a class label")
                ids.append(self.null_label)
            elif isinstance(caption, numbers.Integral) or (torch.is_tensor(caption) and caption.numel() == 1):
                label = int(caption)
                if not 0 <= label < self.num_classes:
                    raise ValueError(f"class label {label} is outside 0..{self.num_classes - 1}")
                ids.append(label)
            elif isinstance(caption, str):
                name = caption.strip()
                if name not in self.pipe.labels and name.isdigit():
                    ids.extend(self.label_ids([int(name)]).tolist())
                else:
                    ids.extend(self.pipe.get_label_ids([name]))  # a clear ValueError for unknown names
            else:
                raise TypeError(f"a DiT class label must be an int, a label name or None, got {type(caption).__name__}")
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def encode(self, images, captions, keys, seed) -> ModelInputs:
        labels = self.label_ids(captions)
        dtype = next(self.denoiser.parameters()).dtype
        latents = self.encode_latents(images, keys, seed)
        return ModelInputs(latents.to(self.device, dtype), {"class_labels": labels.to(self.device)})

    def denoiser_kwargs(self, x_t, t, conditioning) -> dict:
        return {"hidden_states": x_t, "timestep": t, "class_labels": conditioning["class_labels"]}


def _label_embedding(transformer) -> LabelEmbedding | None:
    if not isinstance(transformer, torch.nn.Module):
        return None
    return next((m for m in transformer.modules() if isinstance(m, LabelEmbedding)), None)

