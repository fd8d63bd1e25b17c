"""The files of a feature store: their names, atomic writes, shards, the fitted projection, digests.

    config.json                              written last: a folder without it is an unfinished featurization
    features-00000-of-00004.safetensors      "features" float32 [rows, k], "example_hashes" uint8 [rows, 8];
                                             header: rows [start, stop) and the run identity (`run_identity`)
    kernel.safetensors                       "gram" float64
    projection.safetensors                   a fitted projection's state, with what it was fitted on
    README.md                                the dataset card (hub.store_card)

Every file is written to a temporary name in the same folder, fsynced and renamed (`atomic_write`).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import mmap
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open

from .errors import CorruptStoreError

FORMAT_VERSION = 2
CONFIG_NAME = "config.json"
KERNEL_NAME = "kernel.safetensors"
PROJECTION_NAME = "projection.safetensors"
METHOD_STATE_NAME = "method_state.safetensors"
CARD_NAME = "README.md"
CARD_MARKER = "<!-- diffusers-attribution store card, generated from config.json -->"  # a README.md we may rewrite
DEFAULT_MAX_SHARD_SIZE = "2GB"
HASH_BYTES = 8  # data.content_hash: 16 hex digits
SHARD_RE = re.compile(r"^features-(\d{5})-of-(\d{5})\.safetensors$")
# The temporaries `atomic_write` makes for the store's own files: the only hidden files a writer ever deletes.
OWN_TEMPORARY_RE = re.compile(r"^\.(config\.json|README\.md|kernel\.safetensors|projection\.safetensors|method_state\.safetensors|"
                              r"features-\d{5}-of-\d{5}\.safetensors|diffusers-attribution\.writer\.json)"
                              r"\.[0-9a-f]{12}\.tmp$")


MAX_CONFIG_BYTES = 16 << 20  # a store's config.json: ~200 bytes a shard, so ~80k shards; real ones are a few KB
MAX_JSON_DEPTH = 32  # nesting of any JSON read from outside (config.json is 4 deep; adapter options a few more)
_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
_JSON_BRACKET_RE = re.compile(r"[\[\]{}]")
_JSON_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def load_json_bounded(source: str | os.PathLike | bytes, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, *,
                      where: str | None = None, error: type[Exception] = CorruptStoreError) -> Any:
    """JSON from a file or bytes that may be hostile: the size checked before anything is read (a file is opened
    once, its size read from that handle, and at most `max_bytes` + 1 bytes read), UTF-8, the nesting depth
    counted on the text without recursion, NaN / Infinity refused; then parsed. Every failure is `error`
    (the library's `CorruptStoreError` for store files, `ValueError` for the CLI's files) naming `where`."""
    where = where or ("the JSON" if isinstance(source, (bytes, bytearray)) else str(source))
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source[: max_bytes + 1])
    else:
        try:
            with open(source, "rb") as handle:
                if os.fstat(handle.fileno()).st_size > max_bytes:
                    raise error(f"{where} is {os.fstat(handle.fileno()).st_size} bytes, more than the {max_bytes} "
                                "this file may have: refused before reading it")
                data = handle.read(max_bytes + 1)
        except OSError as failure:
            raise error(f"cannot read {where}: {failure.strerror or failure}") from None
    if len(data) > max_bytes:
        raise error(f"{where} is more than {max_bytes} bytes: refused")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as failure:
        raise error(f"{where} is not UTF-8 text: {failure}") from None
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{where} nests {depth} levels deep, more than the {max_depth} a valid file has: refused")

    refused = []

    def refuse(constant):
        refused.append(constant)
        raise ValueError(constant)

    try:
        return json.loads(text, parse_constant=refuse)
    except ValueError as failure:
        if refused:
            raise error(f"{where}: {refused[0]} is not a valid JSON value here") from None
        raise error(f"{where} is not valid JSON: {failure}") from None


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text (strings skipped), counted without recursion."""
    steps = map(_JSON_STEP.__getitem__, _JSON_BRACKET_RE.findall(_JSON_STRING_RE.sub('""', text)))
    return max(itertools.accumulate(steps), default=0)


