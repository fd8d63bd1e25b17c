"""Per-sample outputs f(z, t, ε; θ) whose gradients become features (METHODS.md).

Each takes the denoiser's prediction ε_θ [R, ...], the training target [R, ...] and the per-row ELBO
weight w_t [R], and returns one scalar per row [R]. D is the number of elements of one row.
"""

from __future__ import annotations

from typing import Callable

import torch

Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def flat_rows(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).float()


def loss(prediction, target, weight):
    """(1/D) Σ (ε_θ - target)²: the training loss (TRAK, Journey-TRAK)."""
    return (flat_rows(prediction) - flat_rows(target)).pow(2).mean(1)


def squared_norm(prediction, target, weight):
    """(1/D) Σ ε_θ²: D-TRAK's best output (`mean-squared-l2-norm` in its code)."""
    return flat_rows(prediction).pow(2).mean(1)


def mean(prediction, target, weight):
    """(1/D) Σ ε_θ."""
    return flat_rows(prediction).mean(1)


def l1_norm(prediction, target, weight):
    """Σ |ε_θ|."""
    return flat_rows(prediction).abs().sum(1)


def l2_norm(prediction, target, weight):
    """sqrt(Σ ε_θ²)."""
    return flat_rows(prediction).pow(2).sum(1).sqrt()


def linf_norm(prediction, target, weight):
    """max |ε_θ|."""
    return flat_rows(prediction).abs().amax(1)


def weighted_mse(prediction, target, weight):
    """w_t · (1/D) Σ (ε_θ - target)², w_t = β_t / (2 α_t (1 - ᾱ_t))."""
    return loss(prediction, target, weight) * weight.to(prediction.device)


OBJECTIVES: dict[str, Objective] = {
    "loss": loss,
    "squared-norm": squared_norm,
    "mean": mean,
    "l1-norm": l1_norm,
    "l2-norm": l2_norm,
    "linf-norm": linf_norm,
    "weighted-mse": weighted_mse,
}
