"""The main job on an embedded default: a DDPM on scikit-learn's handwritten digits, attributed with D-TRAK.

Trains (or loads from cache) the digits DDPM, generates images, featurizes the training set, attributes
every generated image, writes `attribution_grid.png` (each generated image beside its top-k training
images) and the feature store, and prints the top-k training indices per generated image.
"""

from __future__ import annotations

import json
from pathlib import Path


from ..config import AttributionConfig
from ..mixin import enable_attribution
from .digits import generate_digits, load_digits_images, load_or_train_digits_ddpm


def run_demo(
    output_dir: str = "demo-output",
    num_queries: int = 8,
    topk: int = 5,
    config: AttributionConfig | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
) -> dict:
    """Run the demo end to end and return {"grid": path, "store": path, "topk": [[index, ...], ...]}."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    config = config or AttributionConfig(method="d-trak", num_timesteps=10, projection_dim=2048)

    train_images = load_digits_images()
    print(f"[1/4] digits DDPM on {len(train_images)} real 8x8 handwritten digits (scikit-learn, no download)")
    pipe = enable_attribution(load_or_train_digits_ddpm(cache_dir=cache_dir))

    print(f"[2/4] generating {num_queries} digits (DDIM, seed {seed})")
    generated = generate_digits(pipe, num_queries, seed=seed)

    print(f"[3/4] featurizing the training set: {config.method}, K={config.num_timesteps}, "
          f"{config.projector} projection to k={config.projection_dim}"
          + (f" (bases calibrated on {config.calibration_examples} examples)" if config.calibration_examples else ""))
    store = pipe.featurize(train_images, config)
    store_dir = store.save_pretrained(output / "store")

    print("[4/4] attributing the generated digits")
    result = pipe.attribute(generated, store)
    best = result.topk(topk)
    grid_path = output / "attribution_grid.png"
    result.to_image_grid(train_images, k=topk).save(grid_path)
    ranking = best.indices.tolist()
    (output / "topk.json").write_text(json.dumps({"indices": ranking, "scores": best.scores.tolist()}, indent=2))

    for query, indices in enumerate(ranking):
        print(f"generated {query}: top-{topk} training images {indices}")
    print(f"wrote {grid_path} and the feature store {store_dir}")
    return {"grid": str(grid_path), "store": str(store_dir), "topk": ranking}