def shard_name(index: int, count: int) -> str:
    return f"features-{index:05d}-of-{count:05d}.safetensors"


def shard_plan(num_examples: int, shard_rows: int) -> list[dict[str, Any]]:
    """Shards covering rows [0, N): shard i holds rows [i·shard_rows, min((i+1)·shard_rows, N))."""
    count = -(-num_examples // shard_rows)
    return [
        {"file": shard_name(i, count), "start": i * shard_rows, "stop": min((i + 1) * shard_rows, num_examples)}
        for i in range(count)
    ]


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "2GB" (10⁹) or "512MiB" (2²⁰), as in `save_pretrained`."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", size, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"cannot read a size from {size!r}; use e.g. 2GB, 500MB or a number of bytes")
    unit = (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(match.group(1)) * scale)


# The stored features' dtypes (`AttributionConfig.feature_dtype`): torch dtype and safetensors code.
FEATURE_DTYPES = {"float32": (torch.float32, "F32"), "float16": (torch.float16, "F16"),
                  "bfloat16": (torch.bfloat16, "BF16")}


def rows_per_shard(dim: int, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, feature_dtype: str = "float32") -> int:
    """The number of rows of width `dim` (in `feature_dtype`) that fit in `max_shard_size`."""
    return max(1, parse_size(max_shard_size) // (FEATURE_DTYPES[feature_dtype][0].itemsize * dim))


def hashes_to_tensor(hashes: Sequence[str]) -> torch.Tensor:
    data = bytearray(b"".join(bytes.fromhex(h) for h in hashes))
    if len(data) != HASH_BYTES * len(hashes):
        raise ValueError(f"example hashes must be {2 * HASH_BYTES} hex digits")
    return torch.frombuffer(data, dtype=torch.uint8).view(len(hashes), HASH_BYTES).clone()


def tensor_to_hashes(tensor: torch.Tensor) -> list[str]:
    return [bytes(row).hex() for row in tensor.numpy()]


def dataset_fingerprint(hashes: Sequence[str]) -> str:
    return hashlib.sha256("".join(hashes).encode()).hexdigest()[:16]


@contextlib.contextmanager
def open_shard(path: Path) -> Iterator[Any]:
    """`safe_open` a shard (memory-mapped, no pickle); read errors become a `CorruptStoreError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CorruptStoreError(f"missing store file {path}")
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as error:
        raise CorruptStoreError(f"{path} is corrupt or truncated: {error}") from error
    try:
        with handle:
            yield handle
    except SafetensorError as error:
        raise CorruptStoreError(f"{path} is corrupt or truncated: {error}") from error


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit


class StoreFile:
    """A store file opened once, without following a symbolic link: its size, identity, sha256 and tensors are all
    read from this one handle, so the bytes that were checked are the bytes that are used (a writer replaces
    files by renaming new ones over them: an open handle keeps reading the file it opened).

    Reads a safetensors file as `safe_open` does (`keys`, `metadata`, `get_slice`, `get_tensor`), its header parsed
    with `load_json_bounded` and every offset checked against the file's size. Tensors are views of a private
    (copy-on-write) memory map of this same handle: no copy, the page cache's bytes read once by whoever computes
    with them (writes to a tensor stay private). Any failure is a `CorruptStoreError` naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
                              | getattr(os, "O_BINARY", 0))
        except FileNotFoundError:
            raise CorruptStoreError(f"missing store file {self.path}") from None
        except OSError as error:
            raise CorruptStoreError(f"cannot open {self.path} (not a regular file?): {error.strerror}") from None
        info = os.fstat(self.fd)
        if not stat.S_ISREG(info.st_mode):
            self.close()
            raise CorruptStoreError(f"{self.path} is not a regular file")
        self.size = info.st_size
        self.identity = file_identity(info)
        self._header: dict[str, Any] | None = None
        self._data_start = 0
        self._map: mmap.mmap | None = None

    def __enter__(self) -> "StoreFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the handle; a memory map stays valid for the tensors that view it (it closes with the last)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def mapped(self) -> mmap.mmap:
        """A private (copy-on-write) memory map of the whole file, made from this handle once."""
        if self._map is None:
            self._map = mmap.mmap(self.fd, self.size, access=mmap.ACCESS_COPY)
        return self._map

    def read(self, offset: int, count: int) -> bytearray:
        """`count` bytes from `offset`; fewer (the file was truncated under us) is a `CorruptStoreError`."""
        data = bytearray(count)
        view, done = memoryview(data), 0
        while done < count:
            chunk = _pread_into(self.fd, view[done:], offset + done)
            if chunk <= 0:
                raise CorruptStoreError(f"{self.path} is truncated: {count} bytes expected at offset {offset}")
            done += chunk
        return data

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for offset in range(0, self.size, 8 << 20):
            digest.update(self.read(offset, min(8 << 20, self.size - offset)))
        return digest.hexdigest()

    # -------------------------------------------------------------------------------- safetensors

    def header(self) -> dict[str, Any]:
        if self._header is None:
            if self.size < 8:
                raise CorruptStoreError(f"{self.path} is corrupt or truncated: {self.size} bytes")
            length = int.from_bytes(self.read(0, 8), "little")
            if length > min(self.size - 8, MAX_SAFETENSORS_HEADER):
                raise CorruptStoreError(f"{self.path} is corrupt or truncated: a header of {length} bytes")
            header = load_json_bounded(self.read(8, length), length, 4, where=f"{self.path}: its safetensors header")
            self._data_start, data_size = 8 + length, self.size - 8 - length
            if not isinstance(header, dict):
                raise CorruptStoreError(f"{self.path}: its safetensors header is not an object")
            metadata = header.get("__metadata__", {})
            if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
                raise CorruptStoreError(f"{self.path}: its safetensors metadata is not a map of strings")
            spans = []
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape, span = (info.get(k) for k in ("dtype", "shape", "data_offsets")) \
                    if isinstance(info, dict) else (None, None, None)
                if dtype not in _SAFETENSORS_DTYPES or not isinstance(shape, list) or not isinstance(span, list) \
                        or len(span) != 2 or not all(type(v) is int and v >= 0 for v in shape + span):
                    raise CorruptStoreError(f"{self.path}: tensor {name!r} has no valid dtype, shape and offsets")
                count = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
                if span[1] - span[0] != count or span[1] > data_size:
                    raise CorruptStoreError(f"{self.path} is corrupt or truncated: tensor {name!r} {dtype} {shape} "
                                            f"does not fit bytes {span} of {data_size}")
                spans.append(span)
            spans.sort()
            if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
                raise CorruptStoreError(f"{self.path} is corrupt: its tensors overlap")
            self._header = header
        return self._header

    def keys(self) -> list[str]:
        return [name for name in self.header() if name != "__metadata__"]

    def metadata(self) -> dict[str, str]:
        return dict(self.header().get("__metadata__", {}))

    def get_slice(self, name: str) -> "_TensorSlice":
        if name not in self.keys():
            raise CorruptStoreError(f"{self.path} holds no tensor {name!r}")
        return _TensorSlice(self, name, self.header()[name])

    def get_tensor(self, name: str) -> torch.Tensor:
        return self.get_slice(name)[:]


