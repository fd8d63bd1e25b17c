"""TRAK-family scores through the kernel: τ(q) = φ(q) (ΦᵀΦ + λI)⁻¹ Φᵀ, an n_queries × N matrix.

When N ≤ k the dual form φ(q) Φᵀ (ΦΦᵀ + λI)⁻¹ is exact and cheaper. Kernels are accumulated and solved
in float64. The default λ never looks at queries: λ = ratio · tr(ΦᵀΦ) / min(N, k), a fixed fraction of
the kernel's mean non-zero eigenvalue (ratio: `AttributionConfig.damping_ratio`, whose default depends on the
method; `KernelScorer` on bare features uses 0.1 unless told).
"""

from __future__ import annotations

import math
from typing import Any

import torch


def damping_from_trace(trace, num_examples: int, dim: int, ratio: float) -> float:
    """The one default-damping rule: λ = ratio · tr(ΦᵀΦ) / min(N, k), a fixed fraction of the kernel's mean
    non-zero eigenvalue (tr(ΦᵀΦ) = tr(ΦΦᵀ) = ‖Φ‖²_F). It never looks at queries."""
    return float(ratio * trace / min(num_examples, dim))


MAX_CONDITION = 1e12  # (K + λI) with a larger condition number solves to rounding noise in float64


def check_damping(damping: float, what: str = "damping") -> float:
    """λ as a float, if finite and > 0; else a `ValueError` (λ = 0 "solves" a singular kernel to noise)."""
    value = float(damping)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number > 0, got {damping!r}")
    return value


def damped_inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """(K + λI)⁻¹ of a symmetric PSD kernel K in float64, after checking that the damped system is well conditioned
    (cond ≤ 1 + tr K / λ; only when that bound is too large are K's eigenvalues computed): `ValueError` saying so,
    with a damping that would do, otherwise; a non-finite, asymmetric or indefinite K is a `CorruptStoreError`."""
    from .store.errors import CorruptStoreError

    eye = torch.eye(len(gram), dtype=torch.float64, device=gram.device)
    if not torch.isfinite(gram).all():
        raise CorruptStoreError("the kernel contains NaN or infinite values")
    if not torch.allclose(gram, gram.T, rtol=1e-8, atol=1e-12 * float(gram.abs().max())):
        raise CorruptStoreError("the kernel is not symmetric: it is not the Gram matrix of any features")
    if 1 + float(gram.diagonal().clamp_min(0).sum()) / damping <= MAX_CONDITION:
        # PSD K: λ ≤ eigenvalues of K + λI ≤ tr K + λ, so this bound suffices without an eigendecomposition
        return torch.linalg.solve(gram + damping * eye, eye)
    eigenvalues = torch.linalg.eigvalsh(gram)
    top = float(eigenvalues[-1].clamp_min(0))
    if float(eigenvalues[0]) < -1e-8 * max(top, 1e-300):
        raise CorruptStoreError(f"the kernel has a negative eigenvalue ({float(eigenvalues[0]):.3g}): it is not the Gram "
                                "matrix of any features")
    low = float(eigenvalues[0].clamp_min(0)) + damping
    if (top + damping) / low > MAX_CONDITION:
        raise ValueError(
            f"the damped kernel is singular or ill-conditioned (eigenvalues {float(eigenvalues[0]):.3g} … {top:.3g}, "
            f"λ = {damping:.3g}: condition number {(top + damping) / low:.3g}); use a damping of at least "
            f"{top / MAX_CONDITION * 10:.3g}, e.g. damping_ratio=0.1 (λ = {0.1 * float(gram.trace()) / len(gram):.3g})")
    return torch.linalg.solve(gram + damping * eye, eye)


def resolve_damping(damping: float | None, ratio: float, trace, num_examples: int, dim: int) -> float:
    """λ: `damping` if given, else `damping_from_trace(trace, N, k, ratio)`; either way checked by `check_damping`
    (the ratio too, when it is used)."""
    if damping is not None:
        return check_damping(damping)
    check_damping(ratio, "damping_ratio")
    return check_damping(damping_from_trace(trace, num_examples, dim, ratio))


def default_damping(features: torch.Tensor, ratio: float) -> float:
    """`damping_from_trace` of features Φ [N, k]."""
    n, k = features.shape
    return damping_from_trace(features.double().pow(2).sum(), n, k, ratio)


class KernelScorer:
    """Scores queries against fixed training features Φ [N, k] with damping λ."""

    def __init__(self, train_features: torch.Tensor, damping: float | None = None, damping_ratio: float = 0.1):
        self.train_features = train_features.double()
        n, k = self.train_features.shape
        self.damping = resolve_damping(damping, damping_ratio, self.train_features.pow(2).sum(), n, k)
        self.dual = n <= k
        phi = self.train_features
        kernel = phi @ phi.T if self.dual else phi.T @ phi
        # (ΦΦᵀ + λI)⁻¹ (dual, N × N) or (ΦᵀΦ + λI)⁻¹ (primal, k × k).
        self.inverse = damped_inverse(kernel, self.damping)

    def scores(self, query_features: torch.Tensor) -> torch.Tensor:
        """τ [n, N] float32; higher = the training example makes the query more likely."""
        q = query_features.double().to(self.train_features.device)
        if self.dual:
            scores = (q @ self.train_features.T) @ self.inverse
        else:
            scores = (q @ self.inverse) @ self.train_features.T
        return scores.float().cpu()


# ---------------------------------------------------------------------------------------------- streaming
# The same scores for a `FeatureStore` whose features need not fit in memory: the kernel is accumulated
# block by block in float64, scores are computed per block, and `topk` keeps only the best k per query.


