"""`FeatureStore`: projected training features Φ [N, k] with the exact configuration that produced them.

On disk (format 2), a directory:

    config.json                              AttributionConfig, projection spec, model/LoRA fingerprints,
                                             dataset size and fingerprint, package version, shard list
                                             (rows [start, stop), bytes, sha256), kernel entry
    features-00000-of-00004.safetensors      "features" float32 [rows, k], "example_hashes" uint8 [rows, 8]
    ...                                      (the content hash of each example, data.content_hash)
    kernel.safetensors                       "gram" float64: ΦᵀΦ [k, k] (N > k) or ΦΦᵀ [N, N] (N ≤ k)
    projection.safetensors                   calibrated factored projection only: its per-layer bases
                                             ("<parameter>::out" / "::in" / "::dense", projection/calibrated.py)
    README.md                                a dataset card (hub.store_card)

Every file is written to a temporary name, fsynced and renamed, and `config.json` is written last: a
directory without it is an unfinished featurization that `featurize(..., output_dir=...)` resumes.
Loading is lazy: shards are memory-mapped with `safe_open` and read block by block. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from safetensors.torch import save_file

from ..config import AttributionConfig
from .errors import CorruptStoreError, StoreMismatchError
from .files import (
    CARD_NAME,
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    FORMAT_VERSION,
    KERNEL_NAME,
    PROJECTION_NAME,
    SHARD_RE,
    atomic_write,
    dataset_fingerprint,
    file_digest,
    open_shard,
    rows_per_shard,
    run_identity,
    shard_plan,
    tensor_to_hashes,
    write_projection,
    write_shard,
)


def read_shard_run(path: Path) -> dict[str, Any]:
    """The run identity and row range recorded in a shard's header (reads the header only)."""
    with open_shard(path) as handle:
        meta = handle.metadata() or {}
    try:
        return {"start": int(meta["start"]), "stop": int(meta["stop"]), "run": json.loads(meta["run"]),
                "process": meta.get("process")}
    except (KeyError, ValueError) as error:
        raise CorruptStoreError(f"{path}: not a feature-store shard (header metadata {meta})") from error


# ---------------------------------------------------------------------------------------------- store