class _TensorSlice:
    """A tensor of a `StoreFile`: its dtype and shape from the header; rows read on indexing (`[a:b]`)."""

    def __init__(self, file: StoreFile, name: str, info: dict[str, Any]):
        self.file, self.name, self.info = file, name, info

    def get_dtype(self) -> str:
        return self.info["dtype"]

    def get_shape(self) -> list[int]:
        return list(self.info["shape"])

    def __getitem__(self, rows: slice) -> torch.Tensor:
        shape, dtype = self.get_shape(), _SAFETENSORS_DTYPES[self.info["dtype"]]
        if not shape:
            return torch.frombuffer(self.file.read(self.file._data_start + self.info["data_offsets"][0],
                                                   dtype.itemsize), dtype=dtype).reshape(())
        start, stop, step = rows.indices(shape[0])
        if step != 1:
            raise ValueError("only contiguous row ranges are read")
        stop = max(start, stop)
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        if stop == start or row_bytes == 0:
            return torch.empty([stop - start, *shape[1:]], dtype=dtype)
        offset = self.file._data_start + self.info["data_offsets"][0] + start * row_bytes
        count = (stop - start) * math.prod(shape[1:])
        return torch.frombuffer(self.file.mapped(), dtype=dtype, count=count, offset=offset).reshape([stop - start, *shape[1:]])


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into `view` from `offset` of `fd` without moving a shared file position where the OS allows."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    os.lseek(fd, offset, os.SEEK_SET)  # Windows: the handle is this StoreFile's own
    data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


