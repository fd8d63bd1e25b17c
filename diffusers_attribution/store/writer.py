"""Writing stores: the resumable, sharded featurization into a folder, and saving stores computed in memory.

`featurize_to_directory` computes the shards missing from a folder (each process its share under accelerate),
checks that finished ones come from the same run (`files.run_identity`) and the same examples, then adds up the
kernel and writes the card and, last, config.json. A killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import AttributionConfig
from ..data import TrainingData
from ..distributed import ProcessGroup
from .errors import CorruptStoreError, StoreMismatchError
from .files import (
    CONFIG_NAME,
    PROJECTION_NAME,
    file_digest,
    identity_difference,
    open_shard,
    read_projection,
    rows_per_shard,
    run_identity,
    shard_plan,
    tensor_to_hashes,
    write_projection,
    write_shard,
)
from .format import FeatureStore, check_foreign_files, read_shard_run
from .lock import writer_lock


def featurize_to_directory(featurizer, data: TrainingData, directory: Path, group: ProcessGroup, *,
                           shard_rows: int | None, max_shard_size: int | str, compute_kernel: bool, progress: bool,
                           dataset_name: str | None) -> FeatureStore:
    """Featurize the shards missing from `directory` (this process's share of them), then finalize the store.

    The main process holds the folder's writer lock throughout (store/lock.py); the others write only after it
    has taken it, and fail with it when it could not."""
    config, n = featurizer.config, len(data)
    if group.device is not None and config.device is None:
        featurizer.adapter.pipe.to(group.device)
    dim = featurizer.projector.dim
    rows = shard_rows or rows_per_shard(dim, max_shard_size)
    from ..fingerprint import model_fingerprint

    writer = {"feature_hash": config.feature_hash(), "num_examples": n, "shard_rows": rows, "dim": dim,
              "model_fingerprint": model_fingerprint(featurizer.adapter.denoiser, featurizer.parameters)}
    with group_lock(directory, writer, group):
        return _featurize_locked(featurizer, data, directory, group, rows, compute_kernel, progress, dataset_name)


@contextlib.contextmanager
def group_lock(directory: Path, run: dict, group: ProcessGroup):
    """`writer_lock` taken by the main process; every process enters the block only if it got it."""
    stack = contextlib.ExitStack()
    status: dict[str, Any] = {}
    if group.is_main:
        try:
            stack.enter_context(writer_lock(directory, run))
            check_foreign_files(directory)
        except Exception as error:  # sent to every process, so that none waits for a main process that failed
            stack.close()
            status = {"mismatch": isinstance(error, StoreMismatchError), "error": f"{type(error).__name__}: {error}",
                      "exception": error}
    shared = group.broadcast({k: v for k, v in status.items() if k != "exception"} if group.is_main else None)
    if "exception" in status:
        raise status["exception"]
    if "error" in shared:
        raise (StoreMismatchError if shared["mismatch"] else RuntimeError)(shared["error"])
    with stack:
        yield


def _featurize_locked(featurizer, data: TrainingData, directory: Path, group: ProcessGroup, rows: int,
                      compute_kernel: bool, progress: bool, dataset_name: str | None) -> FeatureStore:
    config, n = featurizer.config, len(data)
    if featurizer.projector.fits_on_data:
        fit_in_directory(featurizer, data, directory, group, progress=progress and group.is_main)
    dim = featurizer.projector.dim
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
    return finalize_directory(directory, config, metadata, plan, rows, group, compute_kernel,
                              method_state=getattr(featurizer, "method_state_from_parts", None))


def fit_in_directory(featurizer, data: TrainingData, directory: Path, group: ProcessGroup,
                     progress: bool = False) -> None:
    """A projection fitted on data (the calibrated bases): the one saved in `directory` (a resumed run), or fitted
    on the main process and saved there first; every process then projects with the saved one. A saved
    projection fitted for another config, model or examples is refused."""
    path, identity = directory / PROJECTION_NAME, featurizer.fit_identity(data)
    status: dict[str, Any] = {}
    if group.is_main:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if path.is_file():
                recorded = read_projection(path)[1]
                differ = identity_difference(recorded, identity, [key for key in identity if key != "examples"])
                changed = [i for i, h in identity["examples"].items() if (recorded.get("examples") or {}).get(i) != h]
                if differ:
                    status = {"mismatch": True, "error": (
                        f"{path} holds a projection calibrated for another {', '.join(differ[0])} ({differ[1]}). "
                        "Use another output_dir, or delete it to start over")}
                elif changed:
                    status = {"mismatch": True, "error": (
                        f"training example {changed[0]} differs from the one the projection in {path} was fitted on: "
                        "the dataset changed. Use another output_dir, or delete it to start over")}
            else:
                featurizer.fit_projection(data, progress)
                write_projection(directory, featurizer.projector.state_dict(), identity)
        except Exception as error:  # sent to every process, so that none waits for a main process that failed
            status = {"mismatch": isinstance(error, StoreMismatchError), "error": f"{type(error).__name__}: {error}"}
    status = group.broadcast(status if group.is_main else None)
    if "error" in status:
        raise (StoreMismatchError if status["mismatch"] else RuntimeError)(status["error"])
    featurizer.projector.load_state_dict(read_projection(path)[0])


def survey(directory: Path, plan: list[dict], run: dict) -> dict:
    """Which planned shards `directory` already holds, or why it cannot be resumed (run on the main process)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        planned = {entry["file"]: index for index, entry in enumerate(plan)}
        done = []
        for path in sorted(directory.glob("features-*-of-*.safetensors")):
            if path.is_symlink() or not path.is_file():
                return {"mismatch": True, "error": f"{path} is not a regular file the store wrote (a symbolic link?): "
                                                   "move it away, or use another output_dir"}
            try:
                recorded = read_shard_run(path)
            except CorruptStoreError as error:
                if path.name not in planned:
                    raise
                warnings.warn(f"{error}; computing that shard again")
                path.unlink()
                continue
            differ = identity_difference(recorded["run"], run)
            if differ:
                return {"mismatch": True, "error": (
                    f"{directory} holds shards of another featurization ({path.name}: {', '.join(differ[0])} differ: "
                    f"{differ[1]}). "
                    "Use another output_dir, or delete it to start over")}
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
                       group: ProcessGroup, compute_kernel: bool, method_state=None) -> FeatureStore:
    """After every process has written its shards: hash them and add up the kernel (each process its share),
    then the main process writes kernel.safetensors, README.md and config.json. `method_state(directory, plan)`:
    the store's method state from what the featurizer left beside the shards (featurize.ShardStateFeaturizer)."""
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
        from ..scoring import kernel_matrix

        if len(store) > store.dim:  # primal ΦᵀΦ: a sum over shards, each process adds its own
            kernel = group.sum(kernel_matrix(store, shards=mine))
        elif group.is_main:
            kernel = kernel_matrix(store)
    if group.is_main:
        store.metadata["example_hashes"] = [h for index in range(len(plan)) for h in hashes[index]]
        store.kernel = kernel
        if method_state is not None:
            store.method_state = method_state(directory, plan)
        store.finalize(rows, digests)
    group.barrier()
    return FeatureStore.from_pretrained(directory)


def finish_store(store: FeatureStore, output_dir=None, accelerator=None, **store_kwargs) -> FeatureStore:
    """For featurizers that compute in memory (TracIn, similarity): write the store to `output_dir` if given."""
    if accelerator is not None:
        raise NotImplementedError(f"method {store.config.method!r} featurizes in one process; drop accelerator=")
    if output_dir is not None:
        save_options = {k: v for k, v in store_kwargs.items() if k in ("shard_rows", "max_shard_size", "overwrite")}
        kernel = None if store_kwargs.get("compute_kernel", True) else False
        store.save_pretrained(output_dir, kernel=kernel, **save_options)
    return store
