"""`FeatureStore`: projected training features Φ [N, k] with the exact configuration that produced them.

On disk (format 2), a directory:

    config.json                              AttributionConfig, projection spec, model/LoRA fingerprints,
                                             dataset size and fingerprint, package version, shard list
                                             (rows [start, stop), bytes, sha256), kernel entry
    features-00000-of-00004.safetensors      "features" float32 [rows, k], "example_hashes" uint8 [rows, 8]
    ...                                      (the content hash of each example, data.content_hash)
    kernel.safetensors                       "gram" float64: ΦᵀΦ [k, k] (N > k) or ΦΦᵀ [N, N] (N ≤ k)
    projection.safetensors                   a projection fitted on data only (its spec says "fitted", or
                                             "calibrated" as 0.2 wrote it): the projector's state, e.g. the
                                             calibrated per-layer bases ("<parameter>::out" / "::in" / "::dense")
    method_state.safetensors                 only for methods that keep tensors besides Φ (the projected Fisher's
                                             F, DAS's residuals, EK-FAC's Λ)
                                             config.json lists both in one versioned section, "fitted":
                                             {"version": 1, "projection": entry, "method": entry}
    README.md                                a dataset card (hub.store_card)

Every file is written to a temporary name, fsynced and renamed, and `config.json` is written last: a
directory without it is an unfinished featurization that `featurize(..., output_dir=...)` resumes.
Loading is lazy: shards are memory-mapped with `safe_open` and read block by block. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..config import AttributionConfig
from .errors import CorruptStoreError, NotAStoreError, StoreChangedError, StoreMismatchError
from .files import (
    FEATURE_DTYPES,
    CARD_MARKER,
    CARD_NAME,
    CONFIG_NAME,
    DEFAULT_MAX_SHARD_SIZE,
    FORMAT_VERSION,
    HASH_BYTES,
    KERNEL_NAME,
    MAX_CONFIG_BYTES,
    METHOD_STATE_NAME,
    OWN_TEMPORARY_RE,
    PROJECTION_NAME,
    SHARD_RE,
    StoreFile,
    atomic_write,
    dataset_fingerprint,
    file_digest,
    file_identity,
    identity_difference,
    load_json_bounded,
    open_shard,
    rows_per_shard,
    run_identity,
    save_safetensors,
    shard_plan,
    store_path,
    tensor_to_hashes,
    write_projection,
    write_shard,
)
from .lock import WRITER_NAME, writer_lock
from .schema import FITTED_VERSION, fitted_projection, method_facts, parse_header, validate_header


def read_shard_run(path: Path | StoreFile) -> dict[str, Any]:
    """The run identity and row range recorded in a shard's header (reads the header only), of a path or an open
    `StoreFile`."""
    if isinstance(path, StoreFile):
        meta, path = path.metadata(), path.path
    else:
        with open_shard(path) as handle:
            meta = handle.metadata() or {}
    try:
        recorded = {"start": int(meta["start"]), "stop": int(meta["stop"]), "run": json.loads(meta["run"]),
                    "process": meta.get("process")}
    except (KeyError, ValueError, TypeError, RecursionError) as error:
        raise CorruptStoreError(f"{path}: not a feature-store shard (header metadata {meta})") from error
    if not isinstance(recorded["run"], dict):
        raise CorruptStoreError(f"{path}: not a feature-store shard (its run is {recorded['run']!r})")
    return recorded


STAGING_PREFIX = ".diffusers-attribution.staging-"  # save_pretrained's complete new store, before it is moved in
OPEN_ATTEMPTS = 5  # `from_pretrained` opens a store that changed while it was being opened up to this many times

# ---------------------------------------------------------------------------------------------- store


class FeatureStore:
    """Projected training features Φ [N, k], in memory (`features`) or in shards on disk (`directory`).

    Use `blocks()` to stream rows, `features` to load them all, `save_pretrained` / `from_pretrained` /
    `push_to_hub` to share. `metadata` holds the projection spec, fingerprints, `num_examples`,
    `example_hashes` and the package version; `kernel` the float64 Gram matrix once it is computed.
    """

    def __init__(self, features: torch.Tensor | None, config: AttributionConfig, metadata: dict[str, Any] | None = None,
                 *, directory: str | os.PathLike | None = None, shards: list[dict[str, Any]] | None = None,
                 kernel: torch.Tensor | None = None, projection_state: dict[str, torch.Tensor] | None = None,
                 method_state: dict[str, torch.Tensor] | None = None):
        if features is None and (directory is None or shards is None):
            raise ValueError("a FeatureStore needs either features or a directory with shards")
        self._features = features
        self.config = config
        self.metadata = dict(metadata or {})
        self.directory = Path(directory) if directory is not None else None
        self.shards = shards or []
        self._kernel = kernel
        self._kernel_entry: dict[str, Any] | None = None
        self._projection_state = projection_state
        self._projection_entry: dict[str, Any] | None = None
        self._checked: set[str] = set()  # files whose size and sha256 matched config.json (each hashed once)
        self._identities: dict[str, tuple] = {}  # the file each name was when the store was opened (files.file_identity)
        self._method_state = method_state
        self._method_state_entry: dict[str, Any] | None = None

    @property
    def method_state(self) -> dict[str, torch.Tensor] | None:
        """Tensors the method's scorer needs besides Φ (the projected Fisher's F, DAS's residuals, EK-FAC's Λ;
        methods/fisher.py, das.py, ekfac.py); None for most methods."""
        if self._method_state is None and self._method_state_entry is not None:
            with self._open(self._method_state_entry) as handle:
                path = handle.path
                state = {key: handle.get_tensor(key) for key in handle.keys()}
            _check_finite([v for v in state.values() if v.is_floating_point()], f"{path}: the method state")
            self._method_state = state
        return self._method_state

    @method_state.setter
    def method_state(self, value: dict[str, torch.Tensor] | None) -> None:
        self._method_state, self._method_state_entry = value, None

    @property
    def projection_state(self) -> dict[str, torch.Tensor] | None:
        """What the projection fitted on data (the calibrated bases, projection/calibrated.py) that the features were
        made with; None for projections that are functions of seeds. Checked by the projector when it loads them."""
        if self._projection_state is None and self._projection_entry is not None:
            with self._open(self._projection_entry) as handle:
                path = handle.path
                for key in handle.keys():
                    if handle.get_slice(key).get_dtype() != "F32" or len(handle.get_slice(key).get_shape()) != 2:
                        raise CorruptStoreError(f"{path}: {key} is not a float32 matrix")
                state = {key: handle.get_tensor(key) for key in handle.keys()}
            _check_finite(state.values(), f"{path}: the projection state")
            self._projection_state = state
        return self._projection_state

    @property
    def method_facts(self) -> dict[str, Any]:
        """What the writer recorded about the method (title, required fingerprints, kernel or not); for stores
        written before it did, the facts of the methods of that version (schema.LEGACY_METHOD_FACTS)."""
        return method_facts(self.metadata, self.config.method)

    @property
    def kernel(self) -> torch.Tensor | None:
        """The float64 Gram matrix (ΦᵀΦ, or ΦΦᵀ when N ≤ k) if stored or computed, read from disk on first use."""
        if self._kernel is None and self._kernel_entry is not None:
            size = len(self) if self._kernel_entry["form"] == "dual" else self.dim
            with self._open(self._kernel_entry) as handle:
                path = handle.path
                _check_tensors(handle, path, {"gram": ("F64", [size, size])})
                gram = handle.get_tensor("gram")
            _check_finite([gram], f"{path}: the kernel")
            self._kernel = gram
        return self._kernel

    @kernel.setter
    def kernel(self, value: torch.Tensor | None) -> None:
        self._kernel, self._kernel_entry = value, None

    def _open(self, entry: dict[str, Any]) -> StoreFile:
        """A listed file, opened once (`files.StoreFile`): its size and, on first use, its sha256 checked against
        config.json from this very handle, which the caller then reads. A file replaced since the store was opened
        (another process rewrote the store) is hashed again: the same bytes are used, other bytes are a
        `StoreChangedError`. (A store being written lists
        planned shards, without digests yet: the writer reads back what it wrote under its lock.)"""
        name, known = entry["file"], self._identities.get(entry["file"])
        try:
            handle = StoreFile(store_path(self.directory, name))
        except CorruptStoreError:
            if known is None:
                raise
            raise StoreChangedError(f"{self.directory / name} was removed since the store was opened (another process "
                                    "is rewriting the store?): open the store again") from None
        try:
            replaced = known is not None and handle.identity != known
            if replaced:  # the same bytes under a new file are the same store; anything else is another store's
                if "sha256" not in entry or handle.size != entry["bytes"] or handle.sha256() != entry["sha256"]:
                    raise StoreChangedError(f"{handle.path} was replaced since the store was opened (another process "
                                            "rewrote the store): open the store again")
            elif "sha256" in entry:
                _check_file(handle, entry, name not in self._checked)
            if "sha256" in entry:
                self._checked.add(name)
            self._identities[name] = handle.identity
        except BaseException:
            handle.close()
            raise
        return handle

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
        """Φ [N, k] float32, all in memory (loaded from the shards on first use; prefer `blocks()` for big stores; a
        float16 / bfloat16 store keeps its stored dtype in memory and gives a float32 copy here)."""
        if self._features is None:
            self._features = torch.cat([block for _, block in self.blocks()]) if len(self) else torch.empty(0, self.dim)
        return self._features.float()

    @property
    def example_hashes(self) -> list[str]:
        return self.metadata.get("example_hashes", [])

    def blocks(self, block_rows: int | None = None, shards: Sequence[int] | None = None,
               check_finite: bool = True) -> Iterator[tuple[int, torch.Tensor]]:
        """(start row, Φ[start:start + rows] float32) for consecutive blocks of ≤ `block_rows` rows.

        `shards`: only the shards with these indices (rows are still global). Default block: ~256 MB.
        `check_finite=False`: the caller checks what it computes from the rows instead (search.exact_topk checks
        every score: a non-finite row makes its scores non-finite), saving a pass over every block.
        """
        block_rows = block_rows or max(1, (256 << 20) // (4 * max(self.dim, 1)))
        if self._features is not None:
            ranges = [(0, len(self))] if shards is None else [(self.shards[i]["start"], self.shards[i]["stop"]) for i in shards]
            for begin, end in ranges:
                for start in range(begin, end, block_rows):
                    yield start, self._features[start : min(start + block_rows, end)]
            return
        for entry in (self.shards if shards is None else [self.shards[i] for i in shards]):
            rows = entry["stop"] - entry["start"]
            with self._open(entry) as handle:
                path = handle.path
                _check_tensors(handle, path, {"features": (FEATURE_DTYPES[self.config.feature_dtype][1], [rows, self.dim]),
                                              "example_hashes": ("U8", [rows, HASH_BYTES])})
                sliced = handle.get_slice("features")
                for offset in range(0, rows, block_rows):
                    block = sliced[offset : min(offset + block_rows, rows)]
                    if check_finite:
                        _check_finite([block], f"{path}: the features of rows {entry['start'] + offset}.."
                                               f"{entry['start'] + offset + len(block) - 1}")
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
        """Raise `StoreMismatchError` unless `dataset` holds the examples this store was featurized from, in order
        (a stream is read once, in order; one that does not say its length is taken to have the store's)."""
        from ..data import StreamError, as_training_data, is_streamed

        streamed = is_streamed(dataset)
        try:
            data = as_training_data(dataset, image_column or self.config.image_column,
                                    caption_column or self.config.caption_column)
            if streamed and data.num_examples is None:
                data.num_examples, data.length_from = len(self), "the store"
            if len(data) != len(self):
                raise StoreMismatchError(f"the store has {len(self)} examples, the dataset {len(data)}")
            for index, expected in enumerate(self.example_hashes):
                if data.example_hash(index) != expected:
                    raise StoreMismatchError(f"training example {index} differs from the one the store was featurized "
                                             "from")
            data.check_end()
        except StreamError as error:
            raise StoreMismatchError(f"the dataset is not the store's: {error}") from None

    # ------------------------------------------------------------------------------------ disk

    def save_pretrained(self, directory: str | os.PathLike, *, shard_rows: int | None = None,
                        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, kernel: bool | None = None,
                        overwrite: bool = False) -> Path:
        """Write the store (shards, kernel, card, config.json last), holding the folder's writer lock.

        `kernel`: store the Gram matrix (computed if not yet known); default: for the kernel methods
        (TRAK, D-TRAK, Journey-TRAK), whose scores need it. A folder that already holds a store (or its shards)
        is an error unless `overwrite=True`, which replaces that store's own files and nothing else.

        The new store is first written complete into a hidden folder inside `directory` (`STAGING_PREFIX`), then
        moved in by renames: config.json removed, each file renamed over the old one, config.json last. Readers
        (`from_pretrained`) see the old store, the new one, or `StoreChangedError` in that instant, never a mix.
        """
        if kernel is None:
            kernel = bool(self.method_facts.get("kernel"))
        directory = Path(directory)
        if self.directory is not None and directory.exists() and directory.resolve() == self.directory.resolve():
            return directory
        hashes = self.example_hashes
        if len(hashes) != len(self):
            raise ValueError(f"the store has {len(self)} rows but {len(hashes)} example hashes")
        rows = shard_rows or rows_per_shard(self.dim, max_shard_size, self.config.feature_dtype)
        plan = shard_plan(len(self), rows)
        run = run_identity(self.config, self.metadata, len(self), rows, self.dim)
        with writer_lock(directory, run):
            check_foreign_files(directory)
            existing = (directory / CONFIG_NAME).exists() or any(SHARD_RE.match(p.name) for p in directory.iterdir())
            if existing and not overwrite:
                raise FileExistsError(f"{directory} already holds a feature store: pass overwrite=True to replace it, "
                                      "or save into another folder")
            for leftover in directory.glob(STAGING_PREFIX + "*"):  # of a save that was killed
                shutil.rmtree(leftover, ignore_errors=True)
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=directory))
            try:
                for entry in plan:
                    write_shard(staging, entry, self.rows(entry["start"], entry["stop"]),
                                hashes[entry["start"] : entry["stop"]], run, feature_dtype=self.config.feature_dtype)
                if self.projection_state is not None:
                    write_projection(staging, self.projection_state)
                staged = FeatureStore(None, self.config, {**self.metadata, "dim": self.dim, "num_examples": len(self)},
                                      directory=staging, shards=plan, kernel=self.kernel, method_state=self.method_state)
                if kernel and staged.kernel is None:
                    from .kernel import kernel_matrix

                    staged.kernel = kernel_matrix(staged)
                staged.finalize(rows, {entry["file"]: file_digest(staging / entry["file"]) for entry in plan})
                _move_in(staging, directory)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
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
        """Write kernel.safetensors (if `self.kernel`), README.md and, last, config.json for the shards in `digests`
        (the caller holds the folder's writer lock); then remove the writer's own leftovers: its temporaries, and
        shards of an earlier layout of this store."""
        directory = self.directory
        kernel_entry = None
        if self.kernel is not None:
            form = "dual" if len(self) <= self.dim else "primal"
            gram = self.kernel.detach().cpu().to(torch.float64).contiguous()
            _check_finite([gram], "the kernel")
            atomic_write(directory / KERNEL_NAME, lambda p: save_safetensors({"gram": gram}, p, {"form": form}))
            size, sha = file_digest(directory / KERNEL_NAME)
            kernel_entry = {"file": KERNEL_NAME, "form": form, "bytes": size, "sha256": sha}
        shards = [{**entry, "bytes": digests[entry["file"]][0], "sha256": digests[entry["file"]][1]} for entry in self.shards]
        projection_entry = None
        if fitted_projection(self.metadata.get("projection")):
            if not (directory / PROJECTION_NAME).is_file():
                raise CorruptStoreError(f"{directory}: the fitted projection's {PROJECTION_NAME} is missing")
            size, sha = file_digest(directory / PROJECTION_NAME)
            projection_entry = {"file": PROJECTION_NAME, "bytes": size, "sha256": sha}
        method_state_entry = None
        if self._method_state is not None:
            tensors = {key: value.detach().cpu().contiguous() for key, value in self._method_state.items()}
            _check_finite([v for v in tensors.values() if v.is_floating_point()], "the method state")
            atomic_write(directory / METHOD_STATE_NAME, lambda p: save_safetensors(tensors, p, {}))
            size, sha = file_digest(directory / METHOD_STATE_NAME)
            method_state_entry = {"file": METHOD_STATE_NAME, "bytes": size, "sha256": sha}
        metadata = {key: value for key, value in self.metadata.items() if key != "example_hashes"}
        metadata["dataset_fingerprint"] = dataset_fingerprint(self.example_hashes)
        header = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            **metadata,
            "num_examples": len(self),
            "dim": self.dim,
            "dtype": self.config.feature_dtype,
            "shard_rows": shard_rows,
            "shards": shards,
            "kernel": kernel_entry,
            "fitted": {"version": FITTED_VERSION, "projection": projection_entry, "method": method_state_entry},
        }
        try:  # what a reader will accept (store/schema.py), checked before anything is written
            validate_header(json.loads(json.dumps(header)), str(directory / CONFIG_NAME))
        except CorruptStoreError as error:
            raise ValueError(f"cannot write this store: {error}") from None
        from .hub import store_card

        check_foreign_files(directory)
        card = store_card(header, location=directory)
        atomic_write(directory / CARD_NAME, lambda p: Path(p).write_text(str(card), encoding="utf-8"))
        atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(header, indent=2)))
        _remove_own_leftovers(directory, {entry["file"] for entry in shards})
        self.shards = shards

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | os.PathLike, *, revision: str | None = None,
                        endpoint: str | None = None, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None, verify: bool = False) -> "FeatureStore":
        """Open a store from a local directory, or download a Hub dataset repository (`user/name`) first.

        Where a location is looked for: a local folder, else each store backend in turn (store/backends.py; the
        Hub's is hub.py). config.json is validated (store/schema.py), every listed file must be a regular file
        in the folder (or a Hub cache link into the same repository's blobs), its size, its safetensors header
        (names, dtypes, shapes, rows, the run it belongs to) and the example hashes are checked here; its
        sha256 when it is first read (`verify=True`: every file's now). Features stay on disk until read.
        """
        from .backends import locate

        directory = locate(repo_id_or_dir, revision=revision, endpoint=endpoint, token=token, cache_dir=cache_dir)
        for attempt in range(OPEN_ATTEMPTS):  # a rewrite seen while opening: open what it wrote, a few times
            try:
                return cls._open_directory(directory, verify)
            except StoreChangedError:
                if attempt == OPEN_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * (attempt + 1))
        raise AssertionError("unreachable")

    @classmethod
    def _open_directory(cls, directory: Path, verify: bool) -> "FeatureStore":
        """`from_pretrained` of a local folder: one consistent store, or an error. config.json is read from one
        handle held open until every listed file has been opened and checked; a writer removes config.json before
        it replaces any file (and writes it last), so if config.json is still that file at the end, every file
        read belongs to it; if not, the store was rewritten meanwhile: a `StoreChangedError`."""
        config_path = directory / CONFIG_NAME
        if not os.path.lexists(config_path):
            # a writer at work records itself; one that has just finished has renamed config.json in meanwhile
            if os.path.lexists(directory / WRITER_NAME) or os.path.lexists(config_path):
                raise StoreChangedError(f"{directory} is being written by another process (its {CONFIG_NAME} is "
                                        f"written last; it records itself in {WRITER_NAME}): open it again when that "
                                        "process has finished (if it was killed, rerun it to finish the store)")
            unfinished = any(SHARD_RE.match(p.name) for p in directory.iterdir())
            raise NotAStoreError(
                f"{directory} is not a feature store: it has no {CONFIG_NAME}"
                + (" (it holds shards of an unfinished featurization: rerun featurize with this output_dir)" if unfinished else "")
            )
        config_file = None
        try:
            config_file = StoreFile(store_path(directory, CONFIG_NAME))
            with config_file:
                store = cls._read_listed(directory, config_file, verify)
                _unchanged(config_file)
            return store
        except CorruptStoreError as error:
            if isinstance(error, StoreChangedError) or config_file is not None and not _changed(config_file) \
                    or config_file is None and os.path.lexists(config_path):
                raise
            raise StoreChangedError(f"{directory} changed while it was being opened (another process rewrote it; "
                                    f"{error}): open it again") from None

    @classmethod
    def _read_listed(cls, directory: Path, config_file: StoreFile, verify: bool) -> "FeatureStore":
        where = str(directory / CONFIG_NAME)
        if config_file.size > MAX_CONFIG_BYTES:
            raise CorruptStoreError(f"{where} is {config_file.size} bytes, more than the {MAX_CONFIG_BYTES} this file "
                                    "may have: refused before reading it")
        config, header = validate_header(parse_header(config_file.read(0, config_file.size), where), where)
        header = dict(header)
        header.pop("config")
        header.pop("format_version")
        shards, kernel_entry = header.pop("shards"), header.pop("kernel")
        fitted = header.pop("fitted")  # what the method fitted on data (schema: older stores read as version 0)
        projection_entry, method_state_entry = fitted["projection"], fitted["method"]
        run = run_identity(config, header, header["num_examples"], header["shard_rows"], header["dim"])
        identities: dict[str, tuple] = {}
        hashes: list[str] = []
        extras = [e for e in (kernel_entry, projection_entry, method_state_entry) if e]
        for index, entry in enumerate(shards + extras):
            with StoreFile(store_path(directory, entry["file"])) as handle:
                _check_file(handle, entry, verify)
                identities[entry["file"]] = handle.identity
                if index < len(shards):
                    hashes.extend(_shard_hashes(handle, entry, header["dim"], run, config))
        if dataset_fingerprint(hashes) != header["dataset_fingerprint"]:
            raise CorruptStoreError(f"{directory}: the example hashes in the shards do not match config.json's dataset_fingerprint")
        header["example_hashes"] = hashes
        store = cls(None, config, header, directory=directory, shards=shards)
        store._kernel_entry = kernel_entry
        store._projection_entry = projection_entry
        store._method_state_entry = method_state_entry
        store._identities = identities
        if verify:
            store._checked.update(identities)
        return store

    def verify(self) -> None:
        """Check every file's size and sha256 against config.json; raise `CorruptStoreError` naming the first bad one."""
        if self.directory is None:
            return
        for entry in self.listed_files:
            self._checked.discard(entry["file"])
            self._open(entry).close()

    @property
    def listed_files(self) -> list[dict[str, Any]]:
        """The entries (file, bytes, sha256) of every file config.json lists besides itself."""
        return self.shards + [e for e in (self._kernel_entry, self._projection_entry, self._method_state_entry) if e]

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    endpoint: str | None = None, revision: str | None = None,
                    commit_message: str = "Upload feature store") -> Any:
        """Upload to a Hub dataset repository (created if needed); returns the commit info."""
        from .hub import push_store

        return push_store(self, repo_id, private=private, token=token, endpoint=endpoint, revision=revision,
                          commit_message=commit_message)


