"""`Featurizer`: the featurization loop, examples → x0 and conditioning → projected averaged gradients φ(z) [N, k].

Everything fixed for one (pipeline, config) — adapter, task, parameters, projector — is built once; the training
set is read in batches (`data.training_batches`), and queries go through the same `features` call.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .adapters import PipelineAdapter, get_adapter
from .config import AttributionConfig
from .data import TrainingData, as_training_data, query_batch, training_batches
from .distributed import ProcessGroup, launched_with_several_processes
from .fingerprint import model_fingerprint
from .gradients.task import AttributionTask, gradients_only_for, select_parameters
from .projection.base import Projector
from .projection.registry import make_projector
from .store.format import DEFAULT_MAX_SHARD_SIZE, FeatureStore
from .version import __version__


class NonFiniteFeaturesError(ValueError):
    """A training example or query whose features came out NaN or infinite (a broken weight or gradient)."""


def check_finite_features(features: torch.Tensor, featurizer: "Featurizer | None" = None) -> None:
    """`NonFiniteFeaturesError` naming the first training example (row) with a NaN / Inf feature, and the
    denoiser's non-finite weight if `featurizer` finds one (for featurizers that do not go through `features`)."""
    if torch.isfinite(features).all():
        return
    row = int((~torch.isfinite(features)).any(1).nonzero()[0])
    what = f"example {row} has NaN or infinite features"
    if featurizer is not None:
        featurizer._check_weights(what)
    raise NonFiniteFeaturesError(what)


