"""Why an approximate index cannot serve kernel-attribution queries on a CPU at recall@10 ≥ 0.95 while reading
only a small part of the rows: the scores s_i = φ(q)(C + λI)⁻¹φ_iᵀ are spread over hundreds of directions.

A store of N *distinct* images (not tiles of a few rows): digits from scikit-learn's first 1,600, each shifted by
up to one pixel, scaled in contrast by 0.8–1.2 and given pixel noise (σ = 0.1), featurized with D-TRAK (K = 2,
k = 2048) on the shipped digits DDPM; queries are the last 197 digits (never augmented into the store), mapped by
(C + λI)⁻¹ with λ = ratio · tr C / k (D-TRAK's default ratio 0.0018 and TRAK's 0.18). Printed:
  - the store's energy: how many eigen-directions of C hold 90 % / 99 % of Σ‖φ_i‖²;
  - per query, the variance of the scores over the rows split by eigen-direction j of C:
    v_j = (φ(q)·u_j)² e_j / (e_j + λ)² / N; its participation ratio (Σv)²/Σv² and the directions holding 90 %;
  - `search.build_index(kind="ivf")` (the library's IVF over rows on a sphere, nlist by N) recall@10 against the
    exact top-10 and ms per query at nprobe 1 … nlist, on 64 queries not used to tune anything.
An IVF list groups rows by their large-energy directions; when the scores are decided by hundreds of low-energy
ones, the true top-10 is spread over most lists. docs/scale.md has a run.

    python benchmarks/index_difficulty.py [--n 20000]      # ~1.5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers_attribution import AttributionConfig, enable_attribution  # noqa: E402
from diffusers_attribution.demo.digits import load_digits_ddpm, load_digits_images  # noqa: E402
from diffusers_attribution.search import build_index, search  # noqa: E402


def distinct_images(base: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """n distinct augmentations of `base` [B, 1, 8, 8] in [-1, 1]: shift ≤ 1 px, contrast 0.8–1.2, noise σ 0.1."""
    generator = torch.Generator().manual_seed(seed)
    images = base[torch.randint(0, len(base), (n,), generator=generator)]
    shifts = torch.randint(-1, 2, (n, 2), generator=generator)
    shifted = torch.empty_like(images)
    for dx in (-1, 0, 1):
        for dy in (-1, 0, 1):
            chosen = (shifts[:, 0] == dx) & (shifts[:, 1] == dy)
            shifted[chosen] = torch.roll(images[chosen], shifts=(dx, dy), dims=(-2, -1))
    contrast = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator)
    return (shifted * contrast + 0.1 * torch.randn(shifted.shape, generator=generator)).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    args = parser.parse_args()
    digits = load_digits_images(1797)
    pipe = enable_attribution(load_digits_ddpm())
    config = AttributionConfig(method="d-trak", num_timesteps=2, projection_dim=2048, batch_size=256)
    started = time.perf_counter()
    features = pipe.featurize(torch.cat([distinct_images(digits[:1600], args.n), digits[1600:]]), config,
                              progress=False).features.float()
    rows, queries = features[: args.n], features[args.n :]
    print(f"{args.n:,} distinct augmented digits + {len(queries)} held-out queries featurized in "
          f"{time.perf_counter() - started:.0f} s (D-TRAK, K = 2, k = 2048)")
    kernel = rows.double().T @ rows.double()
    eigenvalues, eigenvectors = torch.linalg.eigh(kernel)
    eigenvalues = eigenvalues.clamp_min(0)
    energy = eigenvalues.flip(0).cumsum(0) / eigenvalues.sum()
    print(f"the store's energy: {int((energy < 0.9).sum()) + 1} directions hold 90 %, "
          f"{int((energy < 0.99).sum()) + 1} hold 99 %")
    for name, ratio in (("D-TRAK's ratio 0.0018", 0.0018), ("TRAK's ratio 0.18", 0.18)):
        damping = ratio * eigenvalues.sum() / len(eigenvalues)
        coordinates = (queries.double() @ eigenvectors) / (eigenvalues + damping)
        variance = coordinates.pow(2) * eigenvalues / args.n
        participation = variance.sum(1).pow(2) / variance.pow(2).sum(1)
        share = variance.sort(1, descending=True).values.cumsum(1) / variance.sum(1, keepdim=True)
        print(f"queries' score variance over the rows, λ at {name}: participation ratio median "
              f"{float(participation.median()):.0f} directions; 90 % of it in {int(((share < 0.9).sum(1) + 1).median())} "
              "directions (median over queries)")
    damping = 0.0018 * eigenvalues.sum() / len(eigenvalues)
    mapped = (queries.double() @ torch.linalg.inv(kernel + damping * torch.eye(len(kernel), dtype=torch.float64))).float()
    tune, measured = mapped[:64], mapped[64:128]
    exact = (measured @ rows.T).topk(10, dim=1).indices
    index = build_index(lambda: iter([(0, rows)]), rows.shape[1], args.n, kind="ivf", tuning_queries=tune)
    print(f"IVF over the rows (D-TRAK's λ): nlist {index.params['nlist']}, built in {index.build_seconds:.1f} s; "
          "64 measured queries:")
    print("| nprobe | share of lists | recall@10 | ms per query |\n|---:|---:|---:|---:|")
    nprobe = 1
    while True:
        index.params["nprobe"] = nprobe
        started = time.perf_counter()
        found = [search(index, measured[i : i + 1], 10)[0][0] for i in range(len(measured))]
        seconds = (time.perf_counter() - started) / len(measured)
        recall = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, exact)) / exact.numel()
        print(f"| {nprobe} | {nprobe / index.params['nlist']:.0%} | {recall:.3f} | {1000 * seconds:.2f} |")
        if nprobe >= index.params["nlist"]:
            break
        nprobe = min(4 * nprobe, index.params["nlist"])


if __name__ == "__main__":
    main()