# ---------------------------------------------------------------------------------------------- files


def check_foreign_files(directory: Path) -> None:
    """Refuse to write a store over files it did not create: a README.md without the store card's marker, or a
    config.json that is not a store's (a model folder, say)."""
    card = directory / CARD_NAME
    if os.path.lexists(card) and (card.is_symlink() or not _is_own_card(card.read_text(errors="replace"))):
        raise FileExistsError(f"{card} was not written by diffusers-attribution: move it away, or write the store "
                              "into another folder")
    config = directory / CONFIG_NAME
    if os.path.lexists(config):
        try:
            header = load_json_bounded(config, MAX_CONFIG_BYTES)
            ours = not config.is_symlink() and isinstance(header, dict) and {"format_version", "shards"} <= set(header)
        except (ValueError, OSError):
            ours = False
        if not ours:
            raise FileExistsError(f"{config} is not a feature store's config.json: write the store into another folder")


def _move_in(staging: Path, directory: Path) -> None:
    """Move the complete store written in `staging` into `directory` (under its writer lock): config.json removed
    first (a reader that opened the old one sees it gone: `_open_directory`), every other file renamed over its
    old self, the card regenerated for `directory`, config.json renamed in last; then the old layout's leftovers
    (shards no longer listed, the writer's temporaries) removed."""
    from .hub import store_card

    header = json.loads((staging / CONFIG_NAME).read_text(encoding="utf-8"))  # written by finalize just now
    card = str(store_card(header, location=directory))
    atomic_write(staging / CARD_NAME, lambda p: Path(p).write_text(card, encoding="utf-8"))
    (directory / CONFIG_NAME).unlink(missing_ok=True)
    for name in sorted(os.listdir(staging)):
        if name != CONFIG_NAME and not name.startswith("."):
            os.replace(staging / name, directory / name)
    os.replace(staging / CONFIG_NAME, directory / CONFIG_NAME)
    _remove_own_leftovers(directory, {entry["file"] for entry in header["shards"]})


