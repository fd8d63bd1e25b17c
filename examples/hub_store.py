"""Share a feature store on the Hugging Face Hub and reuse it elsewhere without featurizing again.

    huggingface-cli login    # or pass --token
    python examples/hub_store.py --repo-id your-name/digits-dtrak-features [--private]
    python examples/hub_store.py --repo-id user/features --endpoint http://127.0.0.1:8000 --token test   # a local Hub

One side featurizes the training set and pushes the store (a dataset repo: safetensors shards, config.json,
the kernel and a dataset card with the attribution grid); the other side pulls it by repo id, checks it
against its own pipeline, and attributes new images. The same from the command line:

    diffusers-attribution push STORE your-name/digits-dtrak-features --grid attribution_grid.png
    diffusers-attribution attribute generated.png --store your-name/digits-dtrak-features

Default model: the shipped digits DDPM (`--model` for another unconditional pipeline, with `--dataset`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from diffusers_attribution import AttributionConfig, FeatureStore, enable_attribution
from diffusers_attribution.demo.digits import generate_digits, load_digits_ddpm, load_digits_images

from tiny_models import load_training_set  # examples/tiny_models.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo-id", required=True, help="the dataset repository to push to, user/name")
    parser.add_argument("--endpoint", help="Hub endpoint (default: huggingface.co)")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--model", help="an unconditional diffusers pipeline (default: the shipped digits DDPM)")
    parser.add_argument("--dataset", help="its training set (Hub id or save_to_disk dir); default: digits")
    parser.add_argument("--num-train", type=int, default=100)
    parser.add_argument("--output-dir", default="outputs/hub_store")
    args = parser.parse_args()
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)

    def pipeline():
        if args.model is None:
            return enable_attribution(load_digits_ddpm())
        from diffusers import DiffusionPipeline

        return enable_attribution(DiffusionPipeline.from_pretrained(args.model))

    if args.dataset:
        train = load_training_set(args.dataset, args.num_train)
    else:
        train = load_digits_images(args.num_train, seed=0)

    # --- the side that featurizes -----------------------------------------------------------------------
    pipe = pipeline()
    config = AttributionConfig(method="d-trak", num_timesteps=4, projection_dim=512)
    print(f"featurizing {len(train)} training images into {output / 'store'}", flush=True)
    store = pipe.featurize(train, config, output_dir=output / "store", dataset_name=args.dataset or "sklearn digits")
    queries = generate_digits(pipe, 2, seed=3)
    local = pipe.attribute(queries, store)
    grid = output / "attribution_grid.png"
    local.to_image_grid(train, k=5).save(grid)

    from diffusers_attribution.store.hub import push_store

    print(f"pushing the store to {args.repo_id}", flush=True)
    commit = push_store(store, args.repo_id, private=args.private or None, token=args.token, endpoint=args.endpoint,
                        image=grid)
    print(f"pushed: {getattr(commit, 'commit_url', None) or args.repo_id}")

    # --- the side that reuses it (a fresh pipeline and an empty download cache) -----------------------
    with tempfile.TemporaryDirectory() as cache:
        pulled = FeatureStore.from_pretrained(args.repo_id, endpoint=args.endpoint, token=args.token, cache_dir=cache,
                                              verify=True)
        print(f"pulled {pulled}", flush=True)
        result = pipeline().attribute(queries, pulled)  # checked against this pipeline's fingerprints first
    same = torch.equal(result.scores, local.scores)
    print(f"scores from the pulled store equal the local ones: {same}")
    print(f"top-5 of query 0: {result.topk(5).indices[0].tolist()}")
    if not same:
        raise SystemExit("the pulled store scored differently from the local one")


if __name__ == "__main__":
    main()
