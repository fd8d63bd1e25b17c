"""Counterfactual evaluation: remove a query's top-k training examples, retrain, regenerate from the same seed.

For each generated query q = G(θ_full, seed_q):
    attribution:  θ_q  = train(D minus top-k(τ(·, q)));   x_q  = G(θ_q, seed_q)
    control:      θ'_q = train(D minus k random examples); x'_q = G(θ'_q, seed_q)
and the change ‖x_q - q‖₂ (pixel L2 over all elements) against ‖x'_q - q‖₂; with an image encoder E also
cos(E(x_q), E(q)) against cos(E(x'_q), E(q)). A good attribution changes the image more than random removal:
larger L2, lower cosine (D-TRAK on CIFAR-2, top-1000 of 5000 removed: random 5.51, TRAK 6.44, D-TRAK 9.46).

The retrainings go through the retraining harness (retrain.py): resumable, one file per (query, removal),
and shardable over processes. The full model must be trained with the same recipe and seed, and `generate`
must be deterministic in (pipeline, seed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .masks import removal_masks
from .retrain import RetrainHarness

__all__ = ["CounterfactualResult", "counterfactual", "default_generate", "random_removals", "embedding_function"]


def default_generate(pipe, seed: int, num_inference_steps: int = 50) -> torch.Tensor:
    """[1, C, H, W] in [-1, 1]: deterministic DDIM (η = 0) from the seed, for unconditional UNet2DModel pipelines."""
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(unet.config, "cross_attention_dim", None) is not None:
        raise ValueError(f"no default sampler for {type(pipe).__name__}: pass generate=(pipe, seed) -> [1, C, H, W]")
    from ..demo.digits import generate_digits

    return generate_digits(pipe, 1, seed=int(seed), num_inference_steps=num_inference_steps)


def random_removals(num_train: int, num_queries: int, k: int, seed: int = 0) -> torch.Tensor:
    """long [n_q, k]: k distinct random training examples per query, seeded by (seed, query)."""
    from ..seeding import seed_from

    rows = []
    for q in range(num_queries):
        generator = torch.Generator().manual_seed(seed_from("counterfactual-random", seed, q))
        rows.append(torch.randperm(num_train, generator=generator)[:k])
    return torch.stack(rows)


def embedding_function(encoder: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`images [n, C, H, W] in [-1, 1] -> embeddings [n, d]` from a callable, a transformers model, or a path/Hub id."""
    if encoder is None or callable(encoder) and not isinstance(encoder, torch.nn.Module):
        return encoder
    from ..config import AttributionConfig
    from ..image_features import EmbeddingFeaturizer

    if isinstance(encoder, (str, os.PathLike)):
        featurizer = EmbeddingFeaturizer(None, AttributionConfig(method="embedding-cosine", encoder=str(encoder)))
    else:
        featurizer = EmbeddingFeaturizer(None, AttributionConfig(method="embedding-cosine"), encoder=encoder)
    return featurizer.embed


class _Regenerate:
    """Harness measure: job r regenerates query r mod n_q from its seed."""

    def __init__(self, generate: Callable, seeds: Sequence[int]):
        self.generate, self.seeds = generate, [int(s) for s in seeds]

    def __call__(self, pipe, job) -> dict[str, torch.Tensor]:
        seed = self.seeds[job.subset % len(self.seeds)]
        return {"image": torch.as_tensor(self.generate(pipe, seed)).float().cpu().reshape(1, -1)}

    def describe(self) -> dict[str, Any]:
        name = f"{getattr(self.generate, '__module__', '?')}.{getattr(self.generate, '__qualname__', '?')}"
        return {"kind": "regenerate", "generate": name, "seeds": self.seeds}


