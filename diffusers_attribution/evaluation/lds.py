"""The linear datamodeling score (LDS; Park et al. 2023, D-TRAK's protocol for diffusion models).

For query q, subsets s_1..s_M of the training set (masks [M, N]) and models retrained on each:

    predicted_m(q) = Σ_{i ∈ s_m} τ_i(q)                (the attribution's linear prediction)
    actual_m(q)    = -loss_{s_m}(q)                    (higher = the subset made q more likely)
    LDS(q)         = Spearman ρ over m of (predicted_m(q), actual_m(q))

`lds(scores, masks, outputs)` returns the per-query ρ, their mean and a percentile bootstrap interval of the
mean over queries (resampling queries with replacement, seeded). `outputs` are losses by default
(`higher_is_better=False` negates them); pass `higher_is_better=True` for outputs such as log-likelihoods.
Ties get average ranks (scipy.stats.spearmanr's convention); a query whose predictions or outputs are
constant over subsets has an undefined ρ (NaN), left out of the mean and counted in `num_undefined`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["LDSResult", "lds", "spearman_rows", "summarize_seeds", "SeedSummary"]


@dataclass
class LDSResult:
    """`per_query` [n_q] float64 (NaN where undefined); `mean` over defined queries; `ci` = (low, high), the
    `confidence` percentile bootstrap interval of the mean; `bootstrap` the resampled means."""

    per_query: torch.Tensor
    mean: float
    ci: tuple[float, float]
    confidence: float
    num_subsets: int
    num_undefined: int
    bootstrap: torch.Tensor = field(repr=False)

    @property
    def num_queries(self) -> int:
        return len(self.per_query)

    @property
    def std_error(self) -> float:
        """The bootstrap standard error of the mean."""
        return float(self.bootstrap.std()) if len(self.bootstrap) > 1 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci": list(self.ci), "confidence": self.confidence, "std_error": self.std_error,
                "num_queries": self.num_queries, "num_subsets": self.num_subsets, "num_undefined": self.num_undefined}

    def __str__(self) -> str:
        return (f"LDS {self.mean:.3f} [{self.ci[0]:.3f}, {self.ci[1]:.3f}] ({self.confidence:.0%} CI, "
                f"{self.num_queries} queries, {self.num_subsets} subsets)")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks along axis 1 (ties share the mean of their ranks), float64."""
    from scipy.stats import rankdata

    return rankdata(x, axis=1, method="average").astype(np.float64)


def spearman_rows(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Spearman ρ between each row of `a` [n, M] and the same row of `b` [n, M]: the Pearson correlation of
    average ranks. NaN where either row is constant."""
    a = np.asarray(torch.as_tensor(a, dtype=torch.float64))
    b = np.asarray(torch.as_tensor(b, dtype=torch.float64))
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [n, M] arrays of the same shape, got {a.shape} and {b.shape}")
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    denominator = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(1) / denominator
    rho[denominator == 0] = np.nan
    return rho


def lds(
    scores: torch.Tensor,
    masks: torch.Tensor,
    outputs: torch.Tensor,
    *,
    higher_is_better: bool = False,
    confidence: float = 0.95,
    num_bootstrap: int = 2000,
    seed: int = 0,
) -> LDSResult:
    """LDS of attribution `scores` [n_q, N] against retraining ground truth: `masks` [M, N] (bool) and
    `outputs` [M, n_q] (the retrained models' losses on the queries, unless `higher_is_better`)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    masks = torch.as_tensor(masks)
    outputs = torch.as_tensor(outputs, dtype=torch.float64)
    if scores.ndim != 2 or masks.ndim != 2 or outputs.ndim != 2:
        raise ValueError("scores [n_q, N], masks [M, N] and outputs [M, n_q] must be 2-D")
    n_q, N = scores.shape
    M = masks.shape[0]
    if masks.shape[1] != N:
        raise ValueError(f"masks cover {masks.shape[1]} training examples, scores {N}")
    if outputs.shape != (M, n_q):
        raise ValueError(f"outputs must be [M={M}, n_q={n_q}], got {tuple(outputs.shape)}")
    if M < 3:
        raise ValueError(f"LDS needs at least 3 subsets, got {M}")
    if not torch.isfinite(scores).all() or not torch.isfinite(outputs).all():
        raise ValueError("scores and outputs must be finite")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")

    predicted = scores @ masks.to(torch.float64).T  # [n_q, M]: Σ_{i ∈ s_m} τ_i(q)
    actual = outputs.T if higher_is_better else -outputs.T  # [n_q, M]
    rho = spearman_rows(predicted.numpy(), actual.numpy())
    defined = rho[~np.isnan(rho)]
    mean = float(defined.mean()) if len(defined) else float("nan")
    rng = np.random.default_rng(seed)
    if len(defined) and num_bootstrap > 0:
        samples = defined[rng.integers(0, len(defined), size=(num_bootstrap, len(defined)))].mean(1)
        tail = (1 - confidence) / 2
        ci = (float(np.quantile(samples, tail)), float(np.quantile(samples, 1 - tail)))
    else:
        samples, ci = np.empty(0), (float("nan"), float("nan"))
    return LDSResult(per_query=torch.from_numpy(rho), mean=mean, ci=ci, confidence=confidence, num_subsets=M,
                     num_undefined=int(np.isnan(rho).sum()), bootstrap=torch.from_numpy(np.asarray(samples)))


@dataclass
class SeedSummary:
    """LDS over several attribution noise seeds: mean ± std of the per-seed means, and the mean bootstrap CI."""

    mean: float
    std: float
    ci: tuple[float, float]
    per_seed: list[float]

    def to_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "ci": list(self.ci), "per_seed": self.per_seed}

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.std:.3f}"


def summarize_seeds(results: Sequence[LDSResult]) -> SeedSummary:
    """Mean and sample std (ddof=1; 0 for one seed) of `mean` over `results`, and the average of their CIs."""
    if not results:
        raise ValueError("no LDS results to summarize")
    means = [r.mean for r in results]
    std = float(np.std(means, ddof=1)) if len(means) > 1 else 0.0
    low = float(np.mean([r.ci[0] for r in results]))
    high = float(np.mean([r.ci[1] for r in results]))
    return SeedSummary(float(np.mean(means)), std if math.isfinite(std) else float("nan"), (low, high), means)
