"""Writing stores: in memory, or the resumable, sharded store of a folder. The writer receives tensors, named
state and the method's facts, and records them; it never sees a featurizer or a method (featurize.py drives it).

`DirectoryWriter` holds the folder's writer lock (the main process) and, in the order featurize.py calls it:
saves and reads back what was fitted on data (`write_fitted` / `read_fitted`), surveys the finished shards of a
resumed run (`begin`), writes each shard with its rows' state beside it (`write_shard`; the state first, so a
finished shard always has its part), reads the parts back in row order (`read_states`), then hashes the shards,
adds up the kernel (each process its share), and writes the method state, the card and, last, config.json
(`finish`). A killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import AttributionConfig
from ..distributed import ProcessGroup
from .errors import CorruptStoreError, StoreMismatchError
from .files import (
    FEATURE_DTYPES,
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    PROJECTION_NAME,
    atomic_write,
    file_digest,
    identity_difference,
    open_shard,
    read_projection,
    rows_per_shard,
    run_identity,
    save_safetensors,
    shard_plan,
    tensor_to_hashes,
    write_projection,
    write_shard,
)
from .format import FeatureStore, check_foreign_files, read_shard_run
from .lock import writer_lock

__all__ = ["DEFAULT_MAX_SHARD_SIZE", "DirectoryWriter", "StoreMismatchError", "memory_store"]

PARTS = "method_state_parts"  # each row range's method state, and what the method fitted on data
FITTED_METHOD = "fitted-method.safetensors"


def memory_store(features: torch.Tensor, config: AttributionConfig, metadata: dict[str, Any], facts: dict[str, Any],
                 *, projection_state: dict[str, torch.Tensor] | None = None,
                 method_state: dict[str, torch.Tensor] | None = None) -> FeatureStore:
    """A store in memory: Φ (in `config.feature_dtype`, as a saved store holds it), its config and metadata, the
    method's facts (recorded as `method_facts`), and what was fitted (the projection's state, the method's state)."""
    features = features.to(FEATURE_DTYPES[config.feature_dtype][0])
    return FeatureStore(features, config, {**metadata, "method_facts": facts}, projection_state=projection_state,
                        method_state=method_state)


