"""What several subcommands share: `AttributionConfig` flags, loading a pipeline, a training set or query images,
and saying what a slow step is doing. Importing this module imports no torch. Method and projector names are
not argparse choices: their registries import every method module (and torch) to list them, so a wrong name is
reported by `AttributionConfig` after parsing, with the registered names."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..config import DTYPES, NOISE_MODES, OUTPUTS, TIMESTEP_SCHEDULES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_CONFIG_FILE_BYTES = 1 << 20  # an AttributionConfig is a few hundred bytes

# (flag, AttributionConfig field, argparse keywords); every flag defaults to None = "not given".
CONFIG_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--method", "method", dict(help="attribution method, e.g. d-trak (default), trak, tracin (docs/methods.md)")),
    ("--output", "output", dict(choices=OUTPUTS, help="the differentiated output f (default: the method's own)")),
    ("--num-timesteps", "num_timesteps", dict(type=int, metavar="K", help="K timesteps per example (default: the method's)")),
    ("--timestep-schedule", "timestep_schedule", dict(choices=TIMESTEP_SCHEDULES)),
    ("--noise-seed", "noise_seed", dict(type=int, help="seed of the noise ε_t (default: 0)")),
    ("--noise-draws", "noise_draws", dict(type=int, metavar="D", help="noise draws per timestep (default: 1)")),
    ("--noise-mode", "noise_mode", dict(choices=NOISE_MODES)),
    ("--projector", "projector", dict(help="gradient projection, e.g. factored (default), gaussian, identity")),
    ("--projection-dim", "projection_dim", dict(type=int, metavar="k", help="feature dimension k (default: 2048)")),
    ("--projection-seed", "projection_seed", dict(type=int)),
    ("--calibration-examples", "calibration_examples", dict(type=int, metavar="N",
                                                            help="examples the factored bases are calibrated on (0: random)")),
    ("--sketch-dim", "sketch_dim", dict(type=int)),
    ("--damping", "damping", dict(type=float, metavar="λ", help="kernel damping λ (default: the ratio rule)")),
    ("--damping-ratio", "damping_ratio", dict(type=float)),
    ("--parameters", "parameters", dict(nargs="+", metavar="P",
                                        help="`all`, `lora`, or glob patterns of denoiser parameter names")),
    ("--adapter-name", "adapter_name", dict(help="the peft adapter attributed with --parameters lora "
                                                 "(and the name --lora loads under; default: default)")),
    ("--batch-size", "batch_size", dict(type=int, help="examples per featurization step (default: 16)")),
    ("--timestep-chunk-size", "timestep_chunk_size", dict(type=int)),
    ("--dtype", "dtype", dict(choices=DTYPES, help="dtype of the denoiser's forward pass (default: float32)")),
    ("--device", "device", dict(help="e.g. cpu, cuda, cuda:1 (default: the pipeline's)")),
    ("--image-column", "image_column", dict(help="image column of the dataset (default: detected)")),
    ("--caption-column", "caption_column", dict(help="caption column of the dataset (default: detected)")),
    ("--encoder", "encoder", dict(help="embedding-cosine: a transformers image encoder (path or Hub id)")),
    ("--checkpoints", "checkpoints", dict(nargs="+", metavar="PATH", help="tracin/retrac: denoiser checkpoints")),
    ("--learning-rates", "learning_rates", dict(nargs="+", type=float, metavar="η", help="tracin/retrac: one per checkpoint")),
    ("--query-timesteps", "query_timesteps", dict(type=int)),
    ("--query-noise-draws", "query_noise_draws", dict(type=int)),
]


def add_config_arguments(parser: argparse.ArgumentParser, config_file: bool = True) -> None:
    """The `AttributionConfig` flags (and `--config FILE`), in their own help group."""
    group = parser.add_argument_group("attribution config (flags override --config; docs: AttributionConfig)")
    if config_file:
        group.add_argument("--config", metavar="JSON", help="an AttributionConfig as a JSON file")
    for flag, field, keywords in CONFIG_FLAGS:
        if "choices" not in keywords:
            keywords = {"metavar": field.upper(), **keywords}
        group.add_argument(flag, dest=f"config_{field}", default=None, **keywords)
    group.add_argument("--adapter-option", dest="config_adapter_options", action="append", metavar="KEY=JSON",
                       help="a family option, e.g. max_sequence_length=256 (repeatable)")


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields given on the command line, as AttributionConfig keywords."""
    overrides = {}
    for _, field, _ in CONFIG_FLAGS:
        value = getattr(args, f"config_{field}", None)
        if value is not None:
            overrides[field] = value
    if isinstance(overrides.get("parameters"), list) and len(overrides["parameters"]) == 1 \
            and overrides["parameters"][0] in ("all", "lora"):
        overrides["parameters"] = overrides["parameters"][0]
    options = getattr(args, "config_adapter_options", None)
    if options:
        overrides["adapter_options"] = dict(_key_value(option) for option in options)
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


def _key_value(option: str) -> tuple[str, Any]:
    key, sep, value = option.partition("=")
    if not sep or not key:
        raise SystemExit(f"error: --adapter-option {option!r}: use KEY=VALUE")
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