class FeatureStore:
    """Projected training features Φ [N, k], in memory (`features`) or in shards on disk (`directory`).

    Use `blocks()` to stream rows, `features` to load them all, `save_pretrained` / `from_pretrained` /
    `push_to_hub` to share. `metadata` holds the projection spec, fingerprints, `num_examples`,
    `example_hashes` and the package version; `kernel` the float64 Gram matrix once it is computed.
    """

    def __init__(self, features: torch.Tensor | None, config: AttributionConfig, metadata: dict[str, Any] | None = None,
                 *, directory: str | os.PathLike | None = None, shards: list[dict[str, Any]] | None = None,
                 kernel: torch.Tensor | None = None, projection_state: dict[str, torch.Tensor] | None = None):
        if features is None and (directory is None or shards is None):
            raise ValueError("a FeatureStore needs either features or a directory with shards")
        self._features = features
        self.config = config
        self.metadata = dict(metadata or {})
        self.directory = Path(directory) if directory is not None else None
        self.shards = shards or []
        self._kernel = kernel
        self._kernel_file: Path | None = None
        self._projection_state = projection_state
        self._projection_entry: dict[str, Any] | None = None

    @property
    def projection_state(self) -> dict[str, torch.Tensor] | None:
        """The calibrated projection's bases (calibration.py) the features were made with; None for seeded ones."""
        if self._projection_state is None and self._projection_entry is not None:
            path = self.directory / self._projection_entry["file"]
            _check_file(path, self._projection_entry, True)
            with open_shard(path) as handle:
                self._projection_state = {key: handle.get_tensor(key) for key in handle.keys()}
        return self._projection_state

    @property
    def kernel(self) -> torch.Tensor | None:
        """The float64 Gram matrix (ΦᵀΦ, or ΦΦᵀ when N ≤ k) if stored or computed, read from disk on first use."""
        if self._kernel is None and self._kernel_file is not None:
            with open_shard(self._kernel_file) as handle:
                self._kernel = handle.get_tensor("gram")
        return self._kernel

    @kernel.setter
    def kernel(self, value: torch.Tensor | None) -> None:
        self._kernel, self._kernel_file = value, None

    def __len__(self) -> int:
        return self._features.shape[0] if self._features is not None else int(self.metadata["num_examples"])

    def __repr__(self) -> str:
        where = f"in {self.directory}, {len(self.shards)} shards" if self.directory is not None else "in memory"
        return f"FeatureStore(N={len(self)}, k={self.dim}, method={self.config.method!r}, {where})"

    @property
    def dim(self) -> int:
        return self._features.shape[1] if self._features is not None else int(self.metadata["dim"])

    @property
    def features(self) -> torch.Tensor:
        """Φ [N, k] float32, all in memory (loaded from the shards on first use; prefer `blocks()` for big stores)."""
        if self._features is None:
            self._features = torch.cat([block for _, block in self.blocks()]) if len(self) else torch.empty(0, self.dim)
        return self._features

    @property
    def example_hashes(self) -> list[str]:
        return self.metadata.get("example_hashes", [])

    def blocks(self, block_rows: int | None = None, shards: Sequence[int] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """(start row, Φ[start:start + rows] float32) for consecutive blocks of ≤ `block_rows` rows.

        `shards`: only the shards with these indices (rows are still global). Default block: ~256 MB.
        """
        block_rows = block_rows or max(1, (256 << 20) // (4 * max(self.dim, 1)))
        if self._features is not None:
            ranges = [(0, len(self))] if shards is None else [(self.shards[i]["start"], self.shards[i]["stop"]) for i in shards]
            for begin, end in ranges:
                for start in range(begin, end, block_rows):
                    yield start, self._features[start : min(start + block_rows, end)]
            return
        for entry in (self.shards if shards is None else [self.shards[i] for i in shards]):
            path = self.directory / entry["file"]
            with open_shard(path) as handle:
                sliced = handle.get_slice("features")
                rows = entry["stop"] - entry["start"]
                for offset in range(0, rows, block_rows):
                    block = sliced[offset : min(offset + block_rows, rows)]
                    if block.shape[1] != self.dim:
                        raise CorruptStoreError(f"{path}: features have {block.shape[1]} columns, expected {self.dim}")
                    yield entry["start"] + offset, block

    # ------------------------------------------------------------------------------------ compatibility

    def check_compatible(self, config: AttributionConfig, metadata: dict[str, Any]) -> None:
        """Raise `StoreMismatchError` naming the first difference between this store and a query setup."""
        if config.feature_hash() != self.config.feature_hash():
            ours, theirs = self.config.feature_dict(), config.feature_dict()
            diffs = {k: (ours.get(k), theirs.get(k)) for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
            raise StoreMismatchError(f"store config differs from the query config: {diffs} (store, query)")
        for key in ("family", "projection", "model_fingerprint", "adapter"):
            if key in self.metadata and key in metadata and self.metadata[key] != metadata[key]:
                ours, theirs = self.metadata[key], metadata[key]
                detail = ""
                if isinstance(ours, dict) and isinstance(theirs, dict):
                    parts = [part for part in sorted(set(ours) | set(theirs)) if ours.get(part) != theirs.get(part)]
                    detail = f" ({', '.join(parts)} differ)"
                raise StoreMismatchError(
                    f"store {key} differs from the query pipeline's{detail}: the store was featurized from "
                    f"{_short(ours)}, the query uses {_short(theirs)}. Use the pipeline (and LoRA) the store "
                    "was built with, or pass check_compatibility=False to score anyway"
                )

    def check_dataset(self, dataset: Any, image_column: str | None = None, caption_column: str | None = None) -> None:
        """Raise `StoreMismatchError` unless `dataset` holds the examples this store was featurized from, in order."""
        from ..data import as_training_data

        data = as_training_data(dataset, image_column or self.config.image_column,
                                caption_column or self.config.caption_column)
        if len(data) != len(self):
            raise StoreMismatchError(f"the store has {len(self)} examples, the dataset {len(data)}")
        for index, expected in enumerate(self.example_hashes):
            if data.example_hash(index) != expected:
                raise StoreMismatchError(f"training example {index} differs from the one the store was featurized from")

    # ------------------------------------------------------------------------------------ disk

    def save_pretrained(self, directory: str | os.PathLike, *, shard_rows: int | None = None,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, kernel: bool | None = None) -> Path:
        """Write the store (shards, kernel, card, config.json last).

        `kernel`: store the Gram matrix (computed if not yet known); default: for the kernel methods
        (TRAK, D-TRAK, Journey-TRAK), whose scores need it.
        """
        if kernel is None:
            from ..methods.base import get_method

            kernel = get_method(self.config.method).kernel
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.directory is not None and directory.resolve() == self.directory.resolve():
            return directory
        hashes = self.example_hashes
        if len(hashes) != len(self):
            raise ValueError(f"the store has {len(self)} rows but {len(hashes)} example hashes")
        rows = shard_rows or rows_per_shard(self.dim, max_shard_size)
        plan = shard_plan(len(self), rows)
        (directory / CONFIG_NAME).unlink(missing_ok=True)  # unfinished until the new config.json is written
        run = run_identity(self.config, self.metadata, len(self), rows, self.dim)
        for entry in plan:
            write_shard(directory, entry, self.rows(entry["start"], entry["stop"]), hashes[entry["start"] : entry["stop"]], run)
        if self.projection_state is not None:
            write_projection(directory, self.projection_state)
        staged = FeatureStore(None, self.config, {**self.metadata, "dim": self.dim, "num_examples": len(self)},
                              directory=directory, shards=plan, kernel=self.kernel)
        if kernel and staged.kernel is None:
            from ..scoring import kernel_matrix

            staged.kernel = kernel_matrix(staged)
        staged.finalize(rows, {entry["file"]: file_digest(directory / entry["file"]) for entry in plan})
        self.kernel = staged.kernel
        return directory

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Φ[start:stop] float32, reading only the shards that hold those rows."""
        if self._features is not None:
            return self._features[start:stop]
        overlapping = [i for i, e in enumerate(self.shards) if e["start"] < stop and e["stop"] > start]
        parts = [block[max(start - begin, 0) : stop - begin] for begin, block in self.blocks(shards=overlapping)
                 if begin < stop and begin + len(block) > start]
        return torch.cat(parts) if parts else torch.empty(0, self.dim)

    def finalize(self, shard_rows: int, digests: dict[str, tuple[int, str]]) -> None:
        """Write kernel.safetensors (if `self.kernel`), README.md and, last, config.json for the shards in `digests`."""
        directory = self.directory
        kernel_entry = None
        if self.kernel is not None:
            form = "dual" if len(self) <= self.dim else "primal"
            atomic_write(directory / KERNEL_NAME, lambda p: save_file(
                {"gram": self.kernel.detach().cpu().to(torch.float64).contiguous()}, p, metadata={"form": form}))
            size, sha = file_digest(directory / KERNEL_NAME)
            kernel_entry = {"file": KERNEL_NAME, "form": form, "bytes": size, "sha256": sha}
        shards = [{**entry, "bytes": digests[entry["file"]][0], "sha256": digests[entry["file"]][1]} for entry in self.shards]
        projection_entry = None
        if (self.metadata.get("projection") or {}).get("calibrated"):
            if not (directory / PROJECTION_NAME).is_file():
                raise CorruptStoreError(f"{directory}: the calibrated projection's {PROJECTION_NAME} is missing")
            size, sha = file_digest(directory / PROJECTION_NAME)
            projection_entry = {"file": PROJECTION_NAME, "bytes": size, "sha256": sha}
        metadata = {key: value for key, value in self.metadata.items() if key != "example_hashes"}
        metadata["dataset_fingerprint"] = dataset_fingerprint(self.example_hashes)
        header = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            **metadata,
            "num_examples": len(self),
            "dim": self.dim,
            "dtype": "float32",
            "shard_rows": shard_rows,
            "shards": shards,
            "kernel": kernel_entry,
            "projection_file": projection_entry,
        }
        from .hub import store_card

        card = store_card(header, location=directory)
        atomic_write(directory / CARD_NAME, lambda p: Path(p).write_text(str(card), encoding="utf-8"))
        atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(header, indent=2)))
        listed = {entry["file"] for entry in shards}
        for stale in directory.iterdir():  # temporaries of a killed run; shards of an earlier, other layout
            if stale.name.endswith(".tmp") and stale.name.startswith(".") or SHARD_RE.match(stale.name) and stale.name not in listed:
                stale.unlink(missing_ok=True)
        self.shards = shards

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | os.PathLike, *, revision: str | None = None,
                        endpoint: str | None = None, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None, verify: bool = False) -> "FeatureStore":
        """Open a store from a local directory, or download a Hub dataset repository (`user/name`) first.

        Where a location is looked for: a local folder, else each store backend in turn (store/backends.py; the
        Hub's is hub.py). Features stay on disk until read. Shard sizes and headers are always checked; `verify=True` also
        checks every file's sha256 against config.json.
        """
        from .backends import locate

        directory = locate(repo_id_or_dir, revision=revision, endpoint=endpoint, token=token, cache_dir=cache_dir)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            unfinished = any(SHARD_RE.match(p.name) for p in directory.iterdir())
            raise FileNotFoundError(
                f"{directory} is not a feature store: it has no {CONFIG_NAME}"
                + (" (it holds shards of an unfinished featurization: rerun featurize with this output_dir)" if unfinished else "")
            )
        try:
            header = json.loads(config_path.read_text())
        except ValueError as error:
            raise CorruptStoreError(f"{config_path} is not valid JSON: {error}") from error
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: unsupported store format {header.get('format_version')!r} "
                             f"(this version of diffusers-attribution reads format {FORMAT_VERSION})")
        config = AttributionConfig.from_dict(header.pop("config"))
        header.pop("format_version")
        shards, kernel_entry = header.pop("shards"), header.pop("kernel", None)
        projection_entry = header.pop("projection_file", None)
        if (header.get("projection") or {}).get("calibrated") and not projection_entry:
            raise CorruptStoreError(f"{config_path}: a calibrated projection but no {PROJECTION_NAME} entry")
        for entry in shards + [e for e in (kernel_entry, projection_entry) if e]:
            _check_file(directory / entry["file"], entry, verify)
        hashes: list[str] = []
        for entry in shards:
            path = directory / entry["file"]
            with open_shard(path) as handle:
                shape = tuple(handle.get_slice("features").get_shape())
                if shape != (entry["stop"] - entry["start"], header["dim"]):
                    raise CorruptStoreError(f"{path}: features of shape {shape}, config.json says "
                                            f"{(entry['stop'] - entry['start'], header['dim'])}")
                hashes.extend(tensor_to_hashes(handle.get_tensor("example_hashes")))
        if dataset_fingerprint(hashes) != header.get("dataset_fingerprint"):
            raise CorruptStoreError(f"{directory}: the example hashes in the shards do not match config.json's dataset_fingerprint")
        header["example_hashes"] = hashes
        store = cls(None, config, header, directory=directory, shards=shards)
        store._kernel_file = directory / kernel_entry["file"] if kernel_entry else None
        store._projection_entry = projection_entry
        return store

    def verify(self) -> None:
        """Check every file's size and sha256 against config.json; raise `CorruptStoreError` naming the first bad one."""
        if self.directory is None:
            return
        header = json.loads((self.directory / CONFIG_NAME).read_text())
        for entry in header["shards"] + [header[k] for k in ("kernel", "projection_file") if header.get(k)]:
            _check_file(self.directory / entry["file"], entry, True)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    endpoint: str | None = None, revision: str | None = None,
                    commit_message: str = "Upload feature store") -> Any:
        """Upload to a Hub dataset repository (created if needed); returns the commit info."""
        from .hub import push_store

        return push_store(self, repo_id, private=private, token=token, endpoint=endpoint, revision=revision,
                          commit_message=commit_message)


# ---------------------------------------------------------------------------------------------- files


def _check_file(path: Path, entry: dict[str, Any], full: bool) -> None:
    if not path.is_file():
        raise CorruptStoreError(f"missing store file {path}")
    size = os.path.getsize(path)
    if entry.get("bytes") is not None and size != entry["bytes"]:
        raise CorruptStoreError(f"{path} is truncated or corrupt: {size} bytes, config.json records {entry['bytes']}")
    if full and entry.get("sha256") and file_digest(path)[1] != entry["sha256"]:
        raise CorruptStoreError(f"{path} is corrupt: its sha256 differs from the one config.json records")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) < 200 else text[:200] + "…"