def kernel_matrix(store, shards=None, block_rows: int | None = None) -> torch.Tensor:
    """The float64 Gram matrix of a store: ΦᵀΦ [k, k] when N > k (primal), else ΦΦᵀ [N, N] (dual).

    `shards` (primal only): sum over those shards' rows, a partial kernel to be added across processes.
    """
    n, k = len(store), store.dim
    if n > k:
        gram = torch.zeros(k, k, dtype=torch.float64)
        for _, block in store.blocks(block_rows, shards):
            block = block.double()
            gram.addmm_(block.T, block)
        return gram
    if shards is not None:
        raise ValueError("the dual kernel (N ≤ k) is not split across shards")
    gram = torch.zeros(n, n, dtype=torch.float64)
    for a, left in store.blocks(block_rows):
        left = left.double()
        for b, right in store.blocks(block_rows):
            if b >= a:
                product = left @ right.double().T
                gram[a : a + len(left), b : b + len(right)] = product
                gram[b : b + len(right), a : a + len(left)] = product.T
    return gram


class StreamingScorer:
    """`KernelScorer`'s scores against a `FeatureStore`, reading its features block by block.

    Memory: the kernel and its inverse (k × k, or N × N when N ≤ k), one block of rows, and the
    queries' projected features. `topk` never forms the n_queries × N matrix in the primal case.
    `damping_ratio=None`: the store's `config.damping_ratio` (the method's default unless it was set).
    """

    def __init__(self, store, damping: float | None = None, damping_ratio: float | None = None,
                 block_rows: int | None = None):
        self.store, self.block_rows = store, block_rows
        if damping_ratio is None:
            damping_ratio = store.config.damping_ratio
        n, k = len(store), store.dim
        self.dual = n <= k
        gram = store.kernel if store.kernel is not None else kernel_matrix(store, block_rows=block_rows)
        gram = gram.to(torch.float64)  # the store is read, never written: a computed kernel stays here
        expected = n if self.dual else k
        if gram.shape != (expected, expected):
            raise ValueError(f"the store's kernel is {tuple(gram.shape)}, expected {expected} × {expected}")
        self.damping = resolve_damping(damping, damping_ratio, gram.trace(), n, k)
        self.inverse = damped_inverse(gram, self.damping)
        # tr K = ‖Φ‖²_F: checked against the features as they are streamed (a kernel that is not theirs is refused)
        self._trace, self._norms = float(gram.trace()), None

    @property
    def metadata(self) -> dict[str, Any]:
        """What every scorer reports: here its damping λ."""
        return {"damping": self.damping}

    def _blocks(self, shards=None):
        """The store's blocks; on the first whole pass, ‖Φ‖²_F is checked against tr K (the kernel must be theirs)."""
        check = shards is None and self._norms is None
        total = 0.0
        for start, block in self.store.blocks(self.block_rows, shards):
            if check:
                total += float(block.double().pow(2).sum())
            yield start, block
        if check:
            if abs(total - self._trace) > 1e-6 * max(abs(total), abs(self._trace), 1e-300):
                from .store.errors import CorruptStoreError

                raise CorruptStoreError(f"the store's kernel is not the Gram matrix of its features: tr K = "
                                        f"{self._trace:.6g}, ‖Φ‖²_F = {total:.6g}")
            self._norms = total

    def scores(self, query_features: torch.Tensor) -> torch.Tensor:
        """τ [n, N] float32, as `KernelScorer.scores`."""
        q = query_features.detach().double().cpu()
        if self.dual:
            products = torch.empty(len(q), len(self.store), dtype=torch.float64)
            for start, block in self._blocks():
                products[:, start : start + len(block)] = q @ block.double().T
            return (products @ self.inverse).float()
        out = torch.empty(len(q), len(self.store), dtype=torch.float32)
        projected = q @ self.inverse
        for start, block in self._blocks():
            out[:, start : start + len(block)] = (projected @ block.double().T).float()
        return out

    def topk(self, query_features: torch.Tensor, k: int, shards=None):
        """`TopK` (indices [n, k'] into the training set, best first; scores): k' = min(k, rows scored).

        `shards`: only those shards' rows (global indices), so processes can each score some shards and
        `merge_topk` the results. The dual form (N ≤ k) scores densely: its n × N is below n × k anyway.
        """
        from .result import TopK

        q = query_features.detach().double().cpu()
        if self.dual:
            if shards is not None:
                raise ValueError("the dual form (N ≤ k) is scored in one process")
            values, indices = self.scores(q).topk(min(k, len(self.store)), dim=1)
            return TopK(indices, values)
        projected = q @ self.inverse
        best_values = torch.empty(len(q), 0, dtype=torch.float32)
        best_indices = torch.empty(len(q), 0, dtype=torch.long)
        for start, block in self._blocks(shards):
            values, where = (projected @ block.double().T).float().topk(min(k, len(block)), dim=1)
            best_values, best_indices = _keep_best(torch.cat([best_values, values], 1),
                                                   torch.cat([best_indices, where + start], 1), k)
        return TopK(best_indices, best_values)


def merge_topk(parts, k: int):
    """One `TopK` from several over disjoint rows (e.g. one per process)."""
    from .result import TopK

    values = torch.cat([part.scores for part in parts], 1)
    indices = torch.cat([part.indices for part in parts], 1)
    best_values, best_indices = _keep_best(values, indices, k)
    return TopK(best_indices, best_values)


def _keep_best(values: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    top, where = values.topk(min(k, values.shape[1]), dim=1)
    return top, indices.gather(1, where)
