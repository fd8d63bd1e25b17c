"""What several subcommands share: `AttributionConfig` flags, loading a pipeline, a training set or query images,
and saying what a slow step is doing. Importing this module imports no torch.

Every `AttributionConfig` field is a flag (`--kebab-name`), made from the field itself: its type from the
annotation, `choices`, `help`, `metavar` and a `flag` spelling from its metadata (config.py); a field with
`cli=False` has none. Method and projector names are not argparse choices: their registries import every method
module (and torch) to list them, so a wrong name is reported by `AttributionConfig` after parsing, with the
registered names."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import types
import typing
from pathlib import Path
from typing import Any

from ..config import PARAMETER_SETS, AttributionConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_CONFIG_FILE_BYTES = 1 << 20  # an AttributionConfig is a few hundred bytes


def config_flags() -> list[tuple[str, str, dict[str, Any]]]:
    """(flag, AttributionConfig field, argparse keywords) of every field with a flag; each defaults to None = "not
    given". A list field takes several values (`nargs="+"`), a dict field is a repeatable KEY=JSON."""
    hints = typing.get_type_hints(AttributionConfig)
    flags = []
    for field in dataclasses.fields(AttributionConfig):
        metadata = field.metadata
        if not metadata["cli"]:
            continue
        kind, item = _flag_type(field.name, hints[field.name])
        keywords: dict[str, Any] = {"help": metadata["help"]}
        if field.default is not None and field.default is not dataclasses.MISSING:
            keywords["help"] += f" (default: {field.default})"
        if metadata["choices"] is not None:
            keywords["choices"] = metadata["choices"]
        else:
            keywords["metavar"] = metadata["metavar"] or field.name.upper()
        if kind is bool:
            keywords["action"] = argparse.BooleanOptionalAction
            keywords.pop("metavar", None)
        elif kind is dict:
            keywords["action"] = "append"
        else:
            if kind is list:
                keywords["nargs"] = "+"
            if item is not str:
                keywords["type"] = item
        flags.append((metadata["flag"] or "--" + field.name.replace("_", "-"), field.name, keywords))
    return flags


def _flag_type(name: str, hint) -> tuple[type, type | None]:
    """(kind, item type) of a field's annotation, None left out: (int | float | str | bool, itself), (list, the
    first scalar of its items), or (dict, None)."""
    members = _union_members(hint)
    for member in members:
        origin = typing.get_origin(member) or member
        if origin is dict:
            return dict, None
        if origin is list:
            items = [m for arg in typing.get_args(member) for m in _union_members(arg) if m in (int, float, str)]
            if items:
                return list, items[0]
    for scalar in (bool, int, float, str):
        if scalar in members:
            return scalar, scalar
    raise TypeError(f"AttributionConfig.{name}: no CLI flag for the type {hint}; give its field cli=False")


def _union_members(hint) -> list:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return [hint]


