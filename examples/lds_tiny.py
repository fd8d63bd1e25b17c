"""Measure an attribution method with the linear datamodeling score (LDS), on a tiny scale.

    python examples/lds_tiny.py                                       # 64 digits, 4 subsets of 30-step models: seconds
    python examples/lds_tiny.py --num-train 1797 --num-subsets 64 --steps 1200 --method trak   # the benchmark's scale

LDS retrains the model on M random half-size subsets s_m of the training set and asks whether the scores
predict how each retrained model's loss on a query moves: the Spearman correlation, over subsets, of
Σ_{i ∈ s_m} τ_i(q) with −loss_m(q), averaged over queries. Here the model is the digits DDPM (its recipe with
fewer steps), retrained by `evaluation.RetrainHarness` (resumable: rerun to finish a killed run), and the method
is compared with the pixel-cosine baseline on the same subsets. Tiny runs give wide intervals: the printed
95% bootstrap interval says how wide. benchmarks/lds_digits.py is the full benchmark (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from diffusers_attribution import AttributionConfig, enable_attribution
from diffusers_attribution.demo.digits import DigitsRecipe, generate_digits, load_digits_images, train_digits_ddpm
from diffusers_attribution.evaluation import (
    DigitsTrainingRecipe,
    LossSpec,
    QueryLosses,
    RetrainHarness,
    lds,
    subset_masks,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="d-trak", help="the attribution method measured (default: d-trak)")
    parser.add_argument("--num-train", type=int, default=64, help="a seeded subset of the 1797 digits")
    parser.add_argument("--num-subsets", type=int, default=4, help="M retrained models (LDS needs at least 3)")
    parser.add_argument("--num-queries", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="training steps of every model")
    parser.add_argument("--num-timesteps", type=int, default=10, help="K of the method")
    parser.add_argument("--output-dir", default="outputs/lds_tiny")
    args = parser.parse_args()
    output = Path(args.output_dir)

    recipe = replace(DigitsRecipe(), num_steps=args.steps, batch_size=min(16, args.num_train), lr_warmup_steps=5)
    images = load_digits_images(args.num_train, seed=0)
    print(f"training the model on all {len(images)} digits ({args.steps} steps) and generating "
          f"{args.num_queries} queries", flush=True)
    pipe = enable_attribution(train_digits_ddpm(images, recipe, progress=False))
    queries = generate_digits(pipe, args.num_queries, seed=7)

    masks = subset_masks(len(images), args.num_subsets, alpha=0.5, seed=0)
    print(f"retraining on {args.num_subsets} half-size subsets, measuring the queries' losses", flush=True)
    measure = QueryLosses({"generated": queries}, LossSpec(timesteps=50, noise_draws=2))
    results = RetrainHarness(DigitsTrainingRecipe(recipe), images, masks, output / "retrain", measure,
                             progress=True).run()
    outputs = results.outputs("generated")  # float64 [M, n_queries]: the retrained models' losses

    for method in (args.method, "pixel-cosine"):
        options = {"num_timesteps": args.num_timesteps, "projection_dim": 1024} if "pixel" not in method else {}
        store = pipe.featurize(images, AttributionConfig(method=method, **options), progress=False)
        scores = pipe.attribute(queries, store, progress=False).scores
        result = lds(scores, results.subset_masks(), outputs)
        print(f"LDS {method:>12}: {result.mean:+.3f}  (95% interval {result.ci[0]:+.3f} .. {result.ci[1]:+.3f}, "
              f"{result.num_subsets} subsets, {len(result.per_query)} queries)")


if __name__ == "__main__":
    main()