@dataclass
class CounterfactualResult:
    """Per query: images and distances after removing its top-k (`attribution`) or k random examples (`random`)."""

    k: int
    query_seeds: list[int]
    removed: torch.Tensor  # long [n_q, k]
    random_removed: torch.Tensor  # long [n_q, k]
    original: torch.Tensor  # [n_q, C, H, W]
    regenerated: torch.Tensor
    regenerated_random: torch.Tensor
    l2: torch.Tensor  # [n_q]
    l2_random: torch.Tensor
    cosine: torch.Tensor | None = None
    cosine_random: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = {"k": self.k, "num_queries": len(self.l2), "l2_mean": float(self.l2.mean()),
               "l2_random_mean": float(self.l2_random.mean()),
               "l2_win_rate": float((self.l2 > self.l2_random).double().mean())}
        if self.cosine is not None:
            out.update(cosine_mean=float(self.cosine.mean()), cosine_random_mean=float(self.cosine_random.mean()),
                       cosine_win_rate=float((self.cosine < self.cosine_random).double().mean()))
        return out


def counterfactual(
    recipe: Any,
    train_data: Any,
    scores: torch.Tensor,
    query_seeds: Sequence[int],
    k: int,
    output_dir: str | os.PathLike,
    *,
    original: torch.Tensor | None = None,
    full_model: Any = None,
    generate: Callable[[Any, int], torch.Tensor] | None = None,
    encoder: Any = None,
    random_seed: int = 0,
    training_seed: int = 0,
    progress: bool = True,
    **harness_kwargs,
) -> CounterfactualResult:
    """Counterfactual test of `scores` [n_q, N] for queries generated from `query_seeds` (module docstring).

    `original` [n_q, C, H, W]: the queries as generated by the full model; else generated here from `full_model`.
    `generate(pipe, seed) -> [1, C, H, W]` (default: deterministic DDIM for unconditional UNet pipelines).
    `encoder`: optional image encoder (callable on [-1, 1] images, transformers model, or its path/Hub id) for
    the embedding cosine. Retrainings use `recipe` with `training_seed` (that of the full model) and are
    written to `output_dir` (rerun to resume). `harness_kwargs` go to `RetrainHarness` (accelerator, rank, ...).
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    n_q, N = scores.shape
    if len(query_seeds) != n_q:
        raise ValueError(f"{len(query_seeds)} query seeds for {n_q} rows of scores")
    if not 0 < k < N:
        raise ValueError(f"k must be in (0, {N}), got {k}")
    generate = generate or default_generate
    if original is None:
        if full_model is None:
            raise ValueError("pass original= (the queries generated by the full model) or full_model=")
        original = torch.cat([torch.as_tensor(generate(full_model, s)).float().cpu() for s in query_seeds])
    original = torch.as_tensor(original).float()
    if len(original) != n_q:
        raise ValueError(f"{len(original)} original images for {n_q} queries")

    removed = scores.topk(k, dim=1).indices
    random_removed = random_removals(N, n_q, k, random_seed)
    masks = torch.cat([removal_masks(N, removed), removal_masks(N, random_removed)])
    harness = RetrainHarness(recipe, train_data, masks, output_dir, _Regenerate(generate, list(query_seeds)),
                             seeds=(training_seed,), progress=progress,
                             metadata={"experiment": "counterfactual", "k": k}, **harness_kwargs)
    results = harness.run()
    if not results.complete:
        raise RuntimeError(f"{int((~results.done).sum())} counterfactual retrainings are missing in {output_dir}: "
                           "another process failed? Run again to finish them")
    images = results.values["image"][0].float().reshape(2 * n_q, *original.shape[1:])
    regenerated, regenerated_random = images[:n_q], images[n_q:]

    def l2(a, b):
        return (a - b).flatten(1).norm(dim=1)

    result = CounterfactualResult(
        k=k, query_seeds=[int(s) for s in query_seeds], removed=removed, random_removed=random_removed,
        original=original, regenerated=regenerated, regenerated_random=regenerated_random,
        l2=l2(regenerated, original), l2_random=l2(regenerated_random, original),
        extra={"seconds": results.seconds()},
    )
    embed = embedding_function(encoder)
    if embed is not None:
        with torch.no_grad():
            e0, e1, e2 = (torch.as_tensor(embed(x)).float() for x in (original, regenerated, regenerated_random))
        cos = torch.nn.functional.cosine_similarity
        result.cosine, result.cosine_random = cos(e1, e0, dim=1), cos(e2, e0, dim=1)
    return result