class DirectoryWriter:
    """Writes one store into `directory`, shard by shard, in one or several processes (`group`)."""

    def __init__(self, directory: Path, group: ProcessGroup, config: AttributionConfig, num_examples: int, dim: int,
                 *, shard_rows: int | None = None, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE):
        self.directory, self.group, self.config = Path(directory), group, config
        self.num_examples, self.dim = num_examples, dim
        self.shard_rows = shard_rows or rows_per_shard(dim, max_shard_size, config.feature_dtype)
        self.plan = shard_plan(num_examples, self.shard_rows)
        self.metadata: dict[str, Any] | None = None
        self.run: dict[str, Any] | None = None

    @contextlib.contextmanager
    def locked(self, model_fingerprint: dict | None):
        """The folder's writer lock, taken by the main process (store/lock.py); every process enters only if it got it."""
        run = {"feature_hash": self.config.feature_hash(), "num_examples": self.num_examples,
               "shard_rows": self.shard_rows, "dim": self.dim, "model_fingerprint": model_fingerprint}
        with group_lock(self.directory, run, self.group):
            yield self

    # ------------------------------------------------------------------------------------ fitted state

    def has_fitted(self, identity: dict[str, Any]) -> bool:
        """Whether the folder holds a fit of these very config, model and examples (a resumed run); a fit of others
        is a `StoreMismatchError` (main process)."""
        path = self.directory / PROJECTION_NAME
        self.directory.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            return False
        recorded = read_projection(path)[1]
        differ = identity_difference(recorded, identity, [key for key in identity if key != "examples"])
        if differ:
            what = ", ".join(differ[0]).replace("feature_hash", "feature_hash (a field that sets the features "
                                                "differs, e.g. the method, timesteps, noise, projection, or EK-FAC's "
                                                "damping)")
            raise StoreMismatchError(f"{path} holds a projection calibrated for another {what} ({differ[1]}). Use "
                                     "another output_dir, or delete it to start over")
        changed = [i for i, h in identity["examples"].items() if (recorded.get("examples") or {}).get(i) != h]
        if changed:
            raise StoreMismatchError(f"training example {changed[0]} differs from the one the projection in {path} was "
                                     "fitted on: the dataset changed. Use another output_dir, or delete it to start over")
        return True

    def write_fitted(self, fitted: dict, identity: dict[str, Any]) -> None:
        """Save what was fitted on data before any shard: the method's part (if any), then the projection's."""
        if fitted.get("method") is not None:
            (self.directory / PARTS).mkdir(parents=True, exist_ok=True)
            _save(self.directory / PARTS / FITTED_METHOD, fitted["method"])
        write_projection(self.directory, fitted["projection"], identity)

    def read_fitted(self) -> dict:
        """{"projection": the saved projection state, "method": the method's fitted state or None}."""
        method = self.directory / PARTS / FITTED_METHOD
        return {"projection": read_projection(self.directory / PROJECTION_NAME)[0],
                "method": _load(method) if method.is_file() else None}

    # ------------------------------------------------------------------------------------ shards

    def begin(self, metadata: dict[str, Any]) -> tuple[list[dict], list[dict], bool]:
        """(finished shards, shards still to compute, whether the store is complete), the same on every process;
        finished shards of another run are a `StoreMismatchError`."""
        self.metadata = metadata
        self.run = run_identity(self.config, metadata, self.num_examples, self.shard_rows, self.dim)
        status = self.group.broadcast(survey(self.directory, self.plan, self.run) if self.group.is_main else None)
        if "error" in status:
            raise (StoreMismatchError if status["mismatch"] else RuntimeError)(status["error"])
        finished = set(status["done"])
        done = [entry for index, entry in enumerate(self.plan) if index in finished]
        pending = [entry for index, entry in enumerate(self.plan) if index not in finished]
        return done, pending, status["complete"]

    def recorded_hashes(self, entry: dict) -> list[str]:
        """The example hashes a finished shard records."""
        with open_shard(self.directory / entry["file"]) as handle:
            return tensor_to_hashes(handle.get_tensor("example_hashes"))

    def write_shard(self, entry: dict, features: torch.Tensor, hashes: list[str], state: dict | None) -> None:
        """One shard, atomically; its rows' state first (a finished shard always has its part)."""
        if state is not None:
            (self.directory / PARTS).mkdir(parents=True, exist_ok=True)
            _save(self.directory / PARTS / part_name(entry["start"], entry["stop"]), state)
        write_shard(self.directory, entry, features, hashes, self.run,
                    process=f"{self.group.rank}/{self.group.world}", feature_dtype=self.config.feature_dtype)

    def read_states(self) -> list[dict]:
        """Every shard's state, in row order."""
        return [_load(self.directory / PARTS / part_name(e["start"], e["stop"])) for e in self.plan]

    def open(self) -> FeatureStore:
        return FeatureStore.from_pretrained(self.directory)

    def finish(self, facts: dict[str, Any], *, method_state: dict | None, compute_kernel: bool) -> FeatureStore:
        """After every process has written its shards: hash them and add up the kernel (each process its share),
        then the main process writes kernel.safetensors, the method state, README.md and config.json (recording
        the method's `facts`)."""
        directory, plan, group = self.directory, self.plan, self.group
        missing = [entry["file"] for entry in plan if not (directory / entry["file"]).is_file()]
        if missing:
            raise RuntimeError(f"{len(missing)} of {len(plan)} shards are missing in {directory} (e.g. {missing[0]}): "
                               "a process failed; run the same command again to compute only those")
        metadata = {**self.metadata, "method_facts": facts}
        store = FeatureStore(None, self.config, metadata, directory=directory, shards=plan)
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
            from .kernel import kernel_matrix

            if len(store) > store.dim:  # primal ΦᵀΦ: a sum over shards, each process adds its own
                kernel = group.sum(kernel_matrix(store, shards=mine))
            elif group.is_main:
                kernel = kernel_matrix(store)
        if group.is_main:
            store.metadata["example_hashes"] = [h for index in range(len(plan)) for h in hashes[index]]
            store.kernel = kernel
            if method_state is not None:
                store.method_state = method_state
            store.finalize(self.shard_rows, digests)
        group.barrier()
        return FeatureStore.from_pretrained(directory)


def part_name(start: int, stop: int) -> str:
    return f"rows-{start:09d}-{stop:09d}.safetensors"


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    atomic_write(path, lambda target: save_safetensors(tensors, target))


def _load(path: Path) -> dict[str, torch.Tensor]:
    with open_shard(path) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


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


