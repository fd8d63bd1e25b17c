"""Quickstart: which training digits made a DDPM generate these digits?

    python examples/digits_quickstart.py                       # the shipped digits DDPM, 200 training digits
    python examples/digits_quickstart.py --num-train 1797 --num-timesteps 30
    python examples/digits_quickstart.py --model google/ddpm-cifar10-32 --dataset cifar10 --image-column img --num-train 500

Default: the digits DDPM shipped with diffusers-attribution (trained on scikit-learn's 1797 digits by the
package's recipe, no download) and a seeded subset of its training digits. `--model` takes any unconditional
diffusers pipeline (a directory or a Hub id) and `--dataset` its training set (a Hub dataset or a
`save_to_disk` directory). Writes the feature store, `attribution_grid.png` and prints the top-k per query.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers_attribution import AttributionConfig, enable_attribution
from diffusers_attribution.demo.digits import generate_digits, load_digits_ddpm, load_digits_images

from tiny_models import load_training_set  # examples/tiny_models.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an unconditional diffusers pipeline (default: the shipped digits DDPM)")
    parser.add_argument("--dataset", help="its training set, a Hub dataset id or save_to_disk dir (default: digits)")
    parser.add_argument("--image-column", default=None)
    parser.add_argument("--num-train", type=int, default=200, help="a seeded subset of the training set")
    parser.add_argument("--num-queries", type=int, default=4)
    parser.add_argument("--num-timesteps", type=int, default=10)
    parser.add_argument("--projection-dim", type=int, default=1024)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--output-dir", default="outputs/digits_quickstart")
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    print("loading the pipeline and the training set", flush=True)
    if args.model:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model)
    else:
        pipe = load_digits_ddpm()
    pipe = enable_attribution(pipe)
    pipe.set_progress_bar_config(disable=True)
    if args.dataset:
        train = load_training_set(args.dataset, args.num_train, shuffle=True)
    else:
        train = load_digits_images(args.num_train, seed=0)

    config = AttributionConfig(method="d-trak", num_timesteps=args.num_timesteps, projection_dim=args.projection_dim,
                               image_column=args.image_column)
    print(f"featurizing {len(train)} training images: {config.method}, K={config.num_timesteps}, "
          f"k={config.projection_dim}", flush=True)
    store = pipe.featurize(train, config, output_dir=output / "store")

    print(f"generating {args.num_queries} images and attributing them", flush=True)
    generated = generate_digits(pipe, args.num_queries, seed=1)  # DDIM sampling; works for any UNet2DModel pipeline
    result = pipe.attribute(generated, store)
    best = result.topk(args.topk)
    for query, (indices, scores) in enumerate(zip(best.indices.tolist(), best.scores.tolist())):
        print(f"generated {query}: top-{args.topk} training images {indices} "
              f"(scores {', '.join(f'{s:.3g}' for s in scores)})")
    result.to_image_grid(train, k=args.topk).save(output / "attribution_grid.png")
    print(f"wrote {output / 'attribution_grid.png'} and the store {output / 'store'}")


if __name__ == "__main__":
    main()
