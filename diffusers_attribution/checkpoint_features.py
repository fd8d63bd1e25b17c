"""`CheckpointFeaturizer`: TracIn's and ReTrac's features, one block of k columns per denoiser checkpoint.

    training:  φ_c(z) = (1/(K·D)) Σ_{t ~ U[0, T)} Σ_{d < D} P ∇θ_c f(z, t, ε_d)          (K = num_timesteps)
    queries:   φ_c(q) = (1/(Kq·D)) Σ_{t ∈ grid of Kq} Σ_{d < D} P ∇θ_c f(q, t, ε_d)  (Kq = query_timesteps,
                                                                                      D = query_noise_draws)
    ReTrac:    every per-(t, d) projected gradient divided by its norm before averaging, training and query alike

Within a range of rows each checkpoint is loaded once and every batch of the range featurized under it, so the
loop of featurize.py (shards, resuming, processes) applies as to any featurizer.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .checkpoints import CheckpointSet, describe
from .config import AttributionConfig
from .data import StreamError, TrainingData, query_batch, training_batches
from .featurize import Featurizer, FeaturizerBase, NonFiniteFeaturesError, check_finite_features
from .fingerprint import model_fingerprint
from .gradients.timesteps import timestep_features, uniform_timesteps


class CheckpointFeaturizer(FeaturizerBase):
    """Training and query features of TracIn / ReTrac (`method`), one block of k columns per checkpoint.

    `checkpoints` overrides `config.checkpoints` (and may hold in-memory state dicts or modules).
    """

    def __init__(self, pipe, config: AttributionConfig, method: Any, checkpoints: Sequence | None = None):
        self.method = method
        self.base = Featurizer(pipe, config)
        self.config = config
        self.adapter = self.base.adapter
        specs = checkpoints if checkpoints is not None else config.checkpoints
        if checkpoints is not None and config.checkpoints not in (None, [describe(c) for c in checkpoints]):
            raise ValueError("checkpoints= differ from config.checkpoints; pass one or the other")
        self.checkpoints = CheckpointSet(specs, pipe, self.adapter.denoiser, list(self.base.parameters))
        self.normalize = method.reduction == "unit-pairs"
        self.block_dim = self.base.projector.dim
        self.dim = len(self.checkpoints) * self.block_dim
        self._fingerprints: dict[int, dict[str, str]] = {}

    @property
    def row_passes(self) -> int:
        """Each range of rows is read once per checkpoint."""
        return len(self.checkpoints)

    def to(self, device) -> None:
        self.base.to(device)

    def fingerprint(self) -> dict:
        return self.base.fingerprint()

    def metadata(self) -> dict[str, Any]:
        metadata = {**self.base.metadata(), "checkpoints": self.checkpoints.describe(),
                    "checkpoint_block_dim": self.block_dim}
        if self.checkpoints.describe() is not None:
            metadata["model_fingerprint"] = {"checkpoints": self.fingerprints()}
        return metadata

    def fingerprints(self) -> list[dict[str, str]]:
        """`model_fingerprint` of the denoiser with each checkpoint loaded."""
        for c in range(len(self.checkpoints)):
            if c not in self._fingerprints:
                with self.checkpoints.loaded(c):
                    self._fingerprint(c)
        return [self._fingerprints[c] for c in range(len(self.checkpoints))]

    def _fingerprint(self, c: int) -> None:
        """Record checkpoint c's fingerprint while it is loaded."""
        if c not in self._fingerprints:
            self._fingerprints[c] = model_fingerprint(self.adapter.denoiser, self.base.parameters)

    def _blocks(self, groups, draws: int):
        """For each checkpoint c (loaded once), for each group (inputs, keys, timesteps [B, K]): the group's
        (normalized) per-(t, d) features averaged, [B, k]. Yields (c, group index, features)."""
        for c in range(len(self.checkpoints)):
            with self.checkpoints.loaded(c):
                self._fingerprint(c)
                for g, (inputs, keys, timesteps) in enumerate(groups()):
                    yield c, g, timestep_features(self.base, inputs, keys, timesteps, draws, self.normalize).features

    def rows(self, data: TrainingData, start: int, stop: int, bar=None):
        """(Φ [stop - start, C·k], content hashes, None): each example's gradient at its K sampled timesteps."""
        if stop is None:
            raise StreamError("TracIn and ReTrac read each range of rows once per checkpoint, and the length of this "
                              "stream is unknown: pass num_examples=N")
        config, k = self.config, self.block_dim
        size = config.batch_size
        starts = list(range(start, stop, size))
        features = torch.empty(stop - start, self.dim, dtype=torch.float32)
        hashes: list[str] = []

        def groups():  # the range's batches, read again for every checkpoint
            for indices, images, captions, batch_hashes in training_batches(data, start, stop, size,
                                                                             self.adapter.validate_images):
                if len(hashes) < stop - start:
                    hashes.extend(batch_hashes)
                inputs = self.adapter.encode(images, list(captions), indices, config.noise_seed)
                yield inputs, indices, self.base.task.timesteps(indices)  # [B, K], seeded per example

        for c, g, block in self._blocks(groups, self.base.task.noise_draws):
            row = starts[g] - start
            features[row : row + len(block), c * k : (c + 1) * k] = block
            if bar is not None and c == len(self.checkpoints) - 1:
                bar.update(len(block))
        try:
            check_finite_features(features, start)
        except NonFiniteFeaturesError as error:
            self.base._check_weights(str(error))  # a non-finite weight, if that is the cause
            raise
        return features, hashes, None

    def featurize_queries(self, images: Any, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        """φ [n, C·k]: each query's gradient averaged over `query_timesteps` evenly spaced t × `query_noise_draws`."""
        batch, prompts = query_batch(images, prompts, self.adapter.validate_images)
        grid = uniform_timesteps(self.config.query_timesteps, self.adapter.num_train_timesteps)
        draws, k = self.config.query_noise_draws, self.block_dim
        per_group = max(1, self.config.batch_size // (len(grid) * draws))
        starts = list(range(0, len(batch), per_group))
        encoded = []
        for start in starts:
            stop = min(start + per_group, len(batch))
            keys = [f"query:{i}" for i in range(start, stop)]
            inputs = self.adapter.encode(batch[start:stop], list(prompts[start:stop]), keys, self.config.noise_seed)
            encoded.append((inputs, keys, grid))
        out = torch.empty(len(batch), self.dim, dtype=torch.float32)
        for c, g, block in self._blocks(lambda: iter(encoded), draws):
            out[starts[g] : starts[g] + len(block), c * k : (c + 1) * k] = block
        return out