def _remove_own_leftovers(directory: Path, listed: set[str]) -> None:
    """The writer's own temporaries, and shards of an earlier layout of this store that it no longer lists."""
    for stale in directory.iterdir():
        if OWN_TEMPORARY_RE.match(stale.name) or SHARD_RE.match(stale.name) and stale.name not in listed \
                and _is_own_shard(stale):
            stale.unlink(missing_ok=True)


def _is_own_card(text: str) -> bool:
    """A card this library wrote: with the marker, or one of the cards written before it had one (0.1.0)."""
    legacy = "\n# Attribution features: " in text and "made with\ndiffusers-attribution." in text
    return CARD_MARKER in text or legacy


def _is_own_shard(path: Path) -> bool:
    try:
        read_shard_run(path)
    except CorruptStoreError:
        return False
    return not path.is_symlink()


def _feature_hashes(config: AttributionConfig) -> set[str]:
    """The feature hashes a shard of `config` may record: today's, and those of earlier versions, so that stores
    written then still load: before a method's own fields were hashed (EK-FAC's damping, issue 24); before
    TracIn's and Journey-TRAK's query fields became query-side (session 9: they were hashed); before the config's
    fields had roles (0.1.0: the data columns were hashed too)."""
    import hashlib

    before = config.feature_dict(method_fields=False)
    queries = {name: getattr(config, name) for name in ("query_timesteps", "query_noise_draws")
               if getattr(config, name) is not None}
    columns = {"image_column": config.image_column, "caption_column": config.caption_column}
    variants = (before, {**before, **queries}, {**before, **queries, **columns}, {**before, **columns})
    return {config.feature_hash()} | {hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":"))
                                                     .encode()).hexdigest()[:16] for fields in variants}


