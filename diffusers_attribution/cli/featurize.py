"""`featurize`: build a feature store from a pipeline and a training set, on one or many processes.

    diffusers-attribution featurize --pipeline PATH --dataset PATH_OR_REPO --out STORE \\
        [--method d-trak --num-timesteps 30 --projection-dim 2048 ...] [--config config.json]
    diffusers-attribution featurize ... --lora LORA_DIR --parameters lora --adapter-name style
    accelerate launch -m diffusers_attribution featurize ...      # every process takes its share of the shards

Config flags override `--config`, which overrides the defaults. Rerunning the same command after a failure
computes only the shards that are missing (docs/distributed.md).
"""

from __future__ import annotations

import argparse

from .options import (
    add_config_arguments,
    add_hub_arguments,
    add_subparser,
    config_from_args,
    load_pipeline,
    load_training_dataset,
    say,
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = add_subparser(subparsers, "featurize", "featurize a training set into a feature store (resumable; "
                                                    "multi-process under accelerate launch)", __doc__)
    parser.add_argument("--pipeline", required=True, help="diffusers pipeline: a local directory or a Hub model id")
    parser.add_argument("--dataset", required=True,
                        help="training set: a datasets.save_to_disk directory, a folder of images, or a Hub dataset repo id")
    parser.add_argument("--out", required=True, help="store directory; a run interrupted earlier is resumed")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--lora", help="LoRA weights to load into the pipeline first (directory or Hub id), "
                                       "under --adapter-name")
    parser.add_argument("--shard-rows", type=int, help="examples per shard (default: from --max-shard-size)")
    parser.add_argument("--max-shard-size", default="2GB", help="shard size when --shard-rows is not set (default: 2GB)")
    parser.add_argument("--no-kernel", action="store_true", help="do not store the kernel ΦᵀΦ of a kernel method (computed "
                        "when scoring); other methods store none, as through the API")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the finished store to this Hub dataset repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_arguments(parser)
    add_hub_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # bad flags fail before anything is loaded
    from ..distributed import partial_state

    state = partial_state()  # one process, or this process's place under accelerate launch
    verbose = state.is_main_process  # the main process says what all of them do
    pipe = load_pipeline(args.pipeline, lora=args.lora, adapter_name=config.adapter_name, verbose=verbose)
    with state.main_process_first():  # the main process fills the datasets cache, the others then read it
        dataset = load_training_dataset(args.dataset, args.split)
    if verbose:
        say(f"featurizing {len(dataset)} examples of {args.dataset} into {args.out}: {config.method}, "
            f"K={config.num_timesteps}, {config.projector} projection to k={config.projection_dim}, "
            f"parameters={config.parameters}")
    store = pipe.featurize(
        dataset, config, output_dir=args.out, accelerator=state, progress=not args.no_progress,
        shard_rows=args.shard_rows, max_shard_size=args.max_shard_size, compute_kernel=False if args.no_kernel else None,
        dataset_name=args.dataset,
    )
    if state.is_main_process:
        print(f"wrote {store}")
        if args.push_to_hub:
            from ..store.hub import push_store

            commit = push_store(store, args.push_to_hub, private=args.private or None, token=args.token,
                                endpoint=args.endpoint, revision=args.revision)
            print(f"pushed to {getattr(commit, 'commit_url', args.push_to_hub)}")
    return 0

