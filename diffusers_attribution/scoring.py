"""Scores of queries against stored features: the one kernel scorer and the one dot-product scorer.

    kernel:  τ_i(q) = φ(q) (C + λI)⁻¹ φ_iᵀ · w_i     C = ΦᵀΦ or a stored curvature (the projected Fisher);
                                                    w_i per-row weights (DAS's residuals) or 1
    dot:     τ_i(q) = ⟨φ(q) ⊙ η, φ_i⟩ (or the cosine) TracIn's per-checkpoint η, EK-FAC's preconditioned queries,
                                                    the similarity baselines

When C = ΦᵀΦ and N ≤ k the dual form φ(q) Φᵀ (ΦΦᵀ + λI)⁻¹ is exact and cheaper. Kernels are accumulated and
solved in float64 (`damped_inverse`, the one solver). The default λ never looks at queries: λ = ratio · tr C /
min(N, k) (`resolve_damping`, the one rule), a fixed fraction of C's mean non-zero eigenvalue (ratio:
`AttributionConfig.damping_ratio`, whose default depends on the method; bare features use 0.1 unless told).
Each method names its scorer and what feeds it (`Method.scorer`); every caller goes through that.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .store.kernel import kernel_matrix


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


class _Rows:
    """Bare features Φ [N, k] seen as a one-block store (for `KernelScorer` / `DotScorer` on tensors)."""

    config = None
    kernel = None

    def __init__(self, features: torch.Tensor):
        self.features = features

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def blocks(self, block_rows=None, shards=None, check_finite=True):
        if shards is not None:
            raise ValueError("bare features have no shards")
        yield 0, self.features


def _rows(train) -> Any:
    return _Rows(train) if isinstance(train, torch.Tensor) else train


class Scorer:
    """What every method's scorer offers: `scores(query features) -> [n, N]`, `topk(query features, k)` and
    `metadata` (what the result reports, e.g. λ). Subclasses define `scores`; `topk` is dense unless overridden."""

    metadata: dict[str, Any] = {}

    def __init__(self, train):
        self.store = _rows(train)

    def scores(self, query_features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def topk(self, query_features: torch.Tensor, k: int, shards=None):
        """`TopK` (indices [n, k'] into the training set, best first; scores), k' = min(k, N)."""
        from .result import TopK

        if shards is not None:
            raise ValueError(f"{type(self).__name__} scores every row in one process")
        values, indices = self.scores(query_features).topk(min(k, len(self.store)), dim=1)
        return TopK(indices, values)


class KernelScorer(Scorer):
    """The one kernel scorer: s_i(q) = φ(q) (C + λI)⁻¹ φ_iᵀ · w_i, reading the training rows block by block.

    `train`: a `FeatureStore` (or bare features Φ [N, k]). C = ΦᵀΦ (the store's kernel, or accumulated here) unless a
    `curvature` [k, k] is given (the projected Fisher); w = `row_weights` [N] (DAS's residuals) or 1. Dual form
    when C is the kernel and N ≤ k: (φ(q) Φᵀ)(ΦΦᵀ + λI)⁻¹. λ: `damping`, else `resolve_damping` with
    `damping_ratio` (default: the store config's, 0.1 for bare features) of tr C. Memory: C and its inverse, one
    block of rows, and the queries. On the first whole pass, ‖Φ‖²_F is checked against tr K (a kernel that is not
    the features' is a `CorruptStoreError`).
    """

    def __init__(self, train, damping: float | None = None, damping_ratio: float | None = None, *,
                 curvature: torch.Tensor | None = None, row_weights: torch.Tensor | None = None,
                 block_rows: int | None = None):
        super().__init__(train)
        store, self.block_rows = self.store, block_rows
        if damping_ratio is None:
            damping_ratio = store.config.damping_ratio if store.config is not None else 0.1
        n, k = len(store), store.dim
        if row_weights is not None and row_weights.shape != (n,):
            raise ValueError(f"{tuple(row_weights.shape)} row weights for a store of {n} rows")
        self.row_weights = None if row_weights is None else row_weights.double()
        if curvature is not None:
            gram = curvature.double()
            if gram.shape != (k, k):
                raise ValueError(f"the curvature is {tuple(gram.shape)}, expected {k} × {k}")
            self.dual, self._norms = False, 0.0  # C is not the Gram matrix of Φ: no trace check
            self.damping = resolve_damping(damping, damping_ratio, gram.diagonal().sum(), k, k)  # λ = ratio·tr C / k
        else:
            self.dual = n <= k
            gram = store.kernel if store.kernel is not None else kernel_matrix(store, block_rows=block_rows)
            gram = gram.to(torch.float64)  # the store is read, never written: a computed kernel stays here
            expected = n if self.dual else k
            if gram.shape != (expected, expected):
                raise ValueError(f"the store's kernel is {tuple(gram.shape)}, expected {expected} × {expected}")
            self._norms = None
            self.damping = resolve_damping(damping, damping_ratio, gram.trace(), n, k)
        self.inverse = damped_inverse(gram, self.damping)
        self._trace = float(gram.trace())

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

    def _weighted(self, scores: torch.Tensor, start: int) -> torch.Tensor:
        """Float32 scores of rows [start, start + columns) times their weights w_i (rounded once more to float32)."""
        if self.row_weights is None:
            return scores
        return (scores.double() * self.row_weights[start : start + scores.shape[1]][None]).float()

    def scores(self, query_features: torch.Tensor) -> torch.Tensor:
        """τ [n, N] float32; higher = the training example makes the query more likely."""
        q = query_features.detach().double().cpu()
        if self.dual:
            products = torch.empty(len(q), len(self.store), dtype=torch.float64)
            for start, block in self._blocks():
                products[:, start : start + len(block)] = q @ block.double().T
            return self._weighted((products @ self.inverse).float(), 0)
        out = torch.empty(len(q), len(self.store), dtype=torch.float32)
        projected = q @ self.inverse
        for start, block in self._blocks():
            out[:, start : start + len(block)] = self._weighted((projected @ block.double().T).float(), start)
        return out

    def query_weights(self, query_features: torch.Tensor) -> torch.Tensor:
        """q' = φ(q) (C + λI)⁻¹ [n, k] float64 (primal form): the query side of every score, computed once."""
        if self.dual:
            raise ValueError("the dual form (N ≤ k) has no per-query q': score densely")
        return query_features.detach().double().cpu() @ self.inverse

    def index(self, *, build: bool = False, cache=None, **options):
        """The FAISS maximum-inner-product index of this store's rows (× w_i) for q' (search.py), from this machine's
        cache keyed by the store's shard digests; `build=True` builds (and caches) it when absent, else None is
        returned. `options`: `search.build_index`'s (kind, params, target_recall, tuning_queries: q' of real
        queries to tune the search on; by default the held-out rows mapped by (C + λI)⁻¹; `latest=True` with
        `build=False`: the index built last for these rows, of any kind). None for the dual form
        and for stores in memory (no digests to key it by)."""
        if self.dual or getattr(self.store, "directory", None) is None:
            return None
        from .search import IndexCache

        cache = cache or IndexCache()
        return cache.for_store(self.store, self.row_weights, query_map=self.inverse.float(), build=build, **options)

    def resident(self, device):
        """The store's rows on `device` (`search.ResidentRows`), read once through the store's checks (and the first
        pass's trace check): `topk(..., index=rows)` then runs exact on that device. None for the dual form."""
        if self.dual:
            return None
        from .search import ResidentRows

        return ResidentRows.load(self._blocks(), device, self.row_weights)

    def topk(self, query_features: torch.Tensor, k: int, shards=None, *, index=None):
        """`TopK` of `scores` (indices [n, k'] into the training set, best first; scores float32), k' = min(k, N):
        q' once, then one streaming pass of float32 GEMMs over the store's rows (search.exact_topk), never forming
        the n × N matrix. `shards`: only those shards' rows (global indices), so processes can each score some
        shards and `merge_topk` the results. The dual form (N ≤ k) scores densely: its n × N is below n × k anyway.
        Scores agree with `scores` to float32 GEMM rounding; a non-finite score is a `CorruptStoreError`.
        `index`: a `search.SearchIndex` of this store (`index()`): its approximate top-k instead of the pass; or
        `search.ResidentRows` (`resident()`): the exact pass over rows already on a device."""
        from .result import TopK
        from .search import exact_topk
        from .store.errors import CorruptStoreError

        if k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {k}")
        if self.dual:
            return super().topk(query_features, k, shards)
        if not torch.isfinite(query_features).all():
            raise ValueError("the query features contain NaN or infinite values")
        if index is not None:  # resident rows: exact; a FAISS index: its candidates, their exact float32 scores
            from .search import ResidentRows, search

            if shards is not None:
                raise ValueError("an index covers the whole store: pass shards= or index=, not both")
            if isinstance(index, ResidentRows):
                indices, values = index.topk(self.query_weights(query_features), k)
            else:
                indices, values = search(index, self.query_weights(query_features), k)
            return TopK(indices, values)
        try:
            indices, values = exact_topk(self.query_weights(query_features),
                                         self.store.blocks(self.block_rows, shards, check_finite=False), k,
                                         self.row_weights)
        except ValueError as error:  # the query is finite: a row or its weight is not
            raise CorruptStoreError(f"the store's features: {error}") from None
        return TopK(indices, values)


class DotScorer(Scorer):
    """τ_i(q) = ⟨φ(q) ⊙ η, φ_i⟩ (η: `column_weights` [k], e.g. TracIn's η_c per checkpoint block; 1 otherwise);
    `cosine=True`: both rows unit-normalized first (a zero row scores 0). No kernel, no damping."""

    def __init__(self, train, *, column_weights: torch.Tensor | None = None, cosine: bool = False,
                 metadata: dict[str, Any] | None = None, block_rows: int | None = None):
        super().__init__(train)
        if column_weights is not None and column_weights.shape != (self.store.dim,):
            raise ValueError(f"{tuple(column_weights.shape)} column weights for {self.store.dim} feature columns")
        self.column_weights = None if column_weights is None else column_weights.double()
        self.cosine, self.block_rows = cosine, block_rows
        self.metadata = dict(metadata or {})

    def scores(self, query_features: torch.Tensor) -> torch.Tensor:
        q = query_features.detach().double().cpu()
        if self.column_weights is not None:
            q = q * self.column_weights[None]
        if self.cosine:
            q = unit_rows(q)
        out = torch.empty(len(q), len(self.store), dtype=torch.float32)
        for start, block in self.store.blocks(self.block_rows):
            block = block.double()
            out[:, start : start + len(block)] = (q @ (unit_rows(block) if self.cosine else block).T).float()
        return out


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖ per row (a zero row stays 0)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)





def merge_topk(parts, k: int):
    """One `TopK` from several over disjoint rows (e.g. one per process): search.merge_topk's order (score
    descending, ties by lower row index)."""
    from . import search
    from .result import TopK

    indices, values = search.merge_topk(parts, k)
    return TopK(indices, values)


def distributed_topk(scorer, query_features: torch.Tensor, k: int, group):
    """Top-k over a whole store with every process scoring its share of the shards, merged on every process."""
    if not isinstance(scorer, KernelScorer) or scorer.dual or not getattr(scorer.store, "shards", None):
        return scorer.topk(query_features, k)
    mine = group.share(range(len(scorer.store.shards)))
    return merge_topk(group.gather(scorer.topk(query_features, k, shards=mine)), k)
