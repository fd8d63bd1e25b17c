"""Random training subsets for the linear datamodeling score (LDS) and retraining experiments.

`subset_masks(num_train, num_subsets, alpha, seed)` → bool [M, N]: row m holds exactly round(α·N) True
entries, chosen by a generator seeded from (seed, m) only. So the masks are a pure function of their
arguments, and the first M rows never change when more subsets are asked for later (M = 64 → 128 keeps the
64 retrainings already done).
"""

from __future__ import annotations

import hashlib

import torch

from ..seeding import seed_from

__all__ = ["subset_masks", "subset_size", "mask_indices", "masks_digest", "removal_masks"]


def subset_size(num_train: int, alpha: float) -> int:
    """round(α·N), at least 1 and at most N."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    return min(num_train, max(1, int(round(alpha * num_train))))


def subset_masks(num_train: int, num_subsets: int, alpha: float = 0.5, seed: int = 0) -> torch.Tensor:
    """bool [num_subsets, num_train]: each row a uniformly random subset of exactly round(α·N) examples."""
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    size = subset_size(num_train, alpha)
    masks = torch.zeros(num_subsets, num_train, dtype=torch.bool)
    for m in range(num_subsets):
        generator = torch.Generator().manual_seed(seed_from("lds-subset", seed, m))
        masks[m, torch.randperm(num_train, generator=generator)[:size]] = True
    return masks


def removal_masks(num_train: int, removed: torch.Tensor) -> torch.Tensor:
    """bool [R, N]: everything except the examples of each row of `removed` (long [R, k], e.g. a query's top-k)."""
    removed = torch.as_tensor(removed, dtype=torch.long)
    if removed.ndim == 1:
        removed = removed[None]
    if removed.numel() and (int(removed.min()) < 0 or int(removed.max()) >= num_train):
        raise ValueError(f"removed indices must be in [0, {num_train})")
    masks = torch.ones(len(removed), num_train, dtype=torch.bool)
    masks.scatter_(1, removed, False)
    return masks


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """long [n]: the positions of the training examples a (one-row) mask keeps, ascending."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if mask.ndim != 1:
        raise ValueError(f"expected one mask [N], got shape {tuple(mask.shape)}")
    return torch.nonzero(mask).flatten()


def masks_digest(masks: torch.Tensor) -> str:
    """A short sha256 of a mask matrix (shape and bits), recorded with retraining results."""
    masks = torch.as_tensor(masks, dtype=torch.bool)
    h = hashlib.sha256(str(tuple(masks.shape)).encode())
    h.update(masks.to(torch.uint8).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