def file_identity(info: os.stat_result) -> tuple[int, ...]:
    """What tells one file from the file that replaced it under the same name (device, inode, size, times)."""
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns


def run_identity(config, metadata: dict[str, Any], num_examples: int, shard_rows: int,
                 dim: int) -> dict[str, Any]:
    """What makes two featurizations write the same shards; stored in every shard to make resuming safe."""
    return {
        "feature_hash": config.feature_hash(),
        "projection": _digest(metadata.get("projection")),
        "model_fingerprint": metadata.get("model_fingerprint"),
        "num_examples": num_examples,
        "shard_rows": shard_rows,
        "dim": dim,
    }


def write_shard(directory: Path, entry: dict[str, Any], features: torch.Tensor, hashes: Sequence[str],
                run: dict[str, Any], process: str = "0/1", feature_dtype: str = "float32") -> None:
    """Write one shard atomically: `features` [stop - start, k] float32 and the rows' example hashes.

    `process` ("rank/world") is recorded in the header, to tell which process wrote which shard."""
    rows = entry["stop"] - entry["start"]
    if features.shape[0] != rows or len(hashes) != rows:
        raise ValueError(f"{entry['file']}: expected {rows} rows, got {features.shape[0]} features, {len(hashes)} hashes")
    tensors = {"features": features.detach().to("cpu", FEATURE_DTYPES[feature_dtype][0]).contiguous(),
               "example_hashes": hashes_to_tensor(hashes)}
    metadata = {"start": str(entry["start"]), "stop": str(entry["stop"]), "run": json.dumps(run, sort_keys=True),
                "process": process}
    atomic_write(directory / entry["file"], lambda path: save_safetensors(tensors, path, metadata))


def atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    """`write(temporary)` in the same directory, fsync, then rename over `path`: readers never see half a file.

    The temporary is created with mode 0666 minus the process's umask, as `open` would (mkstemp's 0600 would
    hide a shared store from the group), and `write` writes into it in place, so the file keeps that mode."""
    path = Path(path)
    while True:
        temporary = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.uint8: "U8", torch.int64: "I64", torch.float16: "F16",
           torch.bfloat16: "BF16"}


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """A safetensors file whose bytes are a function of its contents: the header is JSON with sorted keys (the
    library's own writer orders metadata by a hash map), tensors follow by (element size descending, name), so
    each is aligned, and the only padding is the header's spaces to 8 bytes."""
    header: dict[str, Any] = {"__metadata__": dict(sorted((metadata or {}).items()))} if metadata else {}
    arrays, offset = [], 0
    for name in sorted(tensors, key=lambda key: (-tensors[key].element_size(), key)):
        tensor = tensors[name].detach().cpu().contiguous()
        if tensor.dtype not in _DTYPES:
            raise TypeError(f"cannot save a {tensor.dtype} tensor {name!r}")
        data = tensor.view(-1).view(torch.uint8).numpy() if tensor.numel() else b""
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        arrays.append(data)
        offset += size
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for data in arrays:
            handle.write(memoryview(data) if len(data) else b"")


