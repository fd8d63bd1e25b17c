"""Retraining harness: train one model per training subset (and training seed), measure it, keep the result.

    recipe = DigitsTrainingRecipe(DigitsRecipe(num_steps=600))       # or any object with .train(data, seed)
    masks = subset_masks(len(images), 64, alpha=0.5, seed=0)
    measure = QueryLosses({"generated": queries}, LossSpec(timesteps=100, noise_draws=2))
    results = RetrainHarness(recipe, images, masks, "runs/lds", measure).run()
    results.outputs("generated")                                      # float64 [M, n_queries]

A recipe is anything with `train(data, seed) -> pipeline` (and optionally `describe() -> dict`, recorded so
that a rerun with another recipe is refused); a plain function `fn(data, seed) -> pipeline` is wrapped by
`FunctionRecipe`. `data` is the subset of the training set: a tensor indexed by the subset, a
`datasets.Dataset.select(...)`, a list, or a `torch.utils.data.Subset`.

On disk (`output_dir`):
    harness.json                               what is being run (recipe, measure, data, seeds); checked on rerun
    masks.safetensors                          the masks [M, N]
    subset-00012-seed-0.safetensors            the measure's tensors for subset 12, training seed 0, with the
                                               subset's mask digest, train/measure seconds and peak RSS as metadata
    models/subset-00012-seed-0/                the trained pipeline (only with save_models=True)

Every file is written to a temporary name and renamed into place, so a killed run leaves only finished
results; running the same command again skips them (a result is reused only if its mask, recipe, measure
and data match). Growing M (64 → 128 with the same seed) keeps the first 64: masks.subset_masks is prefix-stable.

Several processes: under `accelerate launch` (or with `accelerator=`, or explicit `rank=`/`world_size=`),
process r trains jobs i ≡ r (mod world_size), job i = (subset i // len(seeds), seed i % len(seeds)); no
communication is needed except a final barrier, so independent cluster jobs with `rank`/`world_size` work too.
On CPU: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 script.py` (METHODS.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..store.files import atomic_write, identity_difference
from .masks import mask_indices, masks_digest
from .recipes import DigitsTrainingRecipe, FunctionRecipe, as_recipe, describe_recipe

__all__ = [
    "DigitsTrainingRecipe",
    "FunctionRecipe",
    "RetrainHarness",
    "RetrainJob",
    "RetrainMismatchError",
    "RetrainResults",
    "as_recipe",
    "retrain_subsets",
    "select_examples",
]

FORMAT_VERSION = 1


class RetrainMismatchError(ValueError):
    """The output directory holds results of another experiment (recipe, measure, data or seeds differ)."""


# ---------------------------------------------------------------------------------------------- data


def select_examples(data: Any, indices: torch.Tensor) -> Any:
    """The examples of `data` at `indices`, in the container type the training function expects."""
    indices = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(data, torch.Tensor):
        return data[indices]
    if hasattr(data, "select") and hasattr(data, "column_names"):  # datasets.Dataset
        return data.select(indices.tolist())
    if isinstance(data, (list, tuple)):
        return [data[i] for i in indices.tolist()]
    import numpy as np

    if isinstance(data, np.ndarray):
        return data[indices.numpy()]
    return torch.utils.data.Subset(data, indices.tolist())


def data_digest(data: Any) -> str:
    """A short hash of the training set's contents (the library's per-example content hashes)."""
    if isinstance(data, torch.Tensor):
        h = hashlib.sha256(str(tuple(data.shape)).encode())
        h.update(data.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]
    fingerprint = getattr(data, "_fingerprint", None)  # datasets.Dataset
    if isinstance(fingerprint, str):
        return fingerprint[:16]
    try:
        from ..data import TrainingData
        from ..store.files import dataset_fingerprint

        training = TrainingData(data)
        return dataset_fingerprint([training.example_hash(i) for i in range(len(training))])
    except Exception as error:  # any container the training function understands, even without images
        warnings.warn(f"cannot hash the training examples ({error}); only their number is checked on resume")
        return f"len={len(data)}"


# ---------------------------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class RetrainJob:
    """One training run: `subset` (row of the masks) with training `seed`; `index` orders all jobs."""

    index: int
    subset: int
    seed: int
    mask: torch.Tensor = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"subset-{self.subset:05d}-seed-{self.seed}"


@dataclass
class RetrainResults:
    """The measured outputs of the finished jobs.

    `values[name]`: float64 [S, M, n] (training seeds × subsets × queries; NaN where a job is not finished);
    `done`: bool [S, M]; `info[(subset, seed)]`: the job's metadata (seconds, peak RSS).
    """

    masks: torch.Tensor
    seeds: list[int]
    values: dict[str, torch.Tensor]
    done: torch.Tensor
    info: dict[tuple[int, int], dict[str, Any]]

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @property
    def finished_subsets(self) -> torch.Tensor:
        """long: the subsets whose every training seed has finished."""
        return torch.nonzero(self.done.all(0)).flatten()

    def outputs(self, name: str, subsets: torch.Tensor | None = None) -> torch.Tensor:
        """float64 [M', n]: `name`'s outputs averaged over training seeds, for the finished subsets (or `subsets`)."""
        if name not in self.values:
            raise KeyError(f"no measured output {name!r}; have {sorted(self.values)}")
        subsets = self.finished_subsets if subsets is None else torch.as_tensor(subsets, dtype=torch.long)
        return self.values[name][:, subsets].mean(0)

    def subset_masks(self, subsets: torch.Tensor | None = None) -> torch.Tensor:
        subsets = self.finished_subsets if subsets is None else torch.as_tensor(subsets, dtype=torch.long)
        return self.masks[subsets]

    def seconds(self) -> dict[str, float]:
        """Total and mean training / measuring seconds over finished jobs."""
        train = [v.get("train_seconds", 0.0) for v in self.info.values()]
        measure = [v.get("measure_seconds", 0.0) for v in self.info.values()]
        n = max(1, len(train))
        return {"jobs": len(train), "train_total": sum(train), "train_mean": sum(train) / n,
                "measure_total": sum(measure), "measure_mean": sum(measure) / n}


class RetrainHarness:
    """Train `recipe` on every subset of `masks` (× `seeds`), apply `measure(pipe, job) -> {name: tensor}`, and
    write each result to `output_dir` as it finishes (see the module docstring)."""

    def __init__(
        self,
        recipe: Any,
        train_data: Any,
        masks: torch.Tensor,
        output_dir: str | os.PathLike,
        measure: Callable[..., Mapping[str, torch.Tensor]],
        *,
        seeds: Sequence[int] = (0,),
        save_models: bool = False,
        accelerator: Any = None,
        rank: int | None = None,
        world_size: int | None = None,
        progress: bool = True,
        metadata: Mapping[str, Any] | None = None,
    ):
        self.recipe = as_recipe(recipe)
        self.train_data = train_data
        self.masks = torch.as_tensor(masks, dtype=torch.bool)
        if self.masks.ndim != 2 or self.masks.shape[1] != len(train_data):
            raise ValueError(f"masks must be [M, N={len(train_data)}], got {tuple(self.masks.shape)}")
        self.output_dir = Path(output_dir)
        self.measure = measure
        self.seeds = [int(s) for s in seeds]
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {list(seeds)}")
        self.save_models = save_models
        self.progress = progress
        self.extra = dict(metadata or {})
        self._group = None
        if rank is not None or world_size is not None:
            self.rank, self.world = int(rank or 0), int(world_size or 1)
            if not 0 <= self.rank < self.world:
                raise ValueError(f"rank {self.rank} is not in [0, {self.world})")
        else:
            from ..distributed import ProcessGroup

            self._group = ProcessGroup(accelerator)
            self.rank, self.world = self._group.rank, self._group.world
        self._row_digests = [masks_digest(row) for row in self.masks]

    # ------------------------------------------------------------------ identity

    def identity(self) -> dict[str, Any]:
        """What the results depend on, besides each subset's own mask (harness.json)."""
        describe = getattr(self.measure, "describe", None)
        measure = dict(describe()) if callable(describe) else {
            "kind": f"{getattr(self.measure, '__module__', '?')}.{getattr(self.measure, '__qualname__', '?')}"}
        identity = {
            "format": FORMAT_VERSION,
            "num_train": int(self.masks.shape[1]),
            "seeds": self.seeds,
            "recipe": describe_recipe(self.recipe),
            "measure": measure,
            "data": data_digest(self.train_data),
        }
        return json.loads(json.dumps(identity, sort_keys=True, default=str))  # as harness.json reads back

    def _run_key(self, identity: Mapping[str, Any]) -> str:
        blob = json.dumps({k: identity[k] for k in ("format", "num_train", "recipe", "measure", "data")},
                          sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def jobs(self) -> list[RetrainJob]:
        """All jobs, subset-major: job i = (subset i // S, seed i % S)."""
        return [RetrainJob(m * len(self.seeds) + j, m, seed, self.masks[m])
                for m in range(len(self.masks)) for j, seed in enumerate(self.seeds)]

    def my_jobs(self) -> list[RetrainJob]:
        """This process's jobs: i ≡ rank (mod world_size)."""
        return [job for job in self.jobs() if job.index % self.world == self.rank]

    def result_path(self, job: RetrainJob) -> Path:
        return self.output_dir / f"{job.name}.safetensors"

    def model_path(self, job: RetrainJob) -> Path:
        return self.output_dir / "models" / job.name

    # ------------------------------------------------------------------ running

    def prepare(self) -> str:
        """Create output_dir, write or check harness.json (main process); returns the run key."""
        identity = self.identity()
        key = self._run_key(identity)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / "harness.json"
        if path.is_file():
            recorded = json.loads(path.read_text())
            differ = identity_difference(recorded, identity, ("num_train", "recipe", "measure", "data", "format"))
            if differ:
                raise RetrainMismatchError(
                    f"{self.output_dir} holds retraining results of another experiment ({', '.join(differ[0])} differ: "
                    f"{differ[1]}). Use another output_dir, or delete it to start over")
        if self.rank == 0:
            seeds = sorted(set(json.loads(path.read_text()).get("seeds", [])) | set(self.seeds)) if path.is_file() else self.seeds
            record = {**identity, "seeds": seeds, "run_key": key, "metadata": self.extra}
            _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(record, indent=2, sort_keys=True, default=str)))
            _atomic_masks(self.output_dir / "masks.safetensors", self.masks)
        return key

    def is_done(self, job: RetrainJob, key: str) -> bool:
        path = self.result_path(job)
        if not path.is_file():
            return False
        try:
            meta = _read_metadata(path)
        except Exception as error:
            warnings.warn(f"{path} cannot be read ({error}); training that subset again")
            return False
        if meta.get("run_key") != key:
            raise RetrainMismatchError(f"{path} was written by another experiment (run key {meta.get('run_key')} "
                                       f"!= {key}); use another output_dir")
        if meta.get("mask_digest") != self._row_digests[job.subset]:
            raise RetrainMismatchError(f"{path}: subset {job.subset} had another mask when it was trained; the masks "
                                       "changed (other seed, alpha or N?). Use another output_dir")
        if self.save_models and not (self.model_path(job) / "model_index.json").is_file():
            return False
        return True

    def run(self) -> RetrainResults:
        """Train and measure this process's unfinished jobs; after all processes finish, load every result."""
        key = self.prepare()
        mine = self.my_jobs()
        todo = [job for job in mine if not self.is_done(job, key)]
        if self.progress and len(todo) < len(mine):
            print(f"retrain: {len(mine) - len(todo)} of {len(mine)} jobs of this process already done in {self.output_dir}")
        for number, job in enumerate(todo):
            self.run_job(job, key)
            if self.progress:
                info = _read_metadata(self.result_path(job))
                print(f"retrain: {job.name} done ({number + 1}/{len(todo)} of this process; "
                      f"train {float(info['train_seconds']):.1f}s, measure {float(info['measure_seconds']):.1f}s)", flush=True)
        if self._group is not None:
            self._group.barrier()
        return self.load()

    def run_job(self, job: RetrainJob, key: str) -> None:
        data = select_examples(self.train_data, mask_indices(job.mask))
        start = time.perf_counter()
        pipe = self.recipe.train(data, job.seed)
        trained = time.perf_counter()
        outputs = self.measure(pipe, job)
        measured = time.perf_counter()
        tensors = {}
        for name, value in dict(outputs).items():
            if name.startswith("__"):
                raise ValueError(f"measure output names may not start with '__': {name!r}")
            tensors[name] = torch.as_tensor(value).detach().cpu().contiguous()
        if self.save_models:
            target = self.model_path(job)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{job.name}-", dir=target.parent))
            try:
                pipe.save_pretrained(tmp)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        metadata = {
            "run_key": key, "subset": str(job.subset), "seed": str(job.seed), "mask_digest": self._row_digests[job.subset],
            "subset_size": str(int(job.mask.sum())), "train_seconds": f"{trained - start:.3f}",
            "measure_seconds": f"{measured - trained:.3f}", "peak_rss_mib": f"{_peak_rss_mib():.1f}",
        }
        from safetensors.torch import save_file

        _atomic(self.result_path(job), lambda tmp: save_file(tensors, tmp, metadata=metadata))

    # ------------------------------------------------------------------ reading

    def load(self) -> RetrainResults:
        """Every finished result in output_dir for these masks and seeds (NaN where not finished)."""
        return load_results(self.output_dir, masks=self.masks, seeds=self.seeds)

    def load_model(self, subset: int, seed: int | None = None):
        """The saved pipeline of (subset, seed) (save_models=True)."""
        from diffusers import DiffusionPipeline

        seed = self.seeds[0] if seed is None else seed
        job = RetrainJob(0, subset, seed, self.masks[subset])
        return DiffusionPipeline.from_pretrained(self.model_path(job))


