"""Check attribution on a text-to-image LoRA fine-tune with the linear datamodeling score (LDS).

    python examples/lds_lora.py                                  # tiny SD from configs, 48 captioned digits: a minute
    python examples/lds_lora.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --dataset your/captioned-set \\
        --resolution 512 --num-train 500 --num-subsets 64 --steps 1000 --learning-rate 1e-4 --device cuda

`evaluation.LoraTextToImageRecipe` fine-tunes a LoRA on the UNet's attention as diffusers'
train_text_to_image_lora.py does, from a fixed base pipeline (`--model`; default: a tiny Stable Diffusion of random
weights built from configs). The script trains it on the whole set (the model attributed), generates queries from
the prompts of held-out examples, retrains the LoRA on M half-size subsets (`RetrainHarness`: resumable, rerun to
finish a killed run), measures every query's loss with its prompt, and prints the LDS of the method (attributing
through the LoRA weights only, `parameters="lora"`) and of pixel cosine. Tiny runs give wide intervals: the printed
95% interval says how wide. benchmarks/lds_lora.py is the benchmark (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffusers_attribution import AttributionConfig, enable_attribution
from diffusers_attribution.demo.captioned_digits import captioned_digits, tiny_captioned_sd_pipeline
from diffusers_attribution.evaluation import LoraTextToImageRecipe, LossSpec, QueryLosses, RetrainHarness, lds, subset_masks


def captioned_pairs(args) -> list[tuple[torch.Tensor, str]]:
    """(image in [-1, 1] at the model's resolution, caption) pairs: `--dataset` resized and centre-cropped, or digits."""
    total = args.num_train + args.num_queries
    if not args.dataset:
        return captioned_digits(total, seed=0, size=8)
    from diffusers.image_processor import VaeImageProcessor
    from tiny_models import load_training_set

    dataset = load_training_set(args.dataset, total, shuffle=True)
    processor = VaeImageProcessor(do_resize=True)
    return [(processor.preprocess(row["image"].convert("RGB"), height=args.resolution, width=args.resolution,
                                  resize_mode="crop")[0], row["text"]) for row in dataset]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="the base pipeline (default: tiny SD from configs, 8x8 RGB)")
    parser.add_argument("--dataset", help="captioned images: a Hub dataset or save_to_disk dir with image/text")
    parser.add_argument("--resolution", type=int, default=512, help="with --dataset: the training resolution")
    parser.add_argument("--method", default=None, help="the attribution method measured (default: the library's "
                        "for the LoRA weights, ekfac)")
    parser.add_argument("--num-train", type=int, default=48)
    parser.add_argument("--num-queries", type=int, default=4, help="held-out examples: real queries, and prompts")
    parser.add_argument("--num-subsets", type=int, default=4, help="M LoRA retrainings (LDS needs at least 3)")
    parser.add_argument("--steps", type=int, default=40, help="LoRA training steps of every model")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default=None, help="with --model: where the base pipeline runs")
    parser.add_argument("--output-dir", default="outputs/lds_lora")
    args = parser.parse_args()

    def base():  # deterministic: every retraining starts from the same base weights
        if args.model is None:
            return tiny_captioned_sd_pipeline(seed=0, size=8)
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(args.model).to(args.device or "cpu")

    recipe = LoraTextToImageRecipe(base=base, rank=args.rank,
                                   learning_rate=args.learning_rate, batch_size=args.batch_size, num_steps=args.steps)
    pairs = captioned_pairs(args)
    train, held_out = pairs[: args.num_train], pairs[args.num_train:]
    prompts = [caption for _, caption in held_out]
    print(f"fine-tuning a rank-{args.rank} LoRA on all {len(train)} captioned images ({args.steps} steps) and "
          f"generating {len(prompts)} queries from held-out prompts", flush=True)
    pipe = enable_attribution(recipe.train(train, seed=0))
    generated = pipe(prompts, num_inference_steps=20, guidance_scale=3.0, output_type="pt",
                     generator=torch.Generator().manual_seed(7)).images.float().cpu() * 2 - 1
    real = torch.stack([image for image, _ in held_out])

    masks = subset_masks(len(train), args.num_subsets, alpha=0.5, seed=0)
    print(f"retraining the LoRA on {args.num_subsets} half-size subsets, measuring the queries' losses", flush=True)
    measure = QueryLosses({"generated": generated, "real": real}, LossSpec(timesteps=50, noise_draws=2),
                          prompts={"generated": prompts, "real": prompts})
    results = RetrainHarness(recipe, train, masks, Path(args.output_dir) / "retrain", measure).run()

    for method in (args.method, "pixel-cosine"):
        config = AttributionConfig(method=method, parameters="lora", num_timesteps=10, projection_dim=1024)
        method = config.method  # None: the library's default for the LoRA weights
        store = pipe.featurize(train, config, progress=False)
        for name, queries in (("generated", generated), ("real", real)):
            scores = pipe.attribute(queries, store, prompts=prompts, progress=False).scores
            result = lds(scores, results.subset_masks(), results.outputs(name))
            print(f"LDS {method:>12} {name:>9}: {result.mean:+.3f}  (95% interval {result.ci[0]:+.3f} .. "
                  f"{result.ci[1]:+.3f}, {result.num_subsets} subsets, {len(result.per_query)} queries)")


if __name__ == "__main__":
    main()
