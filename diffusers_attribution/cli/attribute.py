"""`attribute`: which training images made the model generate these images? A top-k table per image.

    diffusers-attribution attribute generated.png more/ --store STORE            # the store's base model
    diffusers-attribution attribute q.png --store user/features --pipeline P --json
    diffusers-attribution attribute q.png --dataset TRAIN --pipeline P --method trak --grid grid.png

With `--store` (a store directory or a Hub dataset repo id) the store's own config is used and the pipeline
defaults to the model the store was featurized from; with `--dataset` the training set is featurized first
with the config flags. Scores: higher = the training image made the query more likely (docs/methods.md).
"""

from __future__ import annotations

import argparse
import json

from .options import (
    add_subparser,
    add_config_arguments,
    add_hub_arguments,
    config_from_args,
    config_overrides,
    image_paths,
    load_images,
    load_pipeline,
    load_training_dataset,
    say,
    step,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_subparser(subparsers, "attribute", "top-k training images of image files (or folders of images), "
                                                    "against a store or a dataset", __doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images (sorted by name)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", help="a feature store: a directory or a Hub dataset repo id (user/name)")
    source.add_argument("--dataset", help="a training set to featurize first (save_to_disk dir, image folder, Hub id)")
    parser.add_argument("--pipeline", help="diffusers pipeline (directory or Hub id; default: the store's base model)")
    parser.add_argument("--lora", help="LoRA weights to load into the pipeline first, under --adapter-name")
    parser.add_argument("--prompt", action="append", help="text-to-image: the prompt of each image (one is repeated)")
    parser.add_argument("--train-dataset", help="with --store: the training set, for --grid (default: the store's "
                                                "dataset when it can be loaded)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--topk", "-k", type=int, default=5, help="training images listed per query (default: 5)")
    parser.add_argument("--exact", action="store_true", help="an exact pass even when the store has an index built "
                                                             "on this machine (diffusers-attribution index)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--grid", metavar="PNG", help="also write each image beside its top-k training images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(parser)
    add_hub_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.topk < 1:
        raise SystemExit("error: --topk must be >= 1")
    paths = image_paths(args.images)
    store, train_dataset = None, None
    if args.store:
        from ..store import FeatureStore

        with step(f"opening the feature store {args.store}"):
            store = FeatureStore.from_pretrained(args.store, revision=args.revision, endpoint=args.endpoint,
                                                 token=args.token)
        say(printable(f"{store}: {store.metadata.get('dataset_name') or 'unnamed dataset'}, "
                      f"featurized from {store.metadata.get('base_model') or 'an unnamed pipeline'}"))
        # The store's config, with the flags given; a feature-changing flag is refused, naming the difference.
        config = config_from_args(args, base=store.config.to_dict()) if (config_overrides(args) or args.config) else None
        pipeline = args.pipeline or store.metadata.get("base_model")
        if not pipeline:
            raise SystemExit("error: the store does not name the pipeline it was featurized from: pass --pipeline")
        adapters = store.metadata.get("lora_adapters") or []
        if adapters and not args.lora:
            raise SystemExit(f"error: the store was featurized with the LoRA adapter(s) {adapters}: pass --lora "
                             f"with those weights (and --adapter-name {adapters[0]})")
    else:
        config = config_from_args(args)
        if not args.pipeline:
            raise SystemExit("error: --dataset needs --pipeline")
        pipeline = args.pipeline
    pipe = load_pipeline(pipeline, lora=args.lora, adapter_name=(config or store.config).adapter_name)
    if args.dataset:
        train_dataset = load_training_dataset(args.dataset, args.split)
    elif args.grid:
        train_dataset = _store_dataset(store, args)

    images = load_images(paths, pipe)
    prompts = args.prompt[0] if args.prompt and len(args.prompt) == 1 else args.prompt
    say(f"attributing {len(images)} image(s)" + (f" (featurizing {len(train_dataset)} training examples first)"
                                                  if store is None else ""))
    result = pipe.attribute(images, store if store is not None else train_dataset, config, prompts=prompts,
                            progress=not args.no_progress, exact=args.exact,
                            top_k=min(args.topk, len(store)) if store is not None else None)
    from ..distributed import ProcessGroup, launched_with_several_processes

    if launched_with_several_processes() and not ProcessGroup().is_main:
        return 0  # every process holds the merged answer; the main process alone prints it and writes the grid
    best = result.topk(args.topk)
    rows = [{"image": str(path), "topk": [{"rank": rank + 1, "index": int(index), "score": float(score)}
                                          for rank, (index, score) in enumerate(zip(indices, scores))]}
            for path, indices, scores in zip(paths, best.indices.tolist(), best.scores.tolist())]
    if args.json:
        print(json.dumps({"store": args.store, "dataset": args.dataset, "pipeline": pipeline,
                          "method": result.config.method, "num_train": result.num_examples,
                          "results": rows}, indent=2))
    else:
        print(format_table(rows))
    if args.grid:
        result.to_image_grid(train_dataset, k=args.topk).save(args.grid)
        say(f"wrote {args.grid}")
    return 0


def format_table(rows: list[dict]) -> str:
    """One line per (image, rank): image, rank, training index, score; control characters in a file name (a
    newline would forge a row) are shown escaped."""
    names = [printable(row["image"]) for row in rows]
    width = max([len("image")] + [len(name) for name in names])
    lines = [f"{'image':<{width}}  rank  train_index  score"]
    for name, row in zip(names, rows):
        for entry in row["topk"]:
            lines.append(f"{name:<{width}}  {entry['rank']:>4}  {entry['index']:>11}  {entry['score']:.6g}")
    return "\n".join(lines)


def printable(text: str) -> str:
    """`text` with every non-printable character (newline, carriage return, escape, ...) as its Python escape."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in str(text))


def _store_dataset(store, args):
    """The training set of a store, for the grid: --train-dataset, or the dataset the store names; checked."""
    spec = args.train_dataset or store.metadata.get("dataset_name")
    if not spec:
        raise SystemExit("error: --grid needs the training images: pass --train-dataset")
    try:
        dataset = load_training_dataset(spec, args.split)
    except Exception as error:  # noqa: BLE001 - any failure to load names the fix
        raise SystemExit(f"error: --grid needs the training images; loading {spec!r} failed ({error}): "
                         "pass --train-dataset") from None
    with step(f"checking that {spec} holds the store's {len(store)} training examples"):
        store.check_dataset(dataset, store.config.image_column, store.config.caption_column)
    return dataset
