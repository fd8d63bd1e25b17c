"""The featurization loop: examples → x0 and conditioning → projected averaged gradients φ(z) [N, k]."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from . import __version__
from .adapters import PipelineAdapter, get_adapter
from .config import AttributionConfig
from .data import TrainingData, content_hash, to_image_batch
from .projection import Projector, make_projector
from .distributed import ProcessGroup, launched_with_several_processes
from .store import (
    CONFIG_NAME,
    PROJECTION_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    CorruptStoreError,
    FeatureStore,
    StoreMismatchError,
    file_digest,
    open_shard,
    read_projection,
    read_shard_run,
    rows_per_shard,
    run_identity,
    shard_plan,
    tensor_to_hashes,
    write_projection,
    write_shard,
)
from .task import AttributionTask, gradients_only_for, select_parameters


class Featurizer:
    """Everything fixed for one (pipeline, config): adapter, task, parameters, projector.

    A calibrated factored projection (`config.calibration_examples > 0`, calibration.py) is measured on the
    training set by `featurize_dataset`, or taken from a store's `projection_state` (`projection_state=`).
    """

    def __init__(self, pipe, config: AttributionConfig, projection_state: dict[str, torch.Tensor] | None = None):
        if config.device is not None:
            pipe.to(config.device)
        self.config = config
        self.adapter: PipelineAdapter = get_adapter(pipe)
        self.task = AttributionTask(self.adapter, config)
        self.parameters = select_parameters(self.adapter.denoiser, config)
        self.needs_calibration = config.projector == "factored" and config.calibration_examples > 0
        self._projector: Projector | None = None
        if not self.needs_calibration:
            self._projector = make_projector(config, self.adapter.denoiser, self.parameters)
        elif projection_state is not None:
            self.use_projection_state(projection_state)

    @property
    def projector(self) -> Projector:
        if self._projector is None:
            raise RuntimeError(
                "this featurizer's factored projection is calibrated on training examples "
                f"(calibration_examples={self.config.calibration_examples}): featurize the training set first, or "
                "build it from the store (make_featurizer(pipe, store.config, store=store))"
            )
        return self._projector

    def use_projection_state(self, state: dict[str, torch.Tensor]) -> None:
        """Project with saved calibrated bases (a store's `projection_state`)."""
        from .calibration import CalibratedProjector, bases_from_state_dict

        self._projector = CalibratedProjector(self.adapter.denoiser, self.parameters, self.config.projection_dim,
                                              self.config.projection_seed, bases_from_state_dict(state))

    def calibrate(self, data: TrainingData) -> None:
        """Measure the calibrated bases on `config.calibration_examples` training examples (calibration.py)."""
        from .calibration import CALIBRATION_BATCH, CalibratedProjector, calibrate, calibration_indices

        config = self.config
        indices = calibration_indices(len(data), config.calibration_examples, config.projection_seed)
        batches = []
        for start in range(0, len(indices), CALIBRATION_BATCH):
            chunk = indices[start : start + CALIBRATION_BATCH]
            images, captions = data.batch(chunk)
            self.adapter.validate_images(images, f"training examples {chunk[0]}..{chunk[-1]}")
            batches.append((self.adapter.encode(images, list(captions), chunk, config.noise_seed), chunk))
        with gradients_only_for(self.adapter.denoiser, self.parameters):
            bases = calibrate(self.task, self.adapter.denoiser, self.parameters, batches, config.sketch_dim,
                              config.projection_seed)
        self._projector = CalibratedProjector(self.adapter.denoiser, self.parameters, config.projection_dim,
                                              config.projection_seed, bases)

    def calibration_identity(self, data: TrainingData) -> dict[str, Any]:
        """What calibrated bases depend on: the feature config, the attributed weights, the calibration examples."""
        from .calibration import calibration_indices

        indices = calibration_indices(len(data), self.config.calibration_examples, self.config.projection_seed)
        return {"feature_hash": self.config.feature_hash(),
                "model_fingerprint": model_fingerprint(self.adapter.denoiser, self.parameters)["attributed"],
                "examples": {str(i): data.example_hash(i) for i in indices}}

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
            return self.projector.features(self.task, self.parameters, inputs, list(keys)).float().cpu()

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
            if self.needs_calibration and self._projector is None:
                self.calibrate(data)
            bar = tqdm(total=len(data), desc="featurize", unit="example", disable=not progress)
            features, hashes = self.featurize_rows(data, 0, len(data), bar)
            bar.close()
            metadata = {**self.metadata(), "num_examples": len(data), "dataset_name": name, "example_hashes": hashes}
            state = self.projector.state_dict() if self.needs_calibration else None
            return FeatureStore(features, self.config, metadata, projection_state=state)
        return featurize_to_directory(
            self, data, Path(output_dir), ProcessGroup(accelerator), shard_rows=shard_rows,
            max_shard_size=max_shard_size, compute_kernel=compute_kernel, progress=progress, dataset_name=name,
        )

    def training_data(self, dataset: Any) -> TrainingData:
        if isinstance(dataset, TrainingData):
            return dataset
        return TrainingData(dataset, self.config.image_column, self.config.caption_column)

    def featurize_rows(self, data: TrainingData, start: int, stop: int, bar=None) -> tuple[torch.Tensor, list[str]]:
        """(φ [stop - start, k], content hashes) of examples [start, stop), in batches counted from `start`.

        Batches always start at `start` (a shard's first row), so a shard's features never depend on
        which process computes it or on whether the run was resumed.
        """
        features = torch.empty(stop - start, self.projector.dim, dtype=torch.float32)
        hashes: list[str] = []
        for first in range(start, stop, self.config.batch_size):
            indices = list(range(first, min(first + self.config.batch_size, stop)))
            images, captions = data.batch(indices)
            self.adapter.validate_images(images, f"training examples {indices[0]}..{indices[-1]}")
            hashes.extend(content_hash(image, caption) for image, caption in zip(images, captions))
            features[first - start : first - start + len(indices)] = self.features(images, captions, indices)
            if bar is not None:
                bar.update(len(indices))
        return features, hashes

    def featurize_queries(self, images: Any, prompts: Sequence[str] | str | None = None) -> torch.Tensor:
        """φ [n, k] for query images; query i uses the example key `"query:i"` for per-example noise."""
        batch, prompts = query_batch(self.adapter, images, prompts)
        out = []
        for start in range(0, len(batch), self.config.batch_size):
            stop = min(start + self.config.batch_size, len(batch))
            keys = [f"query:{i}" for i in range(start, stop)]
            out.append(self.features(batch[start:stop], prompts[start:stop], keys))
        return torch.cat(out)


def query_batch(adapter: PipelineAdapter, images: Any, prompts) -> tuple[torch.Tensor, list]:
    """Validated query images [n, C, H, W] and one prompt per image (a single prompt or None is repeated)."""
    batch = to_image_batch(images)
    adapter.validate_images(batch, "query images")
    if isinstance(prompts, str) or prompts is None:
        prompts = [prompts] * len(batch)
    if len(prompts) != len(batch):
        raise ValueError(f"got {len(prompts)} prompts for {len(batch)} query images")
    return batch, list(prompts)


def model_fingerprint(denoiser: torch.nn.Module, parameters: dict[str, torch.nn.Parameter]) -> dict[str, str]:
    """sha256 over every parameter's name, shape and a strided sample of ≤ 4096 of its values.

    Three fingerprints: `denoiser` (all parameters, base model and adapters), `attributed` (the selected
    ones) and `lora` (the LoRA weights of every loaded adapter, None without any). Any fine-tune or different adapter changes them; computing them costs far less than hashing all weights.
    """
    def digest(named) -> str:
        h = hashlib.sha256()
        for name, p in named:
            flat = p.detach().flatten()
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
            h.update(f"{name}:{tuple(p.shape)}".encode())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]

    lora = [(name, p) for name, p in denoiser.named_parameters() if ".lora_" in name]
    return {"denoiser": digest(denoiser.named_parameters()), "attributed": digest(parameters.items()),
            "lora": digest(lora) if lora else None}


