"""Diffusion-TracIn and Diffusion-ReTrac (Xie et al., "Timestep-induced Bias in Influence Estimation", TMLR 2024).

Over checkpoints c = 1..C with learning rates η_c (the paper's code uses η_c = lr · batch size · epochs
between checkpoints / N; pass that product):

    TracIn:  τ(z, q) = Σ_c η_c ⟨g_c(z), g_c(q)⟩
             g_c(z) = (1/(K·D)) Σ_{t ~ U[0, T)} Σ_{d < D} ∇θ f(z, t, ε_d)   (K = num_timesteps, 1 by default;
                                                                          D = noise_draws, 1 by default)
             g_c(q) = (1/(Kq·D)) Σ_{t ∈ grid of Kq} Σ_{d < D} ∇θ f(q, t, ε_d) (Kq = query_timesteps, D = query_noise_draws)
    ReTrac:  the same with every per-(t, d) gradient divided by its L2 norm before averaging:
             ĝ_c = (1/(K·D)) Σ g_{c,t,d} / ‖g_{c,t,d}‖, training and query alike.

Gradients are projected (φ = P g) with the configured projector, and ReTrac normalizes in the projected space:
‖P g‖ = ‖g‖ (1 ± O(1/sqrt(k))) (JL), so P g / ‖P g‖ equals P (g / ‖g‖) up to that factor, while normalizing
before the projection would mean forming every (query, timestep, noise) gradient, which the factored
projector never does. With `projector="identity"` the two are the same, exactly.

A store holds [φ_1(z), ..., φ_C(z)], one block of k columns per checkpoint; η_c is applied when scoring.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..checkpoints import CheckpointSet, describe
from ..config import AttributionConfig
from ..data import as_training_data, query_batch, to_image_batch, training_batches
from ..featurize import Featurizer, check_finite_features
from ..fingerprint import model_fingerprint
from ..gradients.timesteps import timestep_features, uniform_timesteps
from ..result import AttributionResult
from ..store.format import FeatureStore
from ..store.writer import finish_store
from .base import Method, register_method

TRACIN_METHODS = ("tracin", "retrac")


class _TracInMethod(Method):
    """TracIn's defaults (METHODS.md): each training gradient at one random timestep; the query gradient over
    100 evenly spaced timesteps × 16 noises."""

    default_output = "loss"
    defaults = {"num_timesteps": 1, "timestep_schedule": "random", "query_timesteps": 100, "query_noise_draws": 16}
    reads = ("checkpoints", "learning_rates", "query_timesteps", "query_noise_draws", "noise_draws")

    def featurizer(self, pipe, config, store=None, **options):
        return TracInFeaturizer(pipe, config, **options)

    def scorer(self, store, damping=None, damping_ratio=None):
        return TracInScorer.from_store(store)


@register_method
class TracIn(_TracInMethod):
    name = "tracin"
    title = "Diffusion-TracIn (Xie et al., 2024)"


@register_method
class ReTrac(_TracInMethod):
    name = "retrac"
    title = "Diffusion-ReTrac (Xie et al., 2024)"


class TracInFeaturizer:
    """Training and query features of TracIn / ReTrac, one block of k columns per checkpoint.

    `checkpoints` overrides `config.checkpoints` (and may hold in-memory state dicts or modules).
    """

    def __init__(self, pipe, config: AttributionConfig, checkpoints: Sequence | None = None):
        if config.method not in TRACIN_METHODS:
            raise ValueError(f"TracInFeaturizer needs method 'tracin' or 'retrac', not {config.method!r}")
        self.base = Featurizer(pipe, config)
        self.config = config
        self.adapter = self.base.adapter
        specs = checkpoints if checkpoints is not None else config.checkpoints
        if checkpoints is not None and config.checkpoints not in (None, [describe(c) for c in checkpoints]):
            raise ValueError("checkpoints= differ from config.checkpoints; pass one or the other")
        self.checkpoints = CheckpointSet(specs, pipe, self.adapter.denoiser, list(self.base.parameters))
        self.normalize = config.method == "retrac"
        self.block_dim = self.base.projector.dim
        self.dim = len(self.checkpoints) * self.block_dim
        self._fingerprints: dict[int, dict[str, str]] = {}

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

    def featurize_dataset(self, dataset: Any, progress: bool = True, **store_options) -> FeatureStore:
        """Φ [N, C·k]: each training example's gradient at its K sampled timesteps (`noise_draws` noises each).

        `store_options`: `output_dir` (the store is written there once computed), `shard_rows`, `max_shard_size`.
        """
        config = self.config
        data = as_training_data(dataset, config.image_column, config.caption_column)
        n, size, k = len(data), config.batch_size, self.block_dim
        starts = list(range(0, n, size))
        features = torch.empty(n, self.dim, dtype=torch.float32)
        hashes: list[str] = []

        def groups():  # the training batches, read again for every checkpoint
            for indices, images, captions, batch_hashes in training_batches(data, 0, n, size, self.adapter.validate_images):
                if len(hashes) < n:
                    hashes.extend(batch_hashes)
                inputs = self.adapter.encode(images, list(captions), indices, config.noise_seed)
                yield inputs, indices, self.base.task.timesteps(indices)  # [B, K], seeded per example

        bar = tqdm(total=len(self.checkpoints) * len(starts), desc=f"featurize ({config.method})", unit="batch",
                   disable=not progress)
        for c, g, block in self._blocks(groups, self.base.task.noise_draws):
            start = starts[g]
            features[start : start + len(block), c * k : (c + 1) * k] = block
            bar.update(1)
        bar.close()
        check_finite_features(features, self.base)
        metadata = {**self.metadata(), "num_examples": n, "example_hashes": hashes}
        return finish_store(FeatureStore(features, config, metadata), **store_options)

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


class TracInScorer:
    """τ = Σ_c η_c Q_c Φ_cᵀ over the per-checkpoint column blocks of query features Q and training features Φ."""

    def __init__(self, train_features: torch.Tensor, learning_rates: Sequence[float] | None, num_checkpoints: int):
        if train_features.shape[1] % num_checkpoints:
            raise ValueError(f"{train_features.shape[1]} feature columns do not split into {num_checkpoints} blocks")
        self.train_features = train_features.double()
        self.learning_rates = [1.0] * num_checkpoints if learning_rates is None else [float(x) for x in learning_rates]
        if len(self.learning_rates) != num_checkpoints:
            raise ValueError(f"{len(self.learning_rates)} learning rates for {num_checkpoints} checkpoints")
        self.block = train_features.shape[1] // num_checkpoints

    @classmethod
    def from_store(cls, store: FeatureStore) -> "TracInScorer":
        checkpoints = store.metadata.get("checkpoints") or store.config.checkpoints
        return cls(store.features, store.config.learning_rates, len(checkpoints) if checkpoints else 1)

    @property
    def metadata(self) -> dict[str, Any]:
        return {"learning_rates": self.learning_rates}

    def scores(self, query_features: torch.Tensor) -> torch.Tensor:
        """τ [n, N] float32."""
        q = query_features.double().to(self.train_features.device)
        weights = torch.tensor(self.learning_rates, dtype=torch.float64, device=q.device)
        q = q * weights.repeat_interleave(self.block)[None]
        return (q @ self.train_features.T).float().cpu()


def tracin_scores(
    pipe,
    train_dataset: Any,
    images: Any,
    checkpoints: Sequence | None = None,
    learning_rates: Sequence[float] | None = None,
    config: AttributionConfig | None = None,
    *,
    prompts: Sequence[str] | str | None = None,
    progress: bool = True,
) -> AttributionResult:
    """Diffusion-TracIn (or ReTrac with `config.method="retrac"`) scores [n_queries, N] of `images`.

    `train_dataset`: a training set, or a `FeatureStore` featurized by the same method and checkpoints.
    `checkpoints`: state dicts, modules, paths or dicts (checkpoints.py); None = `config.checkpoints`,
    else the pipeline's current weights. `learning_rates`: η_c (None = `config.learning_rates`, else all 1).
    """
    config = config or AttributionConfig(method="tracin")
    if config.method not in TRACIN_METHODS:
        raise ValueError(f"tracin_scores needs method 'tracin' or 'retrac', not {config.method!r}")
    specs = list(checkpoints) if checkpoints is not None else config.checkpoints
    rates = list(learning_rates) if learning_rates is not None else config.learning_rates
    if checkpoints is not None:
        config = dataclasses.replace(config, checkpoints=[describe(spec) for spec in specs], learning_rates=rates)
    elif learning_rates is not None:
        config = dataclasses.replace(config, learning_rates=rates)
    featurizer = TracInFeaturizer(pipe, config, checkpoints=specs)
    if isinstance(train_dataset, FeatureStore):
        store = train_dataset
        store.check_compatible(config, featurizer.metadata())
    else:
        store = featurizer.featurize_dataset(train_dataset, progress=progress)
    scorer = TracInScorer(store.features, config.learning_rates, len(featurizer.checkpoints))
    return AttributionResult(
        scores=scorer.scores(featurizer.featurize_queries(images, prompts)),
        config=config,
        query_images=to_image_batch(images),
        metadata={**scorer.metadata, "example_hashes": store.example_hashes},
    )


def retrac_scores(pipe, train_dataset, images, checkpoints=None, learning_rates=None, config=None, **kwargs):
    """`tracin_scores` with `method="retrac"` (normalized per-timestep gradients)."""
    config = dataclasses.replace(config, method="retrac") if config else AttributionConfig(method="retrac")
    return tracin_scores(pipe, train_dataset, images, checkpoints, learning_rates, config, **kwargs)