def _check_file(handle: StoreFile, entry: dict[str, Any], full: bool) -> None:
    """An open file's size (and, if `full`, the sha256 of the bytes read through the same handle) against its
    config.json entry."""
    if handle.size != entry["bytes"]:
        raise CorruptStoreError(f"{handle.path} is truncated or corrupt: {handle.size} bytes, config.json records "
                                f"{entry['bytes']}")
    if full and handle.sha256() != entry["sha256"]:
        raise CorruptStoreError(f"{handle.path} is corrupt: its sha256 differs from the one config.json records")


def _shard_hashes(handle: StoreFile, entry: dict[str, Any], dim: int, run: dict[str, Any],
                  config: AttributionConfig) -> list[str]:
    """The example hashes of an open shard, after checking its tensors' header and the run it belongs to."""
    path, rows = handle.path, entry["stop"] - entry["start"]
    _check_tensors(handle, path, {"features": (FEATURE_DTYPES[config.feature_dtype][1], [rows, dim]),
                                  "example_hashes": ("U8", [rows, HASH_BYTES])})
    recorded = read_shard_run(handle)
    if (recorded["start"], recorded["stop"]) != (entry["start"], entry["stop"]):
        raise CorruptStoreError(f"{path} holds rows [{recorded['start']}, {recorded['stop']}), config.json "
                                f"lists it for [{entry['start']}, {entry['stop']})")
    differ = identity_difference(recorded["run"], run, [key for key in run if key != "feature_hash"])
    if not differ and recorded["run"].get("feature_hash") not in _feature_hashes(config):
        differ = (["feature_hash"], f"{recorded['run'].get('feature_hash')!r} there, {run['feature_hash']!r} now")
    if differ:
        raise CorruptStoreError(f"{path} belongs to another run than config.json ({', '.join(differ[0])} "
                                f"differ: {differ[1]})")
    return tensor_to_hashes(handle.get_tensor("example_hashes"))