# ---------------------------------------------------------------------------------------------- on disk


def featurize_to_directory(featurizer: Featurizer, data: TrainingData, directory: Path, group: ProcessGroup, *,
                           shard_rows: int | None, max_shard_size: int | str, compute_kernel: bool, progress: bool,
                           dataset_name: str | None) -> FeatureStore:
    """Featurize the shards missing from `directory` (this process's share of them), then finalize the store."""
    config, n = featurizer.config, len(data)
    if group.device is not None and config.device is None:
        featurizer.adapter.pipe.to(group.device)
    if featurizer.needs_calibration:
        calibrate_in_directory(featurizer, data, directory, group)
    dim = featurizer.projector.dim
    rows = shard_rows or rows_per_shard(dim, max_shard_size)
    plan = shard_plan(n, rows)
    metadata = {**featurizer.metadata(), "num_examples": n, "dim": dim, "dataset_name": dataset_name}
    run = run_identity(config, metadata, n, rows, dim)

    status = group.broadcast(survey(directory, plan, run) if group.is_main else None)
    if "error" in status:
        raise (StoreMismatchError if status["mismatch"] else RuntimeError)(status["error"])
    done = status["done"]
    for index in group.share(done):  # finished shards must hold these very examples
        check_shard_examples(directory / plan[index]["file"], data, plan[index])
    finished = set(done)
    pending = [entry for index, entry in enumerate(plan) if index not in finished]
    if status["complete"] and not pending:
        group.barrier()
        return FeatureStore.from_pretrained(directory)
    mine = group.share(pending)
    if group.is_main and done and progress:
        print(f"featurize: resuming {directory}: {len(done)} of {len(plan)} shards already done")
    bar = tqdm(total=sum(e["stop"] - e["start"] for e in mine), unit="example", disable=not (progress and group.is_main),
               desc="featurize" if group.world == 1 else f"featurize (process 0 of {group.world})")
    for entry in mine:
        features, hashes = featurizer.featurize_rows(data, entry["start"], entry["stop"], bar)
        write_shard(directory, entry, features, hashes, run, process=f"{group.rank}/{group.world}")
    bar.close()
    group.barrier()
    return finalize_directory(directory, config, metadata, plan, rows, group, compute_kernel)


