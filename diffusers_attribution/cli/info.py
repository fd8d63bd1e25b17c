"""`info`: what a feature store holds, how it was made, and its size, read from its config.json, checked as loading
checks it (schema, size, no symbolic link out of the folder).

    diffusers-attribution info STORE              # a store directory or a Hub dataset repo id
    diffusers-attribution info STORE --json       # config.json as it is
    diffusers-attribution info STORE --verify     # also check every file's sha256
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from .attribute import printable
from .options import add_hub_arguments, add_subparser, step

CONFIG_NAME = "config.json"  # the store's header (store.py)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_subparser(subparsers, "info", "what a feature store holds: config, fingerprints, size on disk", __doc__)
    parser.add_argument("store", metavar="STORE", help="a store directory or a Hub dataset repo id (user/name)")
    parser.add_argument("--json", action="store_true", help="print the store's config.json")
    parser.add_argument("--verify", action="store_true", help="check every file's size and sha256 (reads them all)")
    add_hub_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    directory, header = read_header(args)
    if directory is not None:  # a local store (or one --verify downloaded): every check loading makes
        from ..store import FeatureStore

        if args.verify:
            with step(f"checking the sha256 of every file of {directory}"):
                FeatureStore.from_pretrained(directory, verify=True)
        else:
            FeatureStore.from_pretrained(directory)
    if args.json:
        print(json.dumps(header, indent=2))
    else:
        print(describe(header, directory, verified=args.verify))
    return 0


def read_header(args: argparse.Namespace) -> tuple[Path | None, dict]:
    """(local directory or None, config.json) of a store directory, or of a Hub repo, after the checks loading makes:
    config.json a regular file of the folder (no symbolic link out of it), bounded, and valid (store/schema.py);
    a malformed store is the library's `CorruptStoreError`. From the Hub only config.json is fetched, or with
    --verify the files it lists (store/hub.py `download_store`), never a repository's other files."""
    from ..store.files import store_path
    from ..store.schema import parse_header, validate_header

    path = Path(args.store)
    if not path.is_dir():
        from ..store.hub import download_store, is_repo_id

        if not is_repo_id(args.store):
            raise SystemExit(f"error: no feature store at {args.store!r}: not a directory, and not a Hub repo id")
        from huggingface_hub import hf_hub_download

        options = dict(revision=args.revision, endpoint=args.endpoint, token=args.token)
        try:
            if args.verify:
                path = download_store(args.store, **options)
            else:
                where = f"{args.store}/{CONFIG_NAME}"
                config = Path(hf_hub_download(args.store, CONFIG_NAME, repo_type="dataset", **options))
                return None, validate_header(parse_header(config, where), where)[1]
        except (ValueError, FileNotFoundError):
            raise
        except Exception as error:  # noqa: BLE001 - any Hub failure ends here, named
            raise SystemExit(f"error: cannot read the store {args.store!r} from the Hub: {error}") from None
    if not os.path.lexists(path / CONFIG_NAME):
        raise SystemExit(f"error: {path} is not a feature store: it has no {CONFIG_NAME}")
    where = str(path / CONFIG_NAME)
    return path, validate_header(parse_header(store_path(path, CONFIG_NAME), where), where)[1]


def describe(header: dict, directory: Path | None, verified: bool = False) -> str:
    """A readable summary of a store's config.json."""
    from ..store.schema import timestep_range

    config = header.get("config", {})
    within = timestep_range(config)
    shards = header.get("shards", [])
    parts = {"features": sum(int(s.get("bytes", 0)) for s in shards)}
    fitted = header.get("fitted") or {"projection": header.get("projection_file"),  # older stores: top level
                                      "method": header.get("method_state_file")}
    for name, entry in (("kernel", header.get("kernel")), ("projection", fitted.get("projection")),
                        ("method state", fitted.get("method"))):
        if entry:
            parts[name] = int(entry.get("bytes", 0))
    lora = header.get("lora_adapters") or []
    fingerprint = header.get("model_fingerprint") or {}
    lines = [
        f"store         {directory if directory is not None else '(Hub) config.json only'}",
        f"examples      N = {header.get('num_examples')} of {header.get('dataset_name') or 'an unnamed dataset'}",
        f"features      k = {header.get('dim')} ({header.get('dtype', 'float32')}), "
        f"{len(shards)} shard(s) of <= {header.get('shard_rows')} rows",
        f"method        {config.get('method')} (output {config.get('output')}), K = {config.get('num_timesteps')} "
        f"{config.get('timestep_schedule')} timesteps{f' {within}' if within else ''}, noise {config.get('noise_mode')} seed "
        f"{config.get('noise_seed')}",
        f"projection    {config.get('projector')} (seed {config.get('projection_seed')})"
        + (", calibrated on {} examples".format(config.get("calibration_examples"))
           if config.get("calibration_examples") else ""),
        f"parameters    {config.get('parameters')}" + (f", LoRA adapters {', '.join(lora)}" if lora else ""),
        f"pipeline      {header.get('pipeline')} (family {header.get('family')}), "
        f"base model {header.get('base_model') or 'not recorded'}",
        f"kernel        {header['kernel']['form'] + ' Gram matrix' if header.get('kernel') else 'not stored'}",
        "fingerprints  dataset {}; model {}".format(header.get("dataset_fingerprint"),
                                                    json.dumps(fingerprint, sort_keys=True)),
        f"feature hash  {_feature_hash(config)}",
        f"size          {_size(sum(parts.values()))} ({', '.join(f'{k} {_size(v)}' for k, v in parts.items())})",
    ]
    if directory is not None:
        on_disk = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
        lines.append(f"on disk       {_size(on_disk)} in {directory}")
    lines.append(f"written by    diffusers-attribution {header.get('package_version')}, store format "
                 f"{header.get('format_version')}" + (" — every sha256 checked" if verified else ""))
    lines.append("config        " + json.dumps({k: v for k, v in sorted(config.items()) if v not in (None, {}, [])}))
    return "\n".join(printable(line) for line in lines)  # a name with a newline cannot add a line


def _feature_hash(config: dict) -> str:
    from ..config import AttributionConfig

    try:
        return AttributionConfig.from_dict(config).feature_hash()
    except ValueError as error:
        return f"unreadable ({error})"


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.0f} {unit}" if unit == "B" else f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""
