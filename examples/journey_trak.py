"""Journey-TRAK: attribute every sampling step of a text-to-image generation, not only the final image.

    python examples/journey_trak.py                                         # tiny offline SD + toy shapes
    python examples/journey_trak.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --dataset your/captioned-dataset --prompt "a watercolor fox" --num-train 1000 --device cuda

The training set is featurized once with `method="journey-trak"` (TRAK features at random timesteps); then
`pipe.attribute_trajectory(prompt, store)` samples the image and scores the denoiser's x̂0 estimate of every
step against the training set: scores [steps, N]. Early steps are often attributed to many images with the
prompt's layout, late ones to near-duplicates (Georgiev et al., 2023). Writes the per-step plot
(`journey.png`, needs matplotlib: `pip install matplotlib`) and prints the top training image per step.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers_attribution import AttributionConfig, enable_attribution
from tiny_models import load_training_set, shapes_dataset, tiny_text_to_image_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a text-to-image diffusers pipeline (default: tiny, offline)")
    parser.add_argument("--dataset", help="its training set with image and text columns (Hub id or save_to_disk dir)")
    parser.add_argument("--num-train", type=int, default=24)
    parser.add_argument("--prompt", default="a blue square")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps (each one is attributed)")
    parser.add_argument("--num-timesteps", type=int, default=4, help="K random timesteps per training example")
    parser.add_argument("--projection-dim", type=int, default=256)
    parser.add_argument("--device", default=None)
    parser.add_argument("--output-dir", default="outputs/journey_trak")
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    if args.model:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(args.model)
    else:
        pipe = tiny_text_to_image_pipeline(seed=0)
    if args.device:
        pipe.to(args.device)
    pipe = enable_attribution(pipe)
    pipe.set_progress_bar_config(disable=True)
    if args.dataset:
        dataset = load_training_set(args.dataset, args.num_train)
    else:
        dataset = shapes_dataset(args.num_train)

    config = AttributionConfig(method="journey-trak", num_timesteps=args.num_timesteps,
                               projection_dim=args.projection_dim)
    print(f"featurizing {len(dataset)} training images for Journey-TRAK (K={config.num_timesteps} random "
          f"timesteps each)", flush=True)
    store = pipe.featurize(dataset, config, output_dir=output / "store")

    print(f"sampling {args.prompt!r} in {args.steps} steps and attributing every step", flush=True)
    journey = pipe.attribute_trajectory(args.prompt, store, num_inference_steps=args.steps, seed=0)
    captions = dataset["text"] if "text" in dataset.column_names else [""] * len(dataset)
    for step, (t, row) in enumerate(zip(journey.timesteps.tolist(), journey.scores)):
        best = int(row.argmax())
        print(f"  step {step:2d} (t={t:4d}): top training image {best} ({captions[best]!r}), score {row[best]:.3g}")
    print(f"most influential at any step: {journey.top_examples(5).tolist()}")
    try:
        journey.plot(k=5, path=output / "journey.png", train_dataset=dataset, title=f"Journey-TRAK: {args.prompt!r}")
        print(f"wrote {output / 'journey.png'}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")


if __name__ == "__main__":
    main()
