"""TRAK-family scores through the kernel: τ(q) = φ(q) (ΦᵀΦ + λI)⁻¹ Φᵀ, an n_queries × N matrix.

When N ≤ k the dual form φ(q) Φᵀ (ΦΦᵀ + λI)⁻¹ is exact and cheaper. Kernels are accumulated and solved
in float64. The default λ never looks at queries: λ = ratio · tr(ΦᵀΦ) / rank(ΦᵀΦ)-bound, i.e. a fixed
fraction of the kernel's mean non-zero eigenvalue (the trace over min(N, k)).
"""

from __future__ import annotations

import torch


def default_damping(features: torch.Tensor, ratio: float) -> float:
    """λ = ratio · ‖Φ‖²_F / min(N, k)."""
    n, k = features.shape
    return float(ratio * features.double().pow(2).sum() / min(n, k))


class KernelScorer:
    """Scores queries against fixed training features Φ [N, k] with damping λ."""

    def __init__(self, train_features: torch.Tensor, damping: float | None = None, damping_ratio: float = 0.1):
        self.train_features = train_features.double()
        self.damping = default_damping(train_features, damping_ratio) if damping is None else float(damping)
        n, k = self.train_features.shape
        self.dual = n <= k
        size = n if self.dual else k
        eye = torch.eye(size, dtype=torch.float64, device=self.train_features.device)
        phi = self.train_features
        kernel = phi @ phi.T if self.dual else phi.T @ phi
        # (ΦΦᵀ + λI)⁻¹ (dual, N × N) or (ΦᵀΦ + λI)⁻¹ (primal, k × k).
        self.inverse = torch.linalg.solve(kernel + self.damping * eye, eye)

    def scores(self, query_features: torch.Tensor) -> torch.Tensor:
        """τ [n, N] float32; higher = the training example makes the query more likely."""
        q = query_features.double().to(self.train_features.device)
        if self.dual:
            scores = (q @ self.train_features.T) @ self.inverse
        else:
            scores = (q @ self.inverse) @ self.train_features.T
        return scores.float().cpu()
