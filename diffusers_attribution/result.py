"""`AttributionResult`: the scores of queries against a training set, their top-k, and a picture of them."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import PIL.Image
import PIL.ImageDraw
import torch
from diffusers.image_processor import VaeImageProcessor

from .config import AttributionConfig
from .data import as_training_data, to_image_tensor
from .store.errors import StoreMismatchError


class TopK(NamedTuple):
    indices: torch.Tensor  # long [n_queries, k]: training-set positions, best first
    scores: torch.Tensor  # float32 [n_queries, k]


@dataclass
class AttributionResult:
    """scores [n_queries, N] float32: higher = that training example made the query more likely; or, for a
    result asked for its top-k only (`attribute(..., top_k=k)`), `scores` None and `top` the best k per query."""

    scores: torch.Tensor | None
    config: AttributionConfig
    query_images: torch.Tensor | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    top: TopK | None = None

    @property
    def num_examples(self) -> int:
        """N, the number of training examples scored."""
        return self.scores.shape[1] if self.scores is not None else int(self.metadata["num_examples"])

    def topk(self, k: int = 5) -> TopK:
        """The best k training examples per query (indices [n, k], scores), best first."""
        if self.scores is not None:
            k = min(k, self.scores.shape[1])
            values, indices = self.scores.topk(k, dim=1)
            return TopK(indices, values)
        if self.top is None:
            raise ValueError("this result holds neither scores nor a top-k")
        if k > self.top.indices.shape[1] and self.top.indices.shape[1] < self.num_examples:
            raise ValueError(f"this result holds the top-{self.top.indices.shape[1]} only: attribute again with "
                             f"top_k={k} (or top_k=None for every score)")
        return TopK(self.top.indices[:, :k], self.top.scores[:, :k])

    def to_image_grid(self, train_dataset: Any, k: int = 5, tile: int = 64,
                      query_label: str = "generated") -> PIL.Image.Image:
        """Each query (left, boxed, under a `query_label` header) beside its top-k training images, with their
        indices and scores, and a caption saying what the score means.

        `train_dataset` must hold the examples that were scored: each drawn one is checked against the store's
        example hash (`metadata["example_hashes"]`), so a grid never shows images from another dataset."""
        if self.query_images is None:
            raise ValueError("this result holds no query images to draw")
        data = as_training_data(train_dataset, self.config.image_column, self.config.caption_column)
        if len(data) != self.num_examples:
            raise StoreMismatchError(f"the result scores {self.num_examples} training examples, the dataset has "
                                     f"{len(data)}")
        best = self.topk(k)
        hashes = self.metadata.get("example_hashes")
        if hashes is None:
            raise ValueError("this result does not record its training examples' hashes (metadata['example_hashes']): "
                             "cannot check that train_dataset is the scored one")
        for index in sorted(set(best.indices.flatten().tolist())):
            if data.example_hash(index) != hashes[index]:
                raise StoreMismatchError(f"training example {index} of train_dataset is not the one that was scored: "
                                         "pass the dataset the store was featurized from")
        gap, label, header = 6, 26, 18
        columns = best.indices.shape[1] + 1
        width = columns * tile + (columns + 1) * gap + gap
        caption = textwrap.wrap(f"score ({self.config.method}): higher = that training image made the {query_label} "
                                "image more likely", max(width - 2 * gap, 60) // 6)
        footer = 12 * len(caption) + gap
        height = header + len(self.query_images) * (tile + label + gap) + gap + footer
        canvas = PIL.Image.new("RGB", (width, height), "white")
        draw = PIL.ImageDraw.Draw(canvas)
        draw.text((gap, gap // 2), query_label, fill="red")
        draw.text((2 * gap + tile + gap, gap // 2), f"top-{best.indices.shape[1]} training images", fill="black")
        for row, query in enumerate(self.query_images):
            y = header + gap + row * (tile + label + gap)
            canvas.paste(_to_pil(query, tile), (gap, y + label))
            draw.rectangle([gap - 2, y + label - 2, gap + tile + 1, y + label + tile + 1], outline="red")
            draw.text((gap, y), f"{query_label} {row}", fill="black")
            for col, (index, score) in enumerate(zip(best.indices[row].tolist(), best.scores[row].tolist())):
                x = 2 * gap + (col + 1) * (tile + gap)
                canvas.paste(_to_pil(data[index][0], tile), (x, y + label))
                draw.text((x, y), f"#{index}\n{score:.3g}", fill="black", spacing=1)
        draw.multiline_text((gap, height - footer), "\n".join(caption), fill="gray", spacing=2)
        return canvas


def _to_pil(image: torch.Tensor, tile: int) -> PIL.Image.Image:
    """A [C, H, W] tensor in [-1, 1] → an RGB tile, upscaled with nearest-neighbour so pixels stay crisp."""
    array = VaeImageProcessor.pt_to_numpy(VaeImageProcessor.denormalize(to_image_tensor(image)[None]))
    picture = VaeImageProcessor.numpy_to_pil(array)[0].convert("RGB")
    return picture.resize((tile, tile), PIL.Image.NEAREST)