def retrain_subsets(recipe: Any, train_data: Any, masks: torch.Tensor, output_dir: str | os.PathLike,
                    measure: Callable[..., Mapping[str, torch.Tensor]], **kwargs) -> RetrainResults:
    """`RetrainHarness(...).run()` in one call."""
    return RetrainHarness(recipe, train_data, masks, output_dir, measure, **kwargs).run()


def load_results(output_dir: str | os.PathLike, masks: torch.Tensor | None = None,
                 seeds: Sequence[int] | None = None) -> RetrainResults:
    """The results in `output_dir` (masks and seeds from the directory unless given)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    output_dir = Path(output_dir)
    record = json.loads((output_dir / "harness.json").read_text())
    if masks is None:
        masks = load_file(str(output_dir / "masks.safetensors"))["masks"].bool()
    seeds = list(record["seeds"] if seeds is None else seeds)
    digests = [masks_digest(row) for row in masks]
    values: dict[str, torch.Tensor] = {}
    done = torch.zeros(len(seeds), len(masks), dtype=torch.bool)
    info: dict[tuple[int, int], dict[str, Any]] = {}
    for s, seed in enumerate(seeds):
        for m in range(len(masks)):
            path = output_dir / f"subset-{m:05d}-seed-{seed}.safetensors"
            if not path.is_file():
                continue
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("mask_digest") != digests[m] or meta.get("run_key") != record.get("run_key"):
                    continue
                for name in handle.keys():
                    tensor = handle.get_tensor(name).double().flatten()
                    if name not in values:
                        values[name] = torch.full((len(seeds), len(masks), len(tensor)), float("nan"), dtype=torch.float64)
                    values[name][s, m] = tensor
            done[s, m] = True
            info[(m, seed)] = {k: _number(v) for k, v in meta.items() if k not in ("run_key", "mask_digest")}
    return RetrainResults(masks=torch.as_tensor(masks, dtype=torch.bool), seeds=seeds, values=values, done=done, info=info)


# ---------------------------------------------------------------------------------------------- files


def _atomic(path: Path, write: Callable[[str], Any]) -> None:
    atomic_write(Path(path), write)


def _atomic_masks(path: Path, masks: torch.Tensor) -> None:
    from safetensors.torch import save_file

    _atomic(path, lambda tmp: save_file({"masks": masks.to(torch.uint8).contiguous()}, tmp,
                                         metadata={"digest": masks_digest(masks)}))


def _read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _number(value: str) -> Any:
    try:
        return int(value)
    except ValueError:
        try:
            return float(value)
        except ValueError:
            return value


def _peak_rss_mib() -> float:
    """The process's peak resident memory so far (MiB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