def check_plain_name(name: Any, key: str = "file") -> str:
    """`name` if it is a plain file name inside a folder: a non-empty string, no separator, not `.`/`..`, not
    absolute, not hidden (hidden names are the writer's own temporaries and lock); else a `CorruptStoreError`."""
    if not isinstance(name, str) or not name:
        raise CorruptStoreError(f"{key}: a file name must be a non-empty string, got {name!r}")
    if "/" in name or "\\" in name or "\0" in name or name.startswith(".") or os.path.isabs(name) \
            or os.path.basename(name) != name:
        raise CorruptStoreError(f"{key}: {name!r} is not a plain file name inside the store's folder")
    return name


def link_root(directory: Path) -> Path | None:
    """The `blobs/` folder of a huggingface_hub cache snapshot (`<repo>/snapshots/<commit>/`), whose entries are
    symbolic links into `<repo>/blobs/` by design; None for any other folder."""
    directory = Path(os.path.realpath(directory))
    blobs = directory.parent.parent / "blobs"
    if directory.parent.name == "snapshots" and blobs.is_dir() and not os.path.islink(blobs):
        return blobs
    return None


def store_path(directory: Path, name: str, key: str = "file") -> Path:
    """The path to read store file `name` from, after checking it stays inside the store: a regular file in
    `directory` (checked with lstat, so a symbolic link is not followed), or, in a Hub cache snapshot, a link to a
    regular file in the same repository's `blobs/` (`link_root`), whose resolved path is returned. Anything
    else (a link leaving the folder, a directory, a device) is a `CorruptStoreError`."""
    check_plain_name(name, key)
    path = Path(directory) / name
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise CorruptStoreError(f"missing store file {path}") from None
    if stat.S_ISREG(info.st_mode):
        return path
    if stat.S_ISLNK(info.st_mode):
        root, target = link_root(Path(directory)), Path(os.path.realpath(path))
        if root is not None and target.parent == root and os.path.exists(target) \
                and stat.S_ISREG(os.lstat(target).st_mode):
            return target
        raise CorruptStoreError(f"{path} is a symbolic link to {target}, outside the store's folder: refused")
    raise CorruptStoreError(f"{path} is not a regular file")


def write_projection(directory: Path, state: dict[str, torch.Tensor], identity: dict[str, Any] | None = None) -> None:
    """projection.safetensors: the calibrated bases, with what they were calibrated on (`identity`) as metadata."""
    tensors = {key: value.detach().cpu().float().contiguous() for key, value in state.items()}
    metadata = {"identity": json.dumps(identity or {}, sort_keys=True)}
    atomic_write(directory / PROJECTION_NAME, lambda p: save_safetensors(tensors, p, metadata))


def read_projection(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(bases state, identity) of a projection.safetensors; a truncated or foreign file is a `CorruptStoreError`."""
    with open_shard(path) as handle:
        identity = load_json_bounded((handle.metadata() or {}).get("identity", "{}").encode(), 64 << 20,
                                     where=f"{path}: its identity")
        return {key: handle.get_tensor(key) for key in handle.keys()}, identity


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(8 << 20), b""):
            digest.update(chunk)
    return os.path.getsize(path), digest.hexdigest()




def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def identity_difference(recorded: Mapping[str, Any], current: Mapping[str, Any], keys=None) -> tuple[list, str] | None:
    """None if `recorded` and `current` agree on `keys` (default: all of `current`'s), else (the keys that differ,
    "{...} there, {...} now"): the one check that tells whether a resumable folder holds this very run."""
    differ = [key for key in (keys or current) if recorded.get(key) != current.get(key)]
    if not differ:
        return None
    return differ, f"{ {key: recorded.get(key) for key in differ} } there, { {key: current.get(key) for key in differ} } now"
