"""The featurization loop: examples → x0 and conditioning → projected averaged gradients φ(z) [N, k]."""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from . import __version__
from .adapters import PipelineAdapter, get_adapter
from .config import AttributionConfig
from .data import TrainingData, content_hash, to_image_batch
from .projection import Projector, make_projector
from .store import FeatureStore
from .task import AttributionTask, gradients_only_for, select_parameters


class Featurizer:
    """Everything fixed for one (pipeline, config): adapter, task, parameters, projector."""

    def __init__(self, pipe, config: AttributionConfig):
        if config.device is not None:
            pipe.to(config.device)
        self.config = config
        self.adapter: PipelineAdapter = get_adapter(pipe)
        self.task = AttributionTask(self.adapter, config)
        self.parameters = select_parameters(self.adapter.denoiser, config)
        self.projector: Projector = make_projector(config, self.adapter.denoiser, self.parameters)

    def metadata(self) -> dict[str, Any]:
        """What a store records so that queries are only ever scored against compatible features."""
        return {
            "package_version": __version__,
            "pipeline": type(self.adapter.pipe).__name__,
            "family": self.adapter.family,
            "projection": self.projector.spec(),
            "model_fingerprint": model_fingerprint(self.adapter.denoiser, self.parameters),
        }

    def features(self, images: torch.Tensor, captions: Sequence[str | None], keys: Sequence) -> torch.Tensor:
        """φ [B, k] float32 on the CPU for one batch of images [B, C, H, W] in [-1, 1]."""
        inputs = self.adapter.encode(images, list(captions), list(keys), self.config.noise_seed)
        with gradients_only_for(self.adapter.denoiser, self.parameters):
            return self.projector.features(self.task, self.parameters, inputs, list(keys)).float().cpu()

    def featurize_dataset(self, dataset: Any, progress: bool = True) -> FeatureStore:
        data = dataset if isinstance(dataset, TrainingData) else TrainingData(
            dataset, self.config.image_column, self.config.caption_column
        )
        n, size = len(data), self.config.batch_size
        features = torch.empty(n, self.projector.dim, dtype=torch.float32)
        hashes: list[str] = []
        for start in tqdm(range(0, n, size), desc="featurize", unit="batch", disable=not progress):
            indices = list(range(start, min(start + size, n)))
            images, captions = data.batch(indices)
            self.adapter.validate_images(images, f"training examples {indices[0]}..{indices[-1]}")
            hashes.extend(content_hash(image, caption) for image, caption in zip(images, captions))
            features[start : start + len(indices)] = self.features(images, captions, indices)
        metadata = {**self.metadata(), "num_examples": n, "example_hashes": hashes}
        return FeatureStore(features, self.config, metadata)

    def featurize_queries(self, images: Any, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        """φ [n, k] for query images; query i uses the example key `"query:i"` for per-example noise."""
        batch = to_image_batch(images)
        self.adapter.validate_images(batch, "query images")
        if isinstance(prompts, str) or prompts is None:
            prompts = [prompts] * len(batch)
        if len(prompts) != len(batch):
            raise ValueError(f"got {len(prompts)} prompts for {len(batch)} query images")
        out = []
        for start in range(0, len(batch), self.config.batch_size):
            stop = min(start + self.config.batch_size, len(batch))
            keys = [f"query:{i}" for i in range(start, stop)]
            out.append(self.features(batch[start:stop], prompts[start:stop], keys))
        return torch.cat(out)


def model_fingerprint(denoiser: torch.nn.Module, parameters: dict[str, torch.nn.Parameter]) -> dict[str, str]:
    """sha256 over every parameter's name, shape and a strided sample of ≤ 4096 of its values.

    Two fingerprints: `denoiser` (all parameters, base model and adapters) and `attributed` (the selected
    ones). Any fine-tune or different adapter changes them; computing them costs far less than hashing all weights.
    """
    def digest(named) -> str:
        h = hashlib.sha256()
        for name, p in named:
            flat = p.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
            h.update(f"{name}:{tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]

    return {"denoiser": digest(denoiser.named_parameters()), "attributed": digest(parameters.items())}