def _changed(config_file: StoreFile) -> bool:
    """Whether the store's config.json is no longer the file `config_file` opened (removed or replaced)."""
    try:
        return file_identity(os.stat(config_file.path)) != config_file.identity
    except OSError:
        return True


def _unchanged(config_file: StoreFile) -> None:
    if _changed(config_file):
        raise StoreChangedError(f"{config_file.path} was replaced while the store was being opened (another process "
                                "rewrote it): open it again")


def _check_tensors(handle, path: Path, expected: dict[str, tuple[str, list[int]]]) -> None:
    """The file holds exactly these tensors, with these dtypes and shapes (read from the header: nothing allocated)."""
    if sorted(handle.keys()) != sorted(expected):
        raise CorruptStoreError(f"{path} holds tensors {sorted(handle.keys())}, expected {sorted(expected)}")
    for key, (dtype, shape) in expected.items():
        sliced = handle.get_slice(key)
        if sliced.get_dtype() != dtype or list(sliced.get_shape()) != shape:
            raise CorruptStoreError(f"{path}: {key} is {sliced.get_dtype()} {list(sliced.get_shape())}, "
                                    f"config.json says {dtype} {shape}")


def _check_finite(tensors, what: str) -> None:
    for tensor in tensors:
        if not torch.isfinite(tensor).all():
            raise CorruptStoreError(f"{what} contain NaN or infinite values")


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) < 200 else text[:200] + "…"
