"""Choosing the damping λ of TRAK-family kernels without looking at the evaluation queries.

D-TRAK's notebooks swept 27 values of λ and kept the best LDS on the evaluation queries themselves — an
oracle that inflates the score. Here λ is chosen on a validation split of queries that is disjoint from the
evaluation queries, over a grid relative to the kernel's mean non-zero eigenvalue

    λ = ratio · tr(ΦᵀΦ) / min(N, k)        (the same scale as `AttributionConfig.damping_ratio`)

and the evaluation LDS is then computed once, at the chosen λ.

    selection = select_damping(train_features, val_features, masks, val_losses)
    selection.damping, selection.ratio                      # the λ to use, and its ratio
    report = evaluate_with_validation_damping(train_features, query_features, masks, losses, validation, evaluation)

One eigendecomposition of the (dual N×N or primal k×k) kernel serves the whole grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..scoring import damping_from_trace
from .lds import LDSResult, lds, spearman_rows

__all__ = [
    "DEFAULT_RATIOS",
    "DampingSelection",
    "KernelPath",
    "evaluate_with_validation_damping",
    "select_damping",
    "split_queries",
]

# 1e-4 … 1e2 relative to the mean eigenvalue, 4 per decade.
DEFAULT_RATIOS: tuple[float, ...] = tuple(float(10 ** (e / 4)) for e in range(-16, 9))


def _features(train: Any) -> torch.Tensor:
    features = getattr(train, "features", train)  # a FeatureStore or a tensor
    return torch.as_tensor(features, dtype=torch.float64)


class KernelPath:
    """Kernel scores φ(q)(ΦᵀΦ + λI)⁻¹Φᵀ for many λ from one eigendecomposition of the smaller Gram matrix."""

    def __init__(self, train_features: Any):
        phi = _features(train_features)
        self.phi = phi
        n, k = phi.shape
        self.dual = n <= k
        gram = phi @ phi.T if self.dual else phi.T @ phi
        eigenvalues, vectors = torch.linalg.eigh(gram)
        self.eigenvalues = eigenvalues.clamp_min(0)
        self.vectors = vectors
        self.mean_eigenvalue = damping_from_trace(phi.pow(2).sum(), n, k, 1.0)  # tr(ΦᵀΦ) / min(N, k)

    def _left(self, query_features: torch.Tensor) -> torch.Tensor:
        q = torch.as_tensor(query_features, dtype=torch.float64)
        return (q @ self.phi.T) @ self.vectors if self.dual else q @ self.vectors

    def _right(self) -> torch.Tensor:
        return self.vectors.T if self.dual else self.vectors.T @ self.phi.T  # [·, N]

    def scores(self, query_features: torch.Tensor, damping: float) -> torch.Tensor:
        """float64 [n, N] at λ = `damping`."""
        weights = 1.0 / (self.eigenvalues + damping)
        return (self._left(query_features) * weights) @ self._right()

    def subset_sums(self, query_features: torch.Tensor, masks: torch.Tensor, dampings: Sequence[float]):
        """[len(dampings), n, M]: Σ_{i ∈ s_m} τ_i(q) at each λ, without forming the [n, N] scores per λ."""
        left = self._left(query_features)
        right = self._right() @ torch.as_tensor(masks, dtype=torch.float64).T  # [·, M]
        return torch.stack([(left * (1.0 / (self.eigenvalues + d))) @ right for d in dampings])


@dataclass
class DampingSelection:
    """The grid (`ratios`, `dampings` = ratio · `mean_eigenvalue`), the validation LDS at each, and the best."""

    ratios: list[float]
    dampings: list[float]
    validation_lds: list[float]
    mean_eigenvalue: float
    best: int
    num_validation: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.ratios[self.best]

    @property
    def damping(self) -> float:
        return self.dampings[self.best]

    def to_dict(self) -> dict[str, Any]:
        return {"ratio": self.ratio, "damping": self.damping, "mean_eigenvalue": self.mean_eigenvalue,
                "num_validation": self.num_validation, "ratios": self.ratios, "validation_lds": self.validation_lds}


def select_damping(
    train_features: Any,
    validation_features: torch.Tensor,
    masks: torch.Tensor,
    validation_outputs: torch.Tensor,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    *,
    higher_is_better: bool = False,
    path: KernelPath | None = None,
) -> DampingSelection:
    """λ with the best mean LDS on the validation queries only.

    `validation_features` [n_v, k]; `validation_outputs` [M, n_v] (losses unless `higher_is_better`).
    Ties go to the larger λ (the more regularized kernel).
    """
    path = path or KernelPath(train_features)
    masks = torch.as_tensor(masks)
    outputs = torch.as_tensor(validation_outputs, dtype=torch.float64)
    q = torch.as_tensor(validation_features, dtype=torch.float64)
    if outputs.shape != (masks.shape[0], q.shape[0]):
        raise ValueError(f"validation_outputs must be [M={masks.shape[0]}, n_v={q.shape[0]}], got {tuple(outputs.shape)}")
    ratios = [float(r) for r in ratios]
    if not ratios or min(ratios) <= 0:
        raise ValueError("ratios must be positive")
    dampings = [r * path.mean_eigenvalue for r in ratios]
    actual = (outputs.T if higher_is_better else -outputs.T).numpy()
    sums = path.subset_sums(q, masks, dampings)
    values = []
    for predicted in sums:
        rho = spearman_rows(predicted.numpy(), actual)
        values.append(float(np.nanmean(rho)) if np.isfinite(rho).any() else float("nan"))
    finite = [i for i, v in enumerate(values) if np.isfinite(v)]
    if not finite:
        raise ValueError("the validation LDS is undefined at every λ (constant outputs?)")
    best_value = max(values[i] for i in finite)
    best = max(i for i in finite if values[i] == best_value)
    return DampingSelection(ratios, dampings, values, path.mean_eigenvalue, best, int(q.shape[0]))


def split_queries(num_queries: int, num_validation: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(validation, evaluation): disjoint sorted index sets, `num_validation` of them drawn at random (seeded)."""
    if not 0 < num_validation < num_queries:
        raise ValueError(f"num_validation must be in (0, {num_queries}), got {num_validation}")
    perm = torch.randperm(num_queries, generator=torch.Generator().manual_seed(seed))
    return perm[:num_validation].sort().values, perm[num_validation:].sort().values


