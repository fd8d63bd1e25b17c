"""Featurization: one loop that owns the order for every method, and the gradient featurizer.

    data → adapter → task (training output) → projector → per-(t, ε) reduction → method state → writer

`featurize(featurizer, dataset, ...)` runs, for any featurizer (the gradient `Featurizer` below, TracIn's
per-checkpoint one, the similarity baselines'): fit what the featurizer fits on data (saved first, so a resumed
or second process uses the same), the features and state of each range of rows (a shard), `combine` of the
states, then hands tensors, named state and the method's facts to the writer (store/writer.py), in memory or
into a folder (resumable; each process its share of the shards under accelerate). The writer never sees a
featurizer.

A featurizer offers: `config`, `dim`, `fits_on_data`, `fit_examples(data)` (the rows `fit` reads),
`fit(data, progress) -> fitted`, `load_fitted(fitted)`, `fit_identity(data)`, `row_passes` (how often `rows` reads
a row), `rows(data, start, stop, bar) -> (φ [rows, k], example hashes, state or None)`,
`combine(states)`, `method_state(fitted)`, `metadata()`, `facts()`, `featurize_queries(images, prompts)`.
`fitted` is {"projection": the projector's state, "method": what the method fitted with it}, each possibly None.
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
from .data import (ImageFolder, StreamError, TrainingData, as_training_data, content_hash, query_batch,
                   training_batches)
from .distributed import ProcessGroup, launched_with_several_processes
from .fingerprint import model_fingerprint
from .gradients.queries import QuerySamples
from .gradients.task import AttributionTask, gradients_only_for, select_parameters
from .gradients.timesteps import PointTask, timestep_features
from .projection.base import Projector
from .projection.registry import make_projector
from .store.writer import DEFAULT_MAX_SHARD_SIZE, DirectoryWriter, memory_store
from .version import __version__


class NonFiniteFeaturesError(ValueError):
    """A training example or query whose features came out NaN or infinite (a broken weight or gradient)."""


def check_finite_features(features: torch.Tensor, first_row: int = 0) -> None:
    """`NonFiniteFeaturesError` naming the first example (row, counted from `first_row`) with a NaN / Inf feature."""
    if torch.isfinite(features).all():
        return
    row = first_row + int((~torch.isfinite(features)).any(1).nonzero()[0])
    raise NonFiniteFeaturesError(f"example {row} has NaN or infinite features")


class RowBuffer:
    """Rows [start, stop) of features, put in blocks: allocated once when `stop` is known, else the blocks are
    kept and joined at the end (a stream read to its end)."""

    def __init__(self, start: int, stop: int | None, dim: int):
        self.start = start
        self.rows = torch.empty(stop - start, dim, dtype=torch.float32) if stop is not None else None
        self.blocks: list[torch.Tensor] = []
        self.dim = dim

    def put(self, first: int, block: torch.Tensor) -> None:
        if self.rows is not None:
            self.rows[first - self.start : first - self.start + len(block)] = block
        else:
            self.blocks.append(block.float())

    def result(self) -> torch.Tensor:
        if self.rows is not None:
            return self.rows
        return torch.cat(self.blocks) if self.blocks else torch.empty(0, self.dim)


# ---------------------------------------------------------------------------------------------- the loop


def featurize(featurizer, dataset: Any, progress: bool = True, *, output_dir: str | os.PathLike | None = None,
              accelerator: Any = None, shard_rows: int | None = None,
              max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, compute_kernel: bool | None = None,
              dataset_name: str | None = None, num_examples: int | None = None):
    """Φ [N, k] of `dataset` with `featurizer`: in memory, or written shard by shard into `output_dir` (resumable).

    With `output_dir`, finished shards found there are kept (after checking they come from the same model,
    config and examples) and only the missing ones are computed; under `accelerate launch` or with an
    `accelerator`, each process computes its share of the missing shards and the main process writes the
    method state, config.json, the kernel (`compute_kernel`; default: the method's facts say) and the card.

    A stream (`data.StreamedTrainingData`: a `datasets.IterableDataset`, an `ImageFolder`, a generator) is read
    in order, once per pass, one batch at a time. `num_examples`: its length when it does not say it (a folder
    and a dataset whose `info.splits` has the count do); needed with `output_dir` (the shard plan) and by a
    projection fitted on data (it picks its fit examples out of all N), not otherwise.
    """
    data = featurizer.training_data(dataset, num_examples=num_examples)
    facts = featurizer.facts()
    keep_kernel = facts["kernel"] if compute_kernel is None else compute_kernel
    name = dataset_name or _dataset_name(dataset)
    fit = featurizer.fits_on_data and (output_dir is not None or not featurizer.fitted)
    if data.streamed:
        _check_stream(data, fit, output_dir, featurizer.row_passes)
    if output_dir is None:
        if accelerator is not None:
            raise ValueError("featurizing in several processes needs output_dir=: each process writes its shards there")
        if launched_with_several_processes():
            warnings.warn("several processes are running but no output_dir= was given: each computes every "
                          "feature; pass output_dir= to share the work", stacklevel=3)
        if fit:
            with data.pinned(featurizer.fit_examples(data)):
                featurizer.fit(data, progress)
        total = data.num_examples if data.streamed else len(data)
        bar = tqdm(total=total, desc="featurize", unit="example", disable=not progress)
        features, hashes, state = featurizer.rows(data, 0, total, bar)
        bar.close()
        data.check_end()
        fitted = featurizer.fitted_state()
        method_state = featurizer.method_state(fitted, None if state is None else [state])
        metadata = {**featurizer.metadata(), "num_examples": len(data), "dataset_name": name, "example_hashes": hashes}
        return memory_store(features, featurizer.config, metadata, facts, projection_state=fitted.get("projection"),
                            method_state=method_state)
    group = ProcessGroup(accelerator)
    if group.device is not None and featurizer.config.device is None:
        featurizer.to(group.device)
    writer = DirectoryWriter(Path(output_dir), group, featurizer.config, len(data), featurizer.dim,
                             shard_rows=shard_rows, max_shard_size=max_shard_size)
    with writer.locked(featurizer.fingerprint()):
        if featurizer.fits_on_data:
            with data.pinned(featurizer.fit_examples(data)):
                _fit_in_directory(featurizer, data, writer, group, progress and group.is_main)
        metadata = {**featurizer.metadata(), "num_examples": len(data), "dim": featurizer.dim, "dataset_name": name}
        done, pending, complete = writer.begin(metadata)
        checks = group.share(done)  # finished shards must hold these very examples
        if not data.streamed or not pending:  # random access: all checked first
            for entry in checks:
                _check_examples(writer.recorded_hashes(entry), data, entry, writer.directory)
            checks = []
        if complete and not pending:
            group.barrier()
            return writer.open()
        mine = group.share(pending)
        if group.is_main and done and progress:
            print(f"featurize: resuming {output_dir}: {len(done)} of {len(done) + len(pending)} shards already done")
        bar = tqdm(total=sum(e["stop"] - e["start"] for e in mine), unit="example",
                   disable=not (progress and group.is_main),
                   desc="featurize" if group.world == 1 else f"featurize (process 0 of {group.world})")
        # A stream is read once, in order: this process's finished shards are checked where the read reaches them,
        # the rows of shards other processes compute are passed over.
        work = sorted([(entry, False) for entry in checks] + [(entry, True) for entry in mine],
                      key=lambda item: item[0]["start"])
        for entry, compute in work:
            if not compute:
                _check_examples(writer.recorded_hashes(entry), data, entry, writer.directory)
                continue
            features, hashes, state = featurizer.rows(data, entry["start"], entry["stop"], bar)
            if entry["stop"] == len(data):
                data.check_end()
            writer.write_shard(entry, features, hashes, state)
        bar.close()
        group.barrier()
        method_state = None
        if group.is_main:
            states = writer.read_states() if featurizer.collects_state else None
            method_state = featurizer.method_state(featurizer.fitted_state(), states)
        return writer.finish(facts, method_state=method_state, compute_kernel=keep_kernel)


def _check_stream(data, fit: bool, output_dir, row_passes: int) -> None:
    """Refuse, before anything is read past the first example, what a stream cannot give: a length it does not say
    (needed by a projection fitted on data and by the shard plan of `output_dir`), a second pass of a one-time
    iterator (a fit reads its examples first; TracIn reads each range once per checkpoint)."""
    if row_passes > 1 and data.one_shot:
        raise StreamError(
            f"TracIn and ReTrac read each range of rows once per checkpoint ({row_passes}); a one-time iterator "
            f"({type(data.dataset).__name__}) can be read only once: pass something that can be iterated again (a "
            "list, an ImageFolder, a datasets (Iterable)Dataset)")
    if data.num_examples is None and fit:
        raise StreamError(
            "this projection is fitted on training examples picked out of all N (the calibrated factored projection: "
            "calibration_examples > 0), and the length of this stream is unknown: pass num_examples=N, or use a "
            "seeded projection (calibration_examples=0, or projector='gaussian')")
    if data.num_examples is None and output_dir is not None:
        raise StreamError("a store written into output_dir= plans its shards from the number of examples, and the "
                          "length of this stream is unknown: pass num_examples=N, or featurize it in memory")
    if fit and data.one_shot:
        raise StreamError(
            f"this projection is fitted on training examples before any is featurized, so the training set is read "
            f"twice; a one-time iterator ({type(data.dataset).__name__}) can be read only once: pass something that "
            "can be iterated again (a list, an ImageFolder, a datasets (Iterable)Dataset), or use a seeded "
            "projection (calibration_examples=0, or projector='gaussian')")


def _fit_in_directory(featurizer, data: TrainingData, writer: DirectoryWriter, group: ProcessGroup,
                      progress: bool) -> None:
    """What the featurizer fits on data (the calibrated bases, EK-FAC's Λ): the one saved in the folder (a resumed
    run), or fitted on the main process and saved there first; every process then uses the saved one. A saved
    fit for another config, model or examples is refused."""
    failure = None
    if group.is_main:  # only the main process reads the fit examples (of a stream: a pass of its own)
        try:
            identity = featurizer.fit_identity(data)
            if not writer.has_fitted(identity):
                writer.write_fitted(featurizer.fit(data, progress), identity)
        except Exception as error:  # sent to every process, so that none waits for a main process that failed
            failure = error
    group.settle(failure)
    featurizer.load_fitted(writer.read_fitted())


def _check_examples(recorded: list[str], data: TrainingData, entry: dict, directory: Path) -> None:
    """`StoreMismatchError` unless a finished shard's recorded example hashes are those of `data`'s rows."""
    from .store.writer import StoreMismatchError

    for offset, expected in enumerate(recorded):
        index = entry["start"] + offset
        if data.example_hash(index) != expected:
            raise StoreMismatchError(
                f"training example {index} differs from the one featurized into {directory / entry['file']}: the "
                "dataset changed. Use another output_dir, or delete it to start over")


def _dataset_name(dataset: Any) -> str | None:
    """The `datasets.Dataset`'s own name, if it has one, or an `ImageFolder`'s (for the store card)."""
    if isinstance(dataset, ImageFolder):
        return dataset.dataset_name
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) if info is not None else None


# ---------------------------------------------------------------------------------------------- featurizers


class FeaturizerBase:
    """What every featurizer shares: the loop (`featurize_dataset`), training data, and the defaults of a
    featurizer that fits nothing on data and collects no state. `method`: the `Method` whose parts it runs."""

    config: AttributionConfig
    method: Any = None
    fits_on_data = False
    fitted = True
    collects_state = False
    row_passes = 1  # how many times `rows` reads each row of its range

    def featurize_dataset(self, dataset: Any, progress: bool = True, **options):
        """`featurize(self, dataset, progress, **options)`: the store of a training set."""
        return featurize(self, dataset, progress, **options)

    def training_data(self, dataset: Any, num_examples: int | None = None) -> TrainingData:
        return as_training_data(dataset, self.config.image_column, self.config.caption_column, num_examples)

    def fit_examples(self, data: TrainingData) -> list[int]:
        """The rows `fit` reads (kept while it reads them: a stream reads them once)."""
        return []

    def to(self, device) -> None:
        """Move the model featurized (under accelerate: this process's device)."""

    def fingerprint(self) -> dict | None:
        """What a folder's writer lock records about the model (None: no model)."""
        return None

    def fit(self, data: TrainingData, progress: bool = False) -> dict:
        raise NotImplementedError

    def load_fitted(self, fitted: dict) -> None:
        raise NotImplementedError

    def fitted_state(self) -> dict:
        return {}

    def fit_identity(self, data: TrainingData) -> dict:
        return {}

    def method_state(self, fitted: dict, states: list[dict] | None) -> dict | None:
        """The store's method state: `combine` of the row ranges' states, else what the method fitted, if any."""
        if states is not None:
            return self.method.combine(states)
        return fitted.get("method")

    def facts(self) -> dict[str, Any]:
        """The method's facts the writer records (`Method.facts`)."""
        return self.method.facts()


class _PlainGradients:
    """The parts of a plain kernel method (TRAK's): the averaged gradient of `config.output`, projected once, with
    the projector `config.projector` names; no state. Used when a `Featurizer` is built without a method."""

    name = None
    records: tuple[str, ...] = ()
    reduction = "mean"
    query_reduction = None
    title = None

    def projector(self, config, denoiser, parameters):
        return make_projector(config, denoiser, parameters)

    def collector(self, featurizer):
        return None

    def facts(self) -> dict[str, Any]:
        return {"title": None, "fingerprints": ["model_fingerprint"], "kernel": True}


class Featurizer(FeaturizerBase):
    """The gradient featurizer: adapter, task, parameters and projector of one (pipeline, config), running the
    declared parts of `method` (methods/base.py: training output, records, reduction, projector, state).

        "mean":        φ = P (1/(K·D)) Σ_{t,d} ∇θ f(z, t, ε_{t,d})           one projection of the averaged gradient
        "pairs":       φ = (1/(K·D)) Σ_{t,d} P ∇θ f(z, t, ε_{t,d})           each (t, ε) pair projected (state sees ψ)
        "unit-pairs":  φ = (1/(K·D)) Σ_{t,d} ψ_{t,d} / ‖ψ_{t,d}‖              ψ = P ∇θ f(z, t, ε_{t,d})

    `fitted`: a store's fitted state ({"projection": bases, "method": ...}), for queries against that store
    (`projection_state` / `projection_spec`: the projection's alone, as 0.2 took them).
    """

    def __init__(self, pipe, config: AttributionConfig, method: Any = None, fitted: dict | None = None, *,
                 projection_state: dict[str, torch.Tensor] | None = None, projection_spec: dict[str, Any] | None = None):
        if config.device is not None:
            pipe.to(config.device)
        self.config = config
        self.method = method if method is not None else _PlainGradients()
        self.adapter: PipelineAdapter = get_adapter(pipe)
        self.task = AttributionTask(self.adapter, config)
        self.parameters = select_parameters(self.adapter.denoiser, config)
        self.projector: Projector = self.method.projector(config, self.adapter.denoiser, self.parameters)
        self._point_task: PointTask | None = None
        if projection_state is not None:
            fitted = {**(fitted or {}), "projection": projection_state, "projection_spec": projection_spec}
        self._fitted_method: dict | None = None
        if fitted is not None:
            self.load_fitted(fitted)

    # ------------------------------------------------------------------------------------ declared facts

    @property
    def dim(self) -> int:
        return self.projector.dim

    @property
    def fits_on_data(self) -> bool:
        return self.projector.fits_on_data

    @property
    def fitted(self) -> bool:
        return self.projector.fitted

    @property
    def collects_state(self) -> bool:
        return self.method.collector(self) is not None

    def to(self, device) -> None:
        self.adapter.pipe.to(device)

    def fingerprint(self) -> dict:
        return model_fingerprint(self.adapter.denoiser, self.parameters)

    def metadata(self) -> dict[str, Any]:
        """What a store records so that queries are only ever scored against compatible features."""
        return {
            "package_version": __version__,
            "pipeline": type(self.adapter.pipe).__name__,
            "family": self.adapter.family,
            "projection": self.projector.spec(),
            "model_fingerprint": self.fingerprint(),
            "base_model": str(getattr(self.adapter.pipe, "name_or_path", None) or "") or None,
            "lora_adapters": sorted(getattr(self.adapter.denoiser, "peft_config", None) or []),
        }

    # ------------------------------------------------------------------------------------ fit

    def fit(self, data: TrainingData, progress: bool = False) -> dict:
        """Fit the projector on the training examples it picks (the calibrated bases; EK-FAC's bases and Λ);
        returns the fitted state. `progress`: a progress bar per pass."""
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
        return self.fitted_state()

    def fit_examples(self, data: TrainingData) -> list[int]:
        return self.projector.fit_examples(len(data)) if self.fits_on_data else []

    def fit_projection(self, data: TrainingData, progress: bool = False) -> None:
        """Fit the projector on `data` (`fit` fits it in place; its returned state is for saving)."""
        self.fit(data, progress)

    def fitted_state(self) -> dict:
        """{"projection": the projector's fitted state, "method": what the method fitted with it (EK-FAC's Λ)}."""
        fit_state = getattr(self.method, "fit_state", None)
        return {"projection": self.projector.state_dict(),
                "method": fit_state(self) if fit_state is not None and self.projector.fitted else self._fitted_method}

    def load_fitted(self, fitted: dict) -> None:
        if fitted.get("projection") is not None:
            self.projector.load_state_dict(fitted["projection"], fitted.get("projection_spec"))
        load = getattr(self.method, "load_fit_state", None)
        if fitted.get("method") is not None and load is not None:
            load(self, fitted["method"])
            self._fitted_method = fitted["method"]

    def fit_identity(self, data: TrainingData) -> dict[str, Any]:
        """What a fitted projection depends on: the feature config, the attributed weights, the examples it saw."""
        return {"feature_hash": self.config.feature_hash(),
                "model_fingerprint": self.fingerprint()["attributed"],
                "examples": {str(i): data.example_hash(i) for i in self.projector.fit_examples(len(data))}}

    # ------------------------------------------------------------------------------------ features

    def features(self, images: torch.Tensor, captions: Sequence[str | None], keys: Sequence,
                 collector=None, reduction: str | None = None, samples: QuerySamples | None = None) -> torch.Tensor:
        """φ [B, k] float32 on the CPU for one batch of images [B, C, H, W] in [-1, 1], reduced as `reduction`
        (default: the method's query reduction); `collector`: the method's state, fed from the same passes;
        `samples`: the queries' own (t, ε) samples instead of the training set's (gradients/queries.py)."""
        inputs = self.adapter.encode(images, list(captions), list(keys), self.config.noise_seed)
        reduction = reduction or self.method.query_reduction or self.method.reduction
        with gradients_only_for(self.adapter.denoiser, self.parameters):
            if reduction == "mean":
                task = self.task if samples is None else samples.task()
                features = self.projector.features(task, self.parameters, inputs, list(keys)).float().cpu()
            else:
                features = self.pair_features(inputs, list(keys), reduction == "unit-pairs", collector, samples)
            if not torch.isfinite(features).all():
                self._explain_non_finite(features, inputs, list(keys))
        return features

    def pair_features(self, inputs, keys: list, normalize: bool, collector=None,
                      samples: QuerySamples | None = None) -> torch.Tensor:
        """φ [B, k] from each (t, ε) pair's projected gradient ψ (gradients/timesteps.py), normalized or not; the
        collector sees every chunk of ψ (`on_pairs`) and the recorded outputs of each pair (`on_records`).
        `samples`: the queries' own (t, ε) samples (gradients/queries.py) instead of the training set's pairs."""
        task = self._pair_task() if samples is None else samples.point_task()
        core = self.task if samples is None else samples.task()
        task.records = {name: [] for name in self.method.records} if collector is not None else None
        try:
            features = timestep_features(self, inputs, keys, core.timesteps(keys), core.noise_draws,
                                         normalize=normalize, rows_per_pass=self.config.batch_size * self.task.num_columns,
                                         on_rows=getattr(collector, "on_pairs", None), task=task).features
            if task.records:
                collector.on_records({name: torch.cat(rows).double().cpu().view(len(keys), -1)
                                      for name, rows in task.records.items()})
        finally:
            task.records = None
        return features

    def _pair_task(self) -> PointTask:
        """One `PointTask` for every batch: its shared-mode noise is drawn once."""
        if self._point_task is None:
            self._point_task = PointTask(self.adapter, self.config)
        return self._point_task

    def partial_features(self, images: torch.Tensor, captions: Sequence[str | None], keys: Sequence) -> torch.Tensor:
        """`projector.partial_features` of one batch, on the model's device (`projector.finish` gives φ); not
        checked for non-finite values (`rows` checks each finished block)."""
        inputs = self.adapter.encode(images, list(captions), list(keys), self.config.noise_seed)
        with gradients_only_for(self.adapter.denoiser, self.parameters):
            return self.projector.partial_features(self.task, self.parameters, inputs, list(keys))

    def rows(self, data: TrainingData, start: int, stop: int, bar=None):
        """(φ [stop - start, k], content hashes, state or None) of examples [start, stop), in batches counted from
        `start`: a shard's features never depend on which process computes it or on whether the run resumed.
        `stop=None`: to the end of a stream of unknown length.

        "mean": the partial features stay on the device until `projector.finish_rows` of them are finished together
        (one copy to the CPU per block); a block with a non-finite value is explained by featurizing its first
        such example again on its own. Otherwise each batch is reduced from its pairs, feeding the method's state.
        """
        features = RowBuffer(start, stop, self.dim)
        hashes: list[str] = []
        pending: list[torch.Tensor] = []
        done = start  # rows before `done` are finished
        collector = self.method.collector(self)
        reduction = self.method.reduction

        def finish_block():
            nonlocal done, pending
            block = self.projector.finish(torch.cat(pending)).float().cpu()
            if not torch.isfinite(block).all():
                row = done + int((~torch.isfinite(block)).any(1).nonzero()[0])
                try:
                    again = data.batch([row])
                except StreamError:  # a one-time stream cannot give the row again to explain it
                    again = None
                if again is not None:
                    self.features(*again, [row], reduction="mean")  # raises, naming the cause
                raise NonFiniteFeaturesError(f"example {row!r} has NaN or infinite features in its batch")
            features.put(done, block)
            done, pending = done + len(block), []

        batches = training_batches(data, start, stop, self.config.batch_size, self.adapter.validate_images)
        with gradients_only_for(self.adapter.denoiser, self.parameters):  # once, not per batch
            for indices, images, captions, batch_hashes in batches:
                hashes.extend(batch_hashes)
                if reduction != "mean":
                    features.put(indices[0], self.features(images, captions, indices, collector, reduction))
                else:
                    pending.append(self.partial_features(images, captions, indices))
                if pending and (indices[-1] + 1 - done >= self.projector.finish_rows or indices[-1] + 1 == stop):
                    finish_block()
                if bar is not None:
                    bar.update(len(indices))
            if pending:  # the last rows of a stream read to its end (stop=None)
                finish_block()
        return features.result(), hashes, None if collector is None else collector.state()

    def featurize_rows(self, data: TrainingData, start: int, stop: int, bar=None) -> tuple[torch.Tensor, list[str]]:
        """(φ, content hashes) of examples [start, stop) (`rows` without the state)."""
        features, hashes, _ = self.rows(data, start, stop, bar)
        return features, hashes

    def featurize_queries(self, images: Any, prompts: Sequence[str] | str | None = None, **options) -> torch.Tensor:
        """φ [n, k] for query images: the method's own query features (`Method.queries`, e.g. EK-FAC's
        preconditioned ones, taking `options`), else `projected_queries`."""
        queries = getattr(self.method, "queries", None)
        if queries is not None:
            return queries(self, images, prompts, **options)
        if options:
            raise TypeError(f"method {self.config.method!r} takes no query options, got {sorted(options)}")
        return self.projected_queries(images, prompts)

    def projected_queries(self, images: Any, prompts: Sequence[str] | str | None = None,
                          projector: Projector | None = None) -> torch.Tensor:
        """φ [n, k] of query images reduced as the method's queries are. With `config.query_samples` (or
        `query_noise`) set, each query's gradient is averaged over its own samples (gradients/queries.py) and its
        key is its content hash; else over the training set's pairs, query i keyed `"query:i"` (per-example noise,
        random timesteps). `projector`: another projector than the featurizer's (EK-FAC's sketch)."""
        batch, prompts = query_batch(images, prompts, self.adapter.validate_images)
        samples = self.query_samples()
        own, self.projector = self.projector, projector or self.projector
        try:
            out = []
            for start in range(0, len(batch), self.config.batch_size):
                stop = min(start + self.config.batch_size, len(batch))
                if samples is None:
                    keys = [f"query:{i}" for i in range(start, stop)]
                else:
                    keys = [content_hash(batch[i], prompts[i]) for i in range(start, stop)]
                out.append(self.features(batch[start:stop], prompts[start:stop], keys, samples=samples))
            return torch.cat(out)
        finally:
            self.projector = own

    def query_samples(self) -> QuerySamples | None:
        """The queries' own (t, ε) samples (`config.query_samples`, `query_noise`), or None: the training set's."""
        if not self.config.query_samples and self.config.query_noise is None:  # None or 0: the training pairs
            return None
        return QuerySamples(self.task, self.config.query_samples, self.config.query_noise)

    # ------------------------------------------------------------------------------------ errors

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