class Featurizer:
    """Everything fixed for one (pipeline, config): adapter, task, parameters, projector.

    A calibrated factored projection (`config.calibration_examples > 0`, projection/calibrated.py) is measured on the
    training set by `featurize_dataset`, or taken from a store (`projection_state=store.projection_state`, and
    `projection_spec=store.metadata["projection"]`, which says which version of the projection made it).
    """

    def __init__(self, pipe, config: AttributionConfig, projection_state: dict[str, torch.Tensor] | None = None,
                 projection_spec: dict[str, Any] | None = None):
        if config.device is not None:
            pipe.to(config.device)
        self.config = config
        self.adapter: PipelineAdapter = get_adapter(pipe)
        self.task = AttributionTask(self.adapter, config)
        self.parameters = select_parameters(self.adapter.denoiser, config)
        self.projector: Projector = make_projector(config, self.adapter.denoiser, self.parameters)
        if projection_state is not None:
            self.projector.load_state_dict(projection_state, projection_spec)

    def fit_projection(self, data: TrainingData, progress: bool = False) -> None:
        """Fit a projector fitted on data (the calibrated bases) on the training examples it picks; `progress`:
        a progress bar per pass (calibration is most of a small training set's featurization time)."""
        config = self.config
        self._check_weights()
        indices, size = self.projector.fit_examples(len(data)), self.projector.fit_batch_size
        batches = []
        for start in range(0, len(indices), size):
            chunk = indices[start : start + size]
            images, captions = data.batch(chunk)
            self.adapter.validate_images(images, f"training examples {chunk[0]}..{chunk[-1]}")
            batches.append((self.adapter.encode(images, list(captions), chunk, config.noise_seed), chunk))
        with gradients_only_for(self.adapter.denoiser, self.parameters):
            self.projector.fit(self.task, self.parameters, batches, progress=progress)

    def fit_identity(self, data: TrainingData) -> dict[str, Any]:
        """What a fitted projection depends on: the feature config, the attributed weights, the examples it saw."""
        return {"feature_hash": self.config.feature_hash(),
                "model_fingerprint": model_fingerprint(self.adapter.denoiser, self.parameters)["attributed"],
                "examples": {str(i): data.example_hash(i) for i in self.projector.fit_examples(len(data))}}

    def metadata(self) -> dict[str, Any]:
        """What a store records so that queries are only ever scored against compatible features."""
        return {
            "package_version": __version__,
            "pipeline": type(self.adapter.pipe).__name__,
            "family": self.adapter.family,
            "projection": self.projector.spec(),
            "model_fingerprint": model_fingerprint(self.adapter.denoiser, self.parameters),
            "base_model": str(getattr(self.adapter.pipe, "name_or_path", None) or "") or None,
            "lora_adapters": sorted(getattr(self.adapter.denoiser, "peft_config", None) or []),
        }

    def features(self, images: torch.Tensor, captions: Sequence[str | None], keys: Sequence) -> torch.Tensor:
        """φ [B, k] float32 on the CPU for one batch of images [B, C, H, W] in [-1, 1]."""
        inputs = self.adapter.encode(images, list(captions), list(keys), self.config.noise_seed)
        with gradients_only_for(self.adapter.denoiser, self.parameters):
            features = self.projector.features(self.task, self.parameters, inputs, list(keys)).float().cpu()
            if not torch.isfinite(features).all():
                self._explain_non_finite(features, inputs, list(keys))
        return features

    def partial_features(self, images: torch.Tensor, captions: Sequence[str | None], keys: Sequence) -> torch.Tensor:
        """`projector.partial_features` of one batch, on the model's device (`projector.finish` gives φ); not
        checked for non-finite values (`featurize_rows` checks each finished block)."""
        inputs = self.adapter.encode(images, list(captions), list(keys), self.config.noise_seed)
        with gradients_only_for(self.adapter.denoiser, self.parameters):
            return self.projector.partial_features(self.task, self.parameters, inputs, list(keys))

    def _explain_non_finite(self, features: torch.Tensor, inputs, keys: list) -> None:
        """Raise `NonFiniteFeaturesError` naming the first example with a NaN / Inf feature and, found only now (a
        non-finite weight, else that example's autograd gradient per parameter), the parameter it comes from."""
        from .gradients.reference import per_example_gradients

        row = int((~torch.isfinite(features)).any(1).nonzero()[0])
        what = f"example {keys[row]!r} has NaN or infinite features"
        self._check_weights(what)
        example = type(inputs)(inputs.x0[row : row + 1], {k: v[row : row + 1] for k, v in inputs.conditioning.items()})
        gradients = per_example_gradients(self.task, self.parameters, example, [keys[row]])
        bad = [name for name, g in gradients.items() if not torch.isfinite(g).all()]
        raise NonFiniteFeaturesError(f"{what}: " + (f"the gradient of parameter {bad[0]} is not finite" if bad
                                                     else "its gradient is finite; the projection made it non-finite"))

    def _check_weights(self, what: str = "cannot featurize") -> None:
        """`NonFiniteFeaturesError` naming the denoiser's first NaN / Inf weight, if it has one."""
        weights = [name for name, p in self.adapter.denoiser.named_parameters() if not torch.isfinite(p).all()]
        if weights:
            more = f" (and {len(weights) - 1} more)" if len(weights) > 1 else ""
            raise NonFiniteFeaturesError(f"{what}: the denoiser's weight {weights[0]}{more} is not finite")

    def featurize_dataset(
        self,
        dataset: Any,
        progress: bool = True,
        *,
        output_dir: str | os.PathLike | None = None,
        accelerator: Any = None,
        shard_rows: int | None = None,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        compute_kernel: bool = True,
        dataset_name: str | None = None,
    ) -> FeatureStore:
        """Φ [N, k] of `dataset`: in memory, or written shard by shard into `output_dir` (resumable).

        With `output_dir`, finished shards found there are kept (after checking they come from the same
        model, config and examples) and only the missing ones are computed; under `accelerate launch` or
        with an `accelerator`, each process computes its share of the missing shards and the main process
        writes config.json, the kernel (`compute_kernel`) and the card once all have finished.
        """
        data = self.training_data(dataset)
        name = dataset_name or _dataset_name(dataset)
        if output_dir is None:
            if accelerator is not None:
                raise ValueError("featurizing in several processes needs output_dir=: each process writes its shards there")
            if launched_with_several_processes():
                warnings.warn("several processes are running but no output_dir= was given: each computes every "
                              "feature; pass output_dir= to share the work", stacklevel=3)
            if not self.projector.fitted:
                self.fit_projection(data, progress)
            bar = tqdm(total=len(data), desc="featurize", unit="example", disable=not progress)
            features, hashes = self.featurize_rows(data, 0, len(data), bar)
            bar.close()
            metadata = {**self.metadata(), "num_examples": len(data), "dataset_name": name, "example_hashes": hashes}
            return FeatureStore(features, self.config, metadata, projection_state=self.projector.state_dict())
        from .store.writer import featurize_to_directory

        return featurize_to_directory(
            self, data, Path(output_dir), ProcessGroup(accelerator), shard_rows=shard_rows,
            max_shard_size=max_shard_size, compute_kernel=compute_kernel, progress=progress, dataset_name=name,
        )

    def training_data(self, dataset: Any) -> TrainingData:
        return as_training_data(dataset, self.config.image_column, self.config.caption_column)

    def featurize_rows(self, data: TrainingData, start: int, stop: int, bar=None) -> tuple[torch.Tensor, list[str]]:
        """(φ [stop - start, k], content hashes) of examples [start, stop), in batches counted from `start`.

        Batches always start at `start` (a shard's first row), so a shard's features never depend on
        which process computes it or on whether the run was resumed. The partial features stay on the device
        until `projector.finish_rows` of them are finished together (one copy to the CPU per block); a block
        with a non-finite value is explained by featurizing its first such example again on its own.
        """
        features = torch.empty(stop - start, self.projector.dim, dtype=torch.float32)
        hashes: list[str] = []
        pending: list[torch.Tensor] = []
        done = start  # rows before `done` are finished
        batches = training_batches(data, start, stop, self.config.batch_size, self.adapter.validate_images)
        own_features = type(self).features is not Featurizer.features  # a method's featurizer (DAS, Fisher)
        with gradients_only_for(self.adapter.denoiser, self.parameters):  # once, not per batch
            for indices, images, captions, batch_hashes in batches:
                hashes.extend(batch_hashes)
                if own_features:  # its `features` is φ itself, batch by batch
                    features[indices[0] - start : indices[-1] + 1 - start] = self.features(images, captions, indices)
                else:
                    pending.append(self.partial_features(images, captions, indices))
                if pending and (indices[-1] + 1 - done >= self.projector.finish_rows or indices[-1] + 1 == stop):
                    block = self.projector.finish(torch.cat(pending)).float().cpu()
                    if not torch.isfinite(block).all():
                        row = done + int((~torch.isfinite(block)).any(1).nonzero()[0])
                        self.features(*data.batch([row]), [row])  # raises NonFiniteFeaturesError, naming the cause
                        raise NonFiniteFeaturesError(f"example {row!r} has NaN or infinite features in its batch")
                    features[done - start : done - start + len(block)] = block
                    done, pending = done + len(block), []
                if bar is not None:
                    bar.update(len(indices))
        return features, hashes

    def featurize_queries(self, images: Any, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        """φ [n, k] for query images; query i uses the example key `"query:i"` for per-example noise."""
        batch, prompts = query_batch(images, prompts, self.adapter.validate_images)
        out = []
        for start in range(0, len(batch), self.config.batch_size):
            stop = min(start + self.config.batch_size, len(batch))
            keys = [f"query:{i}" for i in range(start, stop)]
            out.append(self.features(batch[start:stop], prompts[start:stop], keys))
        return torch.cat(out)


def _dataset_name(dataset: Any) -> str | None:
    """The `datasets.Dataset`'s own name, if it has one (for the store card)."""
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) if info is not None else None