def evaluate_with_validation_damping(
    train_features: Any,
    query_features: torch.Tensor,
    masks: torch.Tensor,
    outputs: torch.Tensor,
    validation: Sequence[int] | torch.Tensor,
    evaluation: Sequence[int] | torch.Tensor,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    **lds_kwargs,
) -> tuple[DampingSelection, LDSResult]:
    """Choose λ on the `validation` queries (rows of `query_features`, columns of `outputs`), then the LDS of the
    `evaluation` queries at that λ. The two index sets must be disjoint; the evaluation rows are read only
    after λ is fixed."""
    validation = torch.as_tensor(validation, dtype=torch.long).flatten()
    evaluation = torch.as_tensor(evaluation, dtype=torch.long).flatten()
    overlap = set(validation.tolist()) & set(evaluation.tolist())
    if overlap:
        raise ValueError(f"validation and evaluation queries overlap ({len(overlap)} shared, e.g. {min(overlap)}): "
                         "λ chosen on evaluation queries is an oracle")
    if len(validation) == 0 or len(evaluation) == 0:
        raise ValueError("both the validation and the evaluation split need queries")
    query_features = torch.as_tensor(query_features)
    outputs = torch.as_tensor(outputs)
    path = KernelPath(train_features)
    higher = lds_kwargs.get("higher_is_better", False)
    selection = select_damping(path.phi, query_features[validation], masks, outputs[:, validation], ratios,
                               higher_is_better=higher, path=path)
    scores = path.scores(query_features[evaluation], selection.damping)
    return selection, lds(scores, masks, outputs[:, evaluation], **lds_kwargs)
