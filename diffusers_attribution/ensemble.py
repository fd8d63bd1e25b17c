"""Ensembles: TRAK-family scores averaged over several models or checkpoints, one store per model.

    τ(z, q) = (1/M) Σ_m τ_m(z, q)

τ_m are the member's own scores (its features, its kernel and its λ), so members may differ in model,
checkpoint, projection seed or noise seed; they must score the same training set. TRAK's ensemble averages
over independently trained models; METHODS.md: "Ensembles: average the scores of several models or checkpoints".
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from . import api
from .checkpoints import describe, load_checkpoint
from .config import AttributionConfig
from .result import AttributionResult
from .store.format import FeatureStore


def featurize_ensemble(
    pipes: Any, train_dataset: Any, config: AttributionConfig, *, checkpoints: Sequence | None = None,
    progress: bool = True,
) -> list[FeatureStore]:
    """One store per member: `pipes` is one pipeline or a list; `checkpoints` (optional) are loaded in turn into
    the pipeline (or into `pipes[m]`), e.g. `featurize_ensemble(pipe, data, config, checkpoints=[a, b, c])`."""
    members = _members(pipes, checkpoints)
    stores = []
    for pipe, checkpoint in members:
        with _maybe_loaded(pipe, checkpoint):
            store = api.featurize(pipe, train_dataset, config, progress=progress)
        if checkpoint is not None:
            store.metadata["checkpoint"] = describe(checkpoint)
        stores.append(store)
    return stores


def ensemble_attribute(
    members: Sequence[tuple[Any, Any]], images: Any, *, checkpoints: Sequence | None = None,
    prompts: Sequence[str] | str | None = None, progress: bool = True,
) -> AttributionResult:
    """The mean of `pipe.attribute(images, store)` over `members` = [(pipe, store or store directory), ...].

    `checkpoints` (optional, one per member) is loaded into that member's pipeline while it scores.
    `result.metadata["members"]` holds each member's scorer metadata; `["member_scores"]` the τ_m [M, n, N].
    """
    members = list(members)
    if not members:
        raise ValueError("an ensemble needs at least one (pipe, store) member")
    if checkpoints is not None and len(checkpoints) != len(members):
        raise ValueError(f"{len(checkpoints)} checkpoints for {len(members)} members")
    stores = [FeatureStore.from_pretrained(s) if isinstance(s, (str, os.PathLike)) else s for _, s in members]
    _check_same_training_set(stores)
    results = []
    for m, ((pipe, _), store) in enumerate(zip(members, stores)):
        with _maybe_loaded(pipe, None if checkpoints is None else checkpoints[m]):
            results.append(api.attribute(pipe, images, store, prompts=prompts, progress=progress))
    member_scores = torch.stack([r.scores for r in results])
    return AttributionResult(
        scores=member_scores.double().mean(0).float(),
        config=results[0].config,
        query_images=results[0].query_images,
        metadata={"members": [r.metadata for r in results], "member_scores": member_scores,
                  "member_configs": [r.config.to_dict() for r in results], "example_hashes": stores[0].example_hashes},
    )


def _members(pipes, checkpoints) -> list[tuple[Any, Any]]:
    pipes = list(pipes) if isinstance(pipes, (list, tuple)) else [pipes]
    if checkpoints is None:
        return [(pipe, None) for pipe in pipes]
    if len(pipes) == 1:
        pipes = pipes * len(checkpoints)
    if len(pipes) != len(checkpoints):
        raise ValueError(f"{len(pipes)} pipelines for {len(checkpoints)} checkpoints")
    return list(zip(pipes, checkpoints))


def _maybe_loaded(pipe, checkpoint):
    import contextlib

    return contextlib.nullcontext() if checkpoint is None else load_checkpoint(pipe, checkpoint)


def _check_same_training_set(stores: list[FeatureStore]) -> None:
    sizes = {len(s) for s in stores}
    if len(sizes) != 1:
        raise ValueError(f"ensemble members score training sets of different sizes: {sorted(sizes)}")
    hashes = [s.metadata.get("example_hashes") for s in stores]
    if all(h is not None for h in hashes) and any(h != hashes[0] for h in hashes[1:]):
        raise ValueError("ensemble members were featurized from different training sets (example hashes differ)")
