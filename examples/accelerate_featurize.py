"""Featurize a training set on every GPU (or CPU process) with `accelerate launch`; resumable.

    accelerate launch examples/accelerate_featurize.py --out outputs/accelerate_store          # all local GPUs
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/accelerate_featurize.py
    python examples/accelerate_featurize.py                                                      # one process
    accelerate launch examples/accelerate_featurize.py --model google/ddpm-cifar10-32 --dataset cifar10 --image-column img

Each process computes whole shards (round-robin) and writes them into `--out`; the main process writes the
kernel, config.json and the card once all are done. Kill it and run the same command again: only the
missing shards are computed. The command-line equivalent:
`accelerate launch -m diffusers_attribution featurize --pipeline P --dataset D --out STORE`.
"""

from __future__ import annotations

import argparse

from accelerate import PartialState

from diffusers_attribution import AttributionConfig, enable_attribution
from diffusers_attribution.demo.digits import load_digits_ddpm, load_digits_images

from tiny_models import load_training_set  # examples/tiny_models.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a diffusers pipeline (default: the shipped digits DDPM)")
    parser.add_argument("--dataset", help="its training set (Hub id or save_to_disk dir); default: digits")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--num-train", type=int, default=128)
    parser.add_argument("--shard-rows", type=int, default=32, help="examples per shard (the unit of work)")
    parser.add_argument("--out", default="outputs/accelerate_store")
    args = parser.parse_args()

    state = PartialState()  # this process's rank, device and the process group under accelerate launch
    if args.model:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model)
    else:
        pipe = load_digits_ddpm()
    pipe = enable_attribution(pipe.to(state.device))
    with state.main_process_first():  # the main process fills the datasets cache first
        if args.dataset:
            train = load_training_set(args.dataset, args.num_train)
        else:
            train = load_digits_images(args.num_train, seed=0)

    config = AttributionConfig(method="d-trak", num_timesteps=10, projection_dim=1024, image_column=args.image_column)
    if state.is_main_process:
        print(f"featurizing {len(train)} examples in shards of {args.shard_rows} on {state.num_processes} "
              f"process(es) into {args.out}", flush=True)
    store = pipe.featurize(train, config, output_dir=args.out, accelerator=state, shard_rows=args.shard_rows,
                           progress=state.is_main_process)
    if state.is_main_process:
        print(f"wrote {store}")


if __name__ == "__main__":
    main()
