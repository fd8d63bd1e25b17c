"""The main job on an embedded default: a DDPM on scikit-learn's handwritten digits, attributed with D-TRAK.

Loads the digits DDPM shipped with the package (or, with `retrain=True`, trains it by its recipe), generates
images, featurizes the training set, attributes every generated image, writes `attribution_grid.png` (each
generated image beside its top-k training images) and the feature store, and prints the top-k training
indices per generated image.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..config import AttributionConfig
from ..mixin import enable_attribution
from .digits import generate_digits, load_digits_ddpm, load_digits_images


DATASET_NAME = "scikit-learn digits (sklearn.datasets.load_digits, 1797 8x8 images)"
# D-TRAK with K = 10 timesteps, not the method's default K = 30, so that the demo answers within a minute on
# two CPU cores: measured on one thread, the whole demo took 25 s of CPU with K = 10 and 51 s with K = 30.
DEMO_CONFIG = {"method": "d-trak", "num_timesteps": 10}
# torch's own thread count unless asked (`threads=`). Measured on an idle 2-core machine, the whole demo (shipped
# weights): 15.9 s wall with torch's default two threads, 21.2 s with one; on a machine whose cores other jobs
# keep busy a 2-thread pool can be many times slower (threads waiting on each other): pass threads=1 there.
DEMO_THREADS = None


def run_demo(
    output_dir: str = "demo-output",
    num_queries: int = 8,
    topk: int = 5,
    config: AttributionConfig | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    retrain: bool = False,
    num_train: int | None = None,
    threads: int | None = DEMO_THREADS,
) -> dict:
    """Run the demo end to end and return {"grid": path, "store": path, "topk": [[index, ...], ...]}.

    `config`: default `AttributionConfig(**DEMO_CONFIG)` (D-TRAK, K = 10). `retrain`: train the digits
    DDPM by its recipe (cached in `cache_dir`) instead of loading the weights shipped with the package.
    `num_train`: attribute against a seeded subset of the digits (default: all 1797). `threads`: torch's
    intra-op threads while the demo runs (None: leave torch's setting).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run_demo(output_dir, num_queries, topk, config, cache_dir, seed, retrain, num_train)
    finally:
        torch.set_num_threads(previous)


def _run_demo(output_dir, num_queries, topk, config, cache_dir, seed, retrain, num_train) -> dict:
    start = time.perf_counter()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    config = config or AttributionConfig(**DEMO_CONFIG)

    train_images = load_digits_images(num_train)
    source = "training it by its recipe (cached)" if retrain else "weights shipped with the package"
    print(f"[1/4] digits DDPM on {len(train_images)} real 8x8 handwritten digits (scikit-learn, no download): {source}",
          flush=True)
    pipe = enable_attribution(load_digits_ddpm(retrain=retrain, cache_dir=cache_dir))
    pipe.set_progress_bar_config(disable=True)

    print(f"[2/4] generating {num_queries} digits (50 DDIM steps, seed {seed})", flush=True)
    generated = generate_digits(pipe, num_queries, seed=seed)

    print(f"[3/4] featurizing the training set: {config.method}, K={config.num_timesteps}, "
          f"{config.projector} projection to k={config.projection_dim}"
          + (f" (bases calibrated on {config.calibration_examples} examples)" if config.calibration_examples else ""),
          flush=True)
    dataset_name = DATASET_NAME if num_train is None else f"{DATASET_NAME}, seeded subset of {len(train_images)}"
    store = pipe.featurize(train_images, config, dataset_name=dataset_name)
    store_dir = store.save_pretrained(output / "store")

    print("[4/4] attributing the generated digits", flush=True)
    result = pipe.attribute(generated, store)
    best = result.topk(topk)
    grid_path = output / "attribution_grid.png"
    result.to_image_grid(train_images, k=topk).save(grid_path)
    ranking = best.indices.tolist()
    (output / "topk.json").write_text(json.dumps({"indices": ranking, "scores": best.scores.tolist()}, indent=2))

    for query, indices in enumerate(ranking):
        print(f"generated {query}: top-{topk} training images {indices}")
    print(f"wrote {grid_path} (left: generated digit, boxed; right: its top-{topk} training digits, with index and "
          "score; higher score = that training digit made the generated one more likely) and the feature store "
          f"{store_dir}; {time.perf_counter() - start:.0f} s in all")
    return {"grid": str(grid_path), "store": str(store_dir), "topk": ranking}