def calibrate_in_directory(featurizer: Featurizer, data: TrainingData, directory: Path, group: ProcessGroup) -> None:
    """The calibrated bases of `directory` (a resumed run), or computed on the main process and saved there
    first; every process then projects with the saved ones. Bases of another calibration are refused."""
    path, identity = directory / PROJECTION_NAME, featurizer.calibration_identity(data)
    status: dict[str, Any] = {}
    if group.is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                recorded = read_projection(path)[1]
                differ = sorted(key for key in identity if key != "examples" and recorded.get(key) != identity[key])
                changed = [i for i, h in identity["examples"].items() if (recorded.get("examples") or {}).get(i) != h]
                if changed and not differ:
                    status = {"mismatch": True, "error": (
                        f"training example {changed[0]} differs from the one the bases in {path} were calibrated on: "
                        "the dataset changed. Use another output_dir, or delete it to start over")}
                elif differ:
                    status = {"mismatch": True, "error": (
                        f"{path} holds a projection calibrated for another {', '.join(differ)} "
                        f"({ {k: recorded.get(k) for k in differ} } there, { {k: identity[k] for k in differ} } now). "
                        "Use another output_dir, or delete it to start over")}
            else:
                featurizer.calibrate(data)
                write_projection(directory, featurizer.projector.state_dict(), identity)
        except Exception as error:  # sent to every process, so that none waits for a main process that failed
            status = {"mismatch": isinstance(error, StoreMismatchError), "error": f"{type(error).__name__}: {error}"}
    status = group.broadcast(status if group.is_main else None)
    if "error" in status:
        raise (StoreMismatchError if status["mismatch"] else RuntimeError)(status["error"])
    featurizer.use_projection_state(read_projection(path)[0])


