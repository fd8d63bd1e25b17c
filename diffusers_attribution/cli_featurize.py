"""`featurize` command: build a feature store from a pipeline and a training set, on one or many processes.

    diffusers-attribution featurize --pipeline PATH --dataset PATH_OR_REPO --out STORE [--config config.json]
    accelerate launch -m diffusers_attribution featurize ...      # every process takes its share of the shards

Rerunning the same command after a failure computes only the shards that are missing (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_featurize_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `featurize` subcommand to an argparse `subparsers` object; returns its parser."""
    parser = subparsers.add_parser(
        "featurize",
        help="featurize a training set into a feature store (resumable; multi-process under accelerate launch)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--pipeline", required=True, help="diffusers pipeline: a local directory or a Hub model id")
    parser.add_argument("--dataset", required=True,
                        help="training set: a datasets.save_to_disk directory, a folder of images, or a Hub dataset repo id")
    parser.add_argument("--out", required=True, help="store directory; a run interrupted earlier is resumed")
    parser.add_argument("--config", help="AttributionConfig as a JSON file (default: AttributionConfig())")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--image-column", help="image column of the dataset (default: detected)")
    parser.add_argument("--caption-column", help="caption column of the dataset (default: detected)")
    parser.add_argument("--lora", help="LoRA weights to load into the pipeline before featurizing (directory or Hub id)")
    parser.add_argument("--lora-name", default="default", help="adapter name for --lora (default: default)")
    parser.add_argument("--batch-size", type=int, help="overrides the config's batch_size")
    parser.add_argument("--shard-rows", type=int, help="examples per shard (default: from --max-shard-size)")
    parser.add_argument("--max-shard-size", default="2GB", help="shard size when --shard-rows is not set (default: 2GB)")
    parser.add_argument("--no-kernel", action="store_true", help="do not store the kernel ΦᵀΦ (computed when scoring)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the finished store to this Hub dataset repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_featurize)
    return parser


def run_featurize(args: argparse.Namespace) -> int:
    from diffusers import DiffusionPipeline

    from .config import AttributionConfig
    from .distributed import partial_state
    from .mixin import enable_attribution

    state = partial_state()  # one process, or this process's place under accelerate launch
    config = AttributionConfig.from_json(Path(args.config).read_text()) if args.config else AttributionConfig()
    overrides = {"batch_size": args.batch_size, "image_column": args.image_column, "caption_column": args.caption_column}
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if overrides:
        config = AttributionConfig.from_dict({**config.to_dict(), **overrides})
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    if args.lora:
        pipe.load_lora_weights(args.lora, adapter_name=args.lora_name)
    enable_attribution(pipe)
    with state.main_process_first():  # the main process fills the datasets cache, the others then read it
        dataset = load_training_dataset(args.dataset, args.split)
    store = pipe.featurize(
        dataset, config, output_dir=args.out, accelerator=state, progress=not args.no_progress,
        shard_rows=args.shard_rows, max_shard_size=args.max_shard_size, compute_kernel=not args.no_kernel,
        dataset_name=args.dataset,
    )
    if state.is_main_process:
        print(f"wrote {store}")
        if args.push_to_hub:
            commit = store.push_to_hub(args.push_to_hub, private=args.private or None)
            print(f"pushed to {getattr(commit, 'commit_url', args.push_to_hub)}")
    return 0


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
            raise ValueError(f"{spec} has splits {list(dataset)}, not {split!r}; pass --split")
        dataset = dataset[split]
    return dataset


def main(argv: list[str] | None = None) -> int:
    """Run the featurize command on its own: `python -m diffusers_attribution.cli_featurize featurize ...`."""
    parser = argparse.ArgumentParser(prog="diffusers-attribution")
    add_featurize_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
