"""The schema of a store's config.json: what a reader accepts before it uses anything the file says.

Every failure is a `CorruptStoreError` naming the key (`shards[2].sha256`, `config.method`, ...). What is checked:

    types, required keys, allowed values   every key below; the `config` block against AttributionConfig's
                                           own annotations, then its own validation
    file names                             plain names in the store folder (`files.check_plain_name`), and the
                                           canonical ones: shard i of n is features-{i:05d}-of-{n:05d}, the
                                           kernel kernel.safetensors, the projection projection.safetensors
    fitted                                 what the method fitted on data, one versioned section: the projection's
                                           state and the method's state (older stores: read as version 0)
    sizes and checksums                    `bytes` and `sha256` for every file (none is ever skipped)
    rows                                   the shards tile [0, num_examples) exactly: the plan of `shard_rows`,
                                           compared by arithmetic (never built: its length is the file's)
    counts                                 num_examples and dim against the bytes of the files that hold them
    size and depth                         config.json at most MAX_CONFIG_BYTES, nested at most MAX_JSON_DEPTH
    fingerprints                           the ones the store's method is pinned by (`Method.fingerprints`)

Keys this version does not know are kept as metadata and never read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from typing import Any, Union

from ..config import AttributionConfig
from .errors import CorruptStoreError
from .files import (
    FEATURE_DTYPES,
    FORMAT_VERSION,
    HASH_BYTES,
    KERNEL_NAME,
    MAX_CONFIG_BYTES,
    METHOD_STATE_NAME,
    PROJECTION_NAME,
    check_plain_name,
    load_json_bounded,
    shard_name,
)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{16}$")
REQUIRED = ("format_version", "config", "num_examples", "dim", "dtype", "shard_rows", "shards", "kernel",
            "projection", "dataset_fingerprint")
FITTED_VERSION = 1  # the version of config.json's "fitted" section (what a method fitted on data)
OPTIONAL = {"package_version": (str,), "pipeline": (str, type(None)), "family": (str, type(None)),
            "base_model": (str, type(None)), "dataset_name": (str, type(None)), "lora_adapters": (list,),
            "checkpoints": (list, type(None)), "checkpoint_block_dim": (int,)}


def parse_header(text: str | bytes | os.PathLike, where: str) -> dict[str, Any]:
    """config.json's text (or the file itself, opened once) → a dict, bounded (`files.load_json_bounded`: MAX_CONFIG_BYTES, MAX_JSON_DEPTH); invalid
    JSON, NaN / Infinity, too large, too deep, or anything but an object is a `CorruptStoreError`."""
    header = load_json_bounded(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text,
                               MAX_CONFIG_BYTES, where=where)
    if not isinstance(header, dict):
        raise CorruptStoreError(f"{where}: expected a JSON object, got {type(header).__name__}")
    return header


def validate_header(header: dict[str, Any], where: str) -> tuple[AttributionConfig, dict[str, Any]]:
    """(config, header) after every check in the module docstring; `where` names the file in errors."""
    def fail(key: str, problem: str):
        raise CorruptStoreError(f"{where}: {key} {problem}")

    for key in REQUIRED:
        if key not in header:
            fail(key, "is missing")
    if type(header["format_version"]) is not int or header["format_version"] != FORMAT_VERSION:
        raise CorruptStoreError(f"{where}: unsupported store format {header['format_version']!r} "
                                f"(this version of diffusers-attribution reads format {FORMAT_VERSION})")
    for key, allowed in OPTIONAL.items():
        if key in header and not isinstance(header[key], allowed) or key in header and _is_bool(header[key]):
            fail(key, f"must be {' or '.join(t.__name__ for t in allowed)}, got {_kind(header[key])}")
    if not all(isinstance(name, str) for name in header.get("lora_adapters", [])):
        fail("lora_adapters", "must be a list of strings")
    config = validate_config(header["config"], where)
    n = _integer(header, "num_examples", fail, minimum=1)
    dim = _integer(header, "dim", fail, minimum=1)
    rows = _integer(header, "shard_rows", fail, minimum=1)
    if header["dtype"] != config.feature_dtype:
        fail("dtype", f"must be the config's feature_dtype {config.feature_dtype!r}, got {header['dtype']!r}")
    itemsize = FEATURE_DTYPES[config.feature_dtype][0].itemsize
    if not isinstance(header["dataset_fingerprint"], str) or not FINGERPRINT_RE.match(header["dataset_fingerprint"]):
        fail("dataset_fingerprint", f"must be 16 hex digits, got {header['dataset_fingerprint']!r}")
    projection = header["projection"]
    if not isinstance(projection, dict) or not isinstance(projection.get("kind"), str):
        fail("projection", f"must be an object with a 'kind', got {_kind(projection)}")
    _check_fingerprints(header, config, fail)

    shards = header["shards"]
    if not isinstance(shards, list) or not shards:
        fail("shards", f"must be a non-empty list, got {_kind(shards)}")
    count = -(-n // rows)  # the plan of `files.shard_plan`, compared entry by entry without being built
    if len(shards) != count:
        fail("shards", f"lists {len(shards)} shards; {n} examples in shards of {rows} rows make {count}")
    for index, entry in enumerate(shards):
        key, planned = f"shards[{index}]", {"start": index * rows, "stop": min((index + 1) * rows, n)}
        _file_entry(entry, key, shard_name(index, count), fail)
        for bound in ("start", "stop"):
            value = _integer(entry, bound, lambda k, p: fail(f"{key}.{k}", p), minimum=0)
            if value != planned[bound]:
                fail(f"{key}.{bound}", f"is {value}: the shards must tile [0, {n}) in blocks of {rows} rows "
                                       f"(shard {index} holds [{planned['start']}, {planned['stop']}))")
        _backed(entry, key, (planned["stop"] - planned["start"]) * (itemsize * dim + HASH_BYTES),
                f"{planned['stop'] - planned['start']} rows of {dim} {config.feature_dtype} features and their hashes",
                fail)
    kernel = header["kernel"]
    if kernel is not None:
        _file_entry(kernel, "kernel", KERNEL_NAME, fail)
        form = "dual" if n <= dim else "primal"
        if kernel.get("form") != form:
            fail("kernel.form", f"must be {form!r} for {n} examples of {dim} features, got {kernel.get('form')!r}")
        side = n if form == "dual" else dim
        _backed(kernel, "kernel", 8 * side * side, f"a float64 {side}×{side} Gram matrix", fail)
    for key in ("fitted", "calibrated"):
        if projection.get(key) not in (None, True, False):
            fail(f"projection.{key}", f"must be true or false, got {projection.get(key)!r}")
    header = _fitted_section(header, fail)
    section = header["fitted"]
    fitted = fitted_projection(projection)
    key = "fitted.projection" if "version" in section and section["version"] else "projection_file"
    entry = section["projection"]
    if fitted and entry is None:
        fail(key, f"is null, but the projection was fitted on data: its {PROJECTION_NAME} must be listed")
    if entry is not None:
        if not fitted:
            fail(key, "is listed, but the projection was not fitted on data")
        _file_entry(entry, key, PROJECTION_NAME, fail)
    if section["method"] is not None:  # optional: the tensors a method keeps besides Φ
        _file_entry(section["method"], "fitted.method" if section["version"] else "method_state_file",
                    METHOD_STATE_NAME, fail)
    return config, header


def _fitted_section(header: dict[str, Any], fail) -> dict[str, Any]:
    """The header with its "fitted" section: {"version", "projection": the projection's state file entry or None,
    "method": the method state's or None}. Stores written before the section (0.1) list the two files at the top
    level ("projection_file", required, and "method_state_file"): read as version 0 of the section."""
    if "fitted" not in header:
        if "projection_file" not in header:
            fail("fitted", "is missing")
        header = {**header, "fitted": {"version": 0, "projection": header["projection_file"],
                                       "method": header.get("method_state_file")}}
        header.pop("projection_file")
        header.pop("method_state_file", None)
        return header
    section = header["fitted"]
    if not isinstance(section, dict) or set(section) != {"version", "projection", "method"}:
        fail("fitted", "must be an object with exactly 'version', 'projection' and 'method'")
    if type(section["version"]) is not int or section["version"] != FITTED_VERSION:
        fail("fitted.version", f"is {section['version']!r}: this version of diffusers-attribution reads version "
                               f"{FITTED_VERSION} (a newer one wrote it: upgrade to read it)")
    if "projection_file" in header or "method_state_file" in header:
        fail("fitted", "is given together with the top-level projection_file / method_state_file of older stores")
    return header


def validate_config(data: Any, where: str) -> AttributionConfig:
    """The `config` block → `AttributionConfig`: each field's JSON type against its annotation, then the config's
    own checks; anything wrong is a `CorruptStoreError` naming `config.<field>`."""
    if not isinstance(data, dict):
        raise CorruptStoreError(f"{where}: config must be an object, got {_kind(data)}")
    hints = typing.get_type_hints(AttributionConfig)
    fields = {f.name: f for f in dataclasses.fields(AttributionConfig)}
    known = set(fields)
    for key in data:
        if key not in known:
            raise CorruptStoreError(f"{where}: config.{key} is not an AttributionConfig field")
    # a field added later whose default keeps old features (its `omit`) may be missing from older stores
    later = {name: f.default for name, f in fields.items() if name not in data and f.default in f.metadata["omit"]}
    data = {**data, **later}
    for name in known:
        if name not in data:
            raise CorruptStoreError(f"{where}: config.{name} is missing")
        if not _matches(data[name], hints[name]):
            raise CorruptStoreError(f"{where}: config.{name} must be {_describe(hints[name])}, got {data[name]!r}")
    try:
        config = AttributionConfig.from_dict(data)
        # a field left out by a store written before it existed, which the method's default now fills: the store
        # meant the field's legacy value (EK-FAC's queries: the training pairs; DAS-Fisher's timesteps: all T)
        legacy = {name: fields[name].metadata["legacy"] for name in later
                  if getattr(config, name) is not None and fields[name].metadata["legacy"] is not None}
        if legacy:
            data = {**data, **legacy}
            config = AttributionConfig.from_dict(data)
    except (ValueError, TypeError, KeyError) as error:
        raise CorruptStoreError(f"{where}: config is not a valid AttributionConfig: {error}") from error
    if config.to_dict() != data:  # the defaults were resolved when it was written: nothing may be left to fill
        changed = sorted(k for k, v in config.to_dict().items() if data.get(k) != v)
        raise CorruptStoreError(f"{where}: config.{changed[0]} is {data[changed[0]]!r}, which a written store never "
                                f"records (it resolves to {getattr(config, changed[0])!r})")
    return config


def listed_entries(header: dict[str, Any]) -> list[dict[str, Any]]:
    """The entries (file, bytes, sha256) of every file a validated header lists besides config.json."""
    fitted = header["fitted"]
    return header["shards"] + [e for e in (header["kernel"], fitted["projection"], fitted["method"]) if e]


def listed_files(header: dict[str, Any]) -> list[str]:
    """The files a validated header lists, config.json first."""
    return ["config.json"] + [entry["file"] for entry in listed_entries(header)]


# ---------------------------------------------------------------------------------------------- helpers


def _file_entry(entry: Any, key: str, expected: str, fail) -> None:
    if not isinstance(entry, dict):
        fail(key, f"must be an object, got {_kind(entry)}")
    name = entry.get("file")
    try:
        check_plain_name(name, f"{key}.file")
    except CorruptStoreError as error:
        fail(f"{key}.file", str(error))
    if name != expected:
        fail(f"{key}.file", f"is {name!r}; this entry's file is named {expected!r}")
    _integer(entry, "bytes", lambda k, p: fail(f"{key}.{k}", p), minimum=0)
    if not isinstance(entry.get("sha256"), str) or not SHA256_RE.match(entry["sha256"]):
        fail(f"{key}.sha256", f"must be 64 lowercase hex digits, got {entry.get('sha256')!r}")


def _backed(entry: dict, key: str, needed: int, what: str, fail) -> None:
    """A count (rows, dims) is only believed if the file's recorded size can hold what it implies (the size
    itself is then checked against the file before anything is read)."""
    if entry["bytes"] < needed:
        fail(f"{key}.bytes", f"is {entry['bytes']}: too small for {what} ({needed} bytes)")


# What 0.1 and 0.2 stores did not record about their method (`method_facts`): the facts of the methods of
# those versions, frozen here (newer stores carry their own; nothing here asks the method registry).
_MODEL = ["model_fingerprint"]
LEGACY_METHOD_FACTS: dict[str, dict[str, Any]] = {
    "trak": {"title": "TRAK (Park et al., 2023)", "fingerprints": _MODEL, "kernel": True},
    "d-trak": {"title": "D-TRAK (Zheng et al., ICLR 2024)", "fingerprints": _MODEL, "kernel": True},
    "journey-trak": {"title": "Journey-TRAK (Georgiev et al., 2023)", "fingerprints": _MODEL, "kernel": True},
    "das": {"title": "DAS, the Diffusion Attribution Score (Lin et al., ICLR 2025)", "fingerprints": _MODEL,
            "kernel": True},
    "fisher": {"title": "Influence with the projected pair-level Fisher (after Mlodozeniec et al., ICLR 2025)",
               "fingerprints": _MODEL, "kernel": False},
    "ekfac": {"title": "EK-FAC influence, MC Fisher (Mlodozeniec et al., ICLR 2025)", "fingerprints": _MODEL,
              "kernel": False},
    "ekfac-empirical": {"title": "EK-FAC influence, empirical Fisher (after Mlodozeniec et al., ICLR 2025)",
                        "fingerprints": _MODEL, "kernel": False},
    "tracin": {"title": "Diffusion-TracIn (Xie et al., 2024)", "fingerprints": _MODEL, "kernel": False},
    "retrac": {"title": "Diffusion-ReTrac (Xie et al., 2024)", "fingerprints": _MODEL, "kernel": False},
    "pixel-dot": {"title": "pixel inner product (baseline)", "fingerprints": [], "kernel": False},
    "pixel-cosine": {"title": "pixel cosine similarity (baseline)", "fingerprints": [], "kernel": False},
    "embedding-cosine": {"title": "image-embedding cosine similarity (baseline)",
                         "fingerprints": ["projection.encoder_fingerprint"], "kernel": False},
}


def method_facts(header: dict[str, Any], method: str) -> dict[str, Any]:
    """The method's facts the writer recorded in config.json (`method_facts`: title, fingerprints, kernel), or
    those of a 0.1 / 0.2 method for stores written before they were recorded."""
    facts = header.get("method_facts")
    if isinstance(facts, dict):
        return facts
    return LEGACY_METHOD_FACTS.get(method, {"title": method, "fingerprints": _MODEL, "kernel": False})


def timestep_range(config: dict[str, Any]) -> str | None:
    """"in the lowest f of T" when a recorded config's timesteps are a fraction f of T (`timestep_fraction`), else
    None: the words the store card and `diffusers-attribution info` show."""
    fraction = config.get("timestep_fraction")
    return None if fraction in (None, 1, 1.0) else f"in the lowest {fraction} of T"


def fitted_projection(spec: Any) -> bool:
    """Whether a projection spec says it was fitted on data (its state is saved in the store): "fitted", or
    "calibrated" as 0.1 / 0.2 wrote it."""
    return isinstance(spec, dict) and (spec.get("fitted") is True or spec.get("calibrated") is True)


def _check_method_facts(header: dict[str, Any], fail) -> None:
    facts = header.get("method_facts")
    if facts is None:
        return
    if not isinstance(facts, dict):
        fail("method_facts", f"must be an object, got {_kind(facts)}")
    if facts.get("title") is not None and not isinstance(facts["title"], str):
        fail("method_facts.title", f"must be a string, got {_kind(facts['title'])}")
    if not isinstance(facts.get("kernel"), bool):
        fail("method_facts.kernel", f"must be true or false, got {_kind(facts.get('kernel'))}")
    prints = facts.get("fingerprints")
    if not isinstance(prints, list) or not all(isinstance(p, str) and 0 < len(p) <= 200 for p in prints) \
            or len(prints) > 16:
        fail("method_facts.fingerprints", "must be a list of at most 16 dotted paths")


def _check_fingerprints(header: dict[str, Any], config: AttributionConfig, fail) -> None:
    """The fingerprints the method needs (its recorded `method_facts`, dotted paths): present, non-empty, hex
    digests."""
    _check_method_facts(header, fail)
    for path in method_facts(header, config.method)["fingerprints"]:
        value: Any = header
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        leaves = _leaves(value)
        if not leaves or not any(isinstance(leaf, str) for leaf in leaves) or not all(
                leaf is None or isinstance(leaf, str) and FINGERPRINT_RE.match(leaf) for leaf in leaves):
            fail(path, f"is missing or not a fingerprint ({_kind(value)}): a store must say which model made it")


def _leaves(value: Any) -> list:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _integer(mapping: dict, key: str, fail, minimum: int) -> int:
    value = mapping.get(key)
    if type(value) is not int or value < minimum:
        fail(key, f"must be an integer >= {minimum}, got {value!r}")
    return value


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value has the type an annotation names (bool is not an int; an int is a float)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return type(value) is int
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (arg,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(item, arg) for item in value)
    if origin is dict:
        key, arg = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, arg) for k, v in value.items())
    return False


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "")


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]