def survey(directory: Path, plan: list[dict], run: dict) -> dict:
    """Which planned shards `directory` already holds, or why it cannot be resumed (run on the main process)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        planned = {entry["file"]: index for index, entry in enumerate(plan)}
        done = []
        for path in sorted(directory.glob("features-*-of-*.safetensors")):
            try:
                recorded = read_shard_run(path)
            except CorruptStoreError as error:
                if path.name not in planned:
                    raise
                warnings.warn(f"{error}; computing that shard again")
                path.unlink()
                continue
            differ = [key for key in run if recorded["run"].get(key) != run[key]]
            if differ:
                return {"mismatch": True, "error": (
                    f"{directory} holds shards of another featurization ({path.name}: {', '.join(differ)} differ: "
                    f"{ {key: recorded['run'].get(key) for key in differ} } there, { {key: run[key] for key in differ} } "
                    "now). Use another output_dir, or delete it to start over")}
            if path.name not in planned:
                return {"mismatch": True, "error": f"{directory}: unexpected shard {path.name}"}
            index = planned[path.name]
            if (recorded["start"], recorded["stop"]) != (plan[index]["start"], plan[index]["stop"]):
                return {"mismatch": True, "error": f"{path}: rows [{recorded['start']}, {recorded['stop']}) "
                                                   f"where [{plan[index]['start']}, {plan[index]['stop']}) was expected"}
            done.append(index)
        complete = (directory / CONFIG_NAME).is_file() and len(done) == len(plan)
        return {"done": sorted(done), "complete": complete}
    except Exception as error:  # sent to every process, so that none waits for a main process that failed
        return {"mismatch": isinstance(error, StoreMismatchError), "error": f"{type(error).__name__}: {error}"}


def check_shard_examples(path: Path, data: TrainingData, entry: dict) -> None:
    """Raise `StoreMismatchError` unless the shard's recorded example hashes are those of `data`'s rows."""
    with open_shard(path) as handle:
        recorded = tensor_to_hashes(handle.get_tensor("example_hashes"))
    for offset, expected in enumerate(recorded):
        index = entry["start"] + offset
        if data.example_hash(index) != expected:
            raise StoreMismatchError(
                f"training example {index} differs from the one featurized into {path}: the dataset changed. "
                "Use another output_dir, or delete it to start over"
            )


def finalize_directory(directory: Path, config: AttributionConfig, metadata: dict, plan: list[dict], rows: int,
                       group: ProcessGroup, compute_kernel: bool) -> FeatureStore:
    """After every process has written its shards: hash them and add up the kernel (each process its share),
    then the main process writes kernel.safetensors, README.md and config.json."""
    missing = [entry["file"] for entry in plan if not (directory / entry["file"]).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(plan)} shards are missing in {directory} (e.g. {missing[0]}): "
                           "a process failed; run the same command again to compute only those")
    store = FeatureStore(None, config, metadata, directory=directory, shards=plan)
    mine = group.share(range(len(plan)))
    digests, hashes = {}, {}
    for index in mine:
        path = directory / plan[index]["file"]
        digests[path.name] = file_digest(path)
        with open_shard(path) as handle:
            hashes[index] = tensor_to_hashes(handle.get_tensor("example_hashes"))
    for part_digests, part_hashes in group.gather((digests, hashes)):
        digests.update(part_digests)
        hashes.update(part_hashes)
    kernel = None
    if compute_kernel:
        from .scoring import kernel_matrix

        if len(store) > store.dim:  # primal ΦᵀΦ: a sum over shards, each process adds its own
            kernel = group.sum(kernel_matrix(store, shards=mine))
        elif group.is_main:
            kernel = kernel_matrix(store)
    if group.is_main:
        store.metadata["example_hashes"] = [h for index in range(len(plan)) for h in hashes[index]]
        store.kernel = kernel
        store.finalize(rows, digests)
    group.barrier()
    return FeatureStore.from_pretrained(directory)


def _dataset_name(dataset: Any) -> str | None:
    info = getattr(dataset, "info", None)
    return getattr(info, "dataset_name", None) or getattr(info, "builder_name", None) if info is not None else None