def add_config_arguments(parser: argparse.ArgumentParser, config_file: bool = True) -> None:
    """The `AttributionConfig` flags (and `--config FILE`), in their own help group."""
    group = parser.add_argument_group("attribution config (flags override --config; docs: AttributionConfig)")
    if config_file:
        group.add_argument("--config", metavar="JSON", help="an AttributionConfig as a JSON file")
    for flag, field, keywords in config_flags():
        group.add_argument(flag, dest=f"config_{field}", default=None, **keywords)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, as AttributionConfig keywords."""
    overrides = {}
    for flag, field, keywords in config_flags():
        value = getattr(args, f"config_{field}", None)
        if value is None:
            continue
        if keywords.get("action") == "append":
            value = dict(_key_value(flag, option) for option in value)
        overrides[field] = value
    if isinstance(overrides.get("parameters"), list) and len(overrides["parameters"]) == 1 \
            and overrides["parameters"][0] in PARAMETER_SETS:
        overrides["parameters"] = overrides["parameters"][0]
    return overrides


def config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None):
    """`AttributionConfig` from `base` (fields as written, not resolved), then `--config`, then the flags."""
    from ..config import AttributionConfig

    fields = dict(base or {})
    if getattr(args, "config", None):
        fields.update(read_config_file(args.config))
    fields.update(config_overrides(args))
    try:
        return AttributionConfig.from_dict(fields)
    except (ValueError, TypeError) as error:
        raise SystemExit(f"error: {error}") from None


def read_config_file(path: str) -> dict[str, Any]:
    """The fields of a --config JSON file: at most MAX_CONFIG_FILE_BYTES, nested at most MAX_JSON_DEPTH, an object."""
    from ..store.files import load_json_bounded

    try:
        fields = load_json_bounded(path, MAX_CONFIG_FILE_BYTES, where=f"--config {path}", error=ValueError)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if not isinstance(fields, dict):
        kind = "null" if fields is None else type(fields).__name__
        raise SystemExit(f"error: --config {path} must hold a JSON object of AttributionConfig fields, not {kind}")
    return fields


def _key_value(flag: str, option: str) -> tuple[str, Any]:
    key, sep, value = option.partition("=")
    if not sep or not key:
        raise SystemExit(f"error: {flag} {option!r}: use KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def add_subparser(subparsers, name: str, help: str, doc: str) -> argparse.ArgumentParser:
    """A subcommand whose `--help` shows its module docstring as written."""
    return subparsers.add_parser(name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_hub_arguments(parser: argparse.ArgumentParser,
                      revision: str = "branch, tag or commit of the store's dataset repository") -> None:
    group = parser.add_argument_group("Hugging Face Hub")
    group.add_argument("--endpoint", help="Hub endpoint URL (default: HF_ENDPOINT or huggingface.co)")
    group.add_argument("--token", help="Hub token (default: the logged-in one)")
    group.add_argument("--revision", help=revision)


# ------------------------------------------------------------------------------------------- reporting


def say(message: str, verbose: bool = True) -> None:
    """A status line on stderr (stdout stays for results: tables, JSON)."""
    if verbose:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def step(message: str, verbose: bool = True):
    """Say what a slow step does before it starts, and how long it took once done."""
    say(f"{message} ...", verbose)
    start = time.perf_counter()
    yield
    say(f"{message}: done in {time.perf_counter() - start:.1f} s", verbose)


# ------------------------------------------------------------------------------------------- loading


def load_pipeline(spec: str, *, lora: str | None = None, adapter_name: str | None = None, verbose: bool = True):
    """`DiffusionPipeline.from_pretrained(spec)` (+ `load_lora_weights`), with attribution enabled."""
    with step(f"loading pipeline {spec}", verbose):
        from diffusers import DiffusionPipeline

        from ..mixin import enable_attribution

        pipe = DiffusionPipeline.from_pretrained(spec)
        pipe.set_progress_bar_config(disable=True)
    if lora:
        with step(f"loading LoRA weights {lora} as adapter {adapter_name or 'default'!r}", verbose):
            pipe.load_lora_weights(lora, adapter_name=adapter_name or "default")
    return enable_attribution(pipe)


def load_training_dataset(spec: str, split: str = "train") -> Any:
    """A `datasets.Dataset` from a `save_to_disk` directory, a folder of images (`imagefolder`), or a Hub repo id."""
    import datasets

    path = Path(spec)
    if path.is_dir():
        if any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            dataset = datasets.load_from_disk(str(path))
        else:
            dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    else:
        dataset = datasets.load_dataset(spec, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise SystemExit(f"error: {spec} has splits {list(dataset)}, not {split!r}; pass --split")
        dataset = dataset[split]
    return dataset


def image_paths(specs: list[str]) -> list[Path]:
    """Image files, and the images of folders (sorted by name), in the order given."""
    paths: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise SystemExit(f"error: {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            root = Path(os.path.realpath(path))
            for image in found:  # a folder's images are its own: a symbolic link out of it is refused
                if root not in Path(os.path.realpath(image)).parents:
                    raise SystemExit(f"error: {ascii(str(image))} is a symbolic link out of {ascii(str(path))}: refused "
                                     "(pass the file itself to use it)")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise SystemExit(f"error: no image file or folder at {path}")
    return paths


def load_images(paths: list[Path], pipe) -> list:
    """PIL images in the channels the pipeline's model takes: grayscale for a 1-channel pixel-space model, else RGB."""
    denoiser = getattr(pipe, "unet", None)
    gray = getattr(pipe, "vae", None) is None and getattr(getattr(denoiser, "config", None), "in_channels", 3) == 1
    from ..data import open_image_file

    images = []
    for path in paths:  # each checked from its header first: pixel count, bit depth (data.open_image_file)
        try:
            images.append(open_image_file(path, "L" if gray else "RGB"))
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    return images
