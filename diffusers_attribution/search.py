"""Top-k search over a store's rows for kernel-family scores s_i(q) = q'·φ_i · w_i, with q' = φ(q)(C + λI)⁻¹.

Exact (`exact_topk`, `merge_topk`): one streaming pass of float32 GEMMs over blocks of rows, keeping the running
best k per query; memory O(n·k + one block), independent of N. Approximate (`build_index`, `IndexCache`,
`search`): a FAISS maximum-inner-product index over the rows (w_i·φ_i when weights are given), built locally from
verified features and cached on this machine keyed by the store's shard digests; never read from a store folder
or the Hub (a FAISS index file is untrusted C++ input).

Ordering, everywhere in this module: by score descending, ties by lower row index. Where the dense score matrix
has no ties this is exactly `torch.topk(dense, k)`; with ties it is `torch.sort(dense, descending=True,
stable=True)[:, :k]` (torch.topk itself leaves the order of equal scores unspecified).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

FLAT_MAX_ROWS = 50_000  # below this `build_index` uses an exact IndexFlatIP
INDEX_FORMAT = 1  # part of the cache key: bump when the way an index is built changes


# ---------------------------------------------------------------------------------------------- exact


def exact_topk(query: torch.Tensor, blocks: Iterable[tuple[int, torch.Tensor]], k: int,
               row_weights: torch.Tensor | None = None, *, check_finite: bool = True,
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [n, k'] int64, scores [n, k'] float32) of the best k rows per query, k' = min(k, rows seen).

    `query`: q' [n, d] (float32 or float64; multiplied in float32). `blocks`: (start row, rows [b, d]) in float32,
    float16 or bfloat16 (half blocks are upcast to float32 one block at a time), e.g. `store.blocks()`; the blocks
    must cover disjoint rows. `row_weights`: optional [N] per-row weights w_i (s_i = q'·φ_i · w_i).
    `check_finite`: a `ValueError` when the query, or any score, is NaN or infinite. A NaN or infinite feature
    (or weight) makes the scores of its row non-finite for every finite query, so checking the [n, b] scores
    checks the block at n/d of the cost of `isfinite` over the block itself. `device`: where the GEMMs run (default
    the CPU; blocks already there are not copied, e.g. `ResidentRows`); the result is on the CPU.

    One pass; per block one GEMM and a `topk` of min(k, b), merged with the running best over [n, k + min(k, b)]
    columns: the [n, N] matrix is never formed. Order: module docstring (score descending, ties by lower index).
    """
    if k < 1:
        raise ValueError(f"k must be ≥ 1, got {k}")
    if query.dim() != 2:
        raise ValueError(f"query must be [n, d], got shape {tuple(query.shape)}")
    device = torch.device(device or "cpu")
    q = query.detach().to(device, torch.float32)
    if check_finite and not torch.isfinite(q).all():
        raise ValueError("the query contains NaN or infinite values")
    weights = None
    if row_weights is not None:
        weights = row_weights.detach().reshape(-1).to(device, torch.float32)
    n, d = q.shape
    best_scores = torch.empty(n, 0, dtype=torch.float32, device=device)
    best_indices = torch.empty(n, 0, dtype=torch.long, device=device)
    for start, block in blocks:
        if block.dim() != 2 or block.shape[1] != d:
            raise ValueError(f"block at row {start} is {tuple(block.shape)}, the query has d = {d}")
        rows = block.shape[0]
        if rows == 0:
            continue
        block = block.detach().to(device, torch.float32)  # no copy when it already is
        scores = q @ block.T
        if weights is not None:
            if start + rows > len(weights):
                raise ValueError(f"row_weights has {len(weights)} entries, the blocks reach row {start + rows}")
            scores.mul_(weights[start : start + rows])
        if check_finite and not torch.isfinite(scores).all():
            raise ValueError(f"non-finite scores for rows {start}..{start + rows - 1}: their features"
                             + (" or weights" if weights is not None else "") + " contain NaN or infinite values "
                             "(or the scores overflow float32)")
        values, where = _block_topk(scores, min(k, rows))
        best_scores, best_indices = _select(torch.cat([best_scores, values], 1),
                                            torch.cat([best_indices, where + start], 1), k)
    return best_indices.cpu(), best_scores.cpu()


def merge_topk(parts: Sequence[Any], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, scores) of the best k over several results for disjoint rows (one per process or shard).

    Each part is an (indices, scores) pair, or an object with `.indices` and `.scores` (`result.TopK`); indices are
    global row indices. Same order as `exact_topk`: merging the parts of a split pass gives the unsplit result."""
    pairs = [(p.indices, p.scores) if hasattr(p, "indices") else (p[0], p[1]) for p in parts]
    if not pairs:
        raise ValueError("merge_topk needs at least one part")
    indices = torch.cat([i.to(torch.long) for i, _ in pairs], 1)
    scores = torch.cat([s.to(torch.float32) for _, s in pairs], 1)
    values, where = _select(scores, indices, k)
    return where, values


def _block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk` of each row of `scores` [n, b], with equal scores at the k-th place resolved to the lower column.

    torch.topk picks arbitrarily among scores equal to the k-th one; counting them (one compare over [n, b]) finds
    the rows where that choice mattered, and only those rows are sorted (stable) instead."""
    values, where = scores.topk(k, dim=1)
    if k < scores.shape[1]:
        kth = values[:, -1:]
        tied = (scores == kth).sum(1) != (values == kth).sum(1)
        for row in tied.nonzero().flatten().tolist():
            sorted_values, order = scores[row].sort(descending=True, stable=True)
            values[row], where[row] = sorted_values[:k], order[:k]
    return values, where


def _select(scores: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best k columns of candidates (scores, indices) [n, m] by (score descending, index ascending), sorted.
    The candidates are few (m ≤ 2k per block merge), so two stable sorts are cheap."""
    by_index = indices.argsort(dim=1, stable=True)
    scores, indices = scores.gather(1, by_index), indices.gather(1, by_index)
    values, order = scores.sort(dim=1, descending=True, stable=True)
    k = min(k, scores.shape[1])
    return values[:, :k].contiguous(), indices.gather(1, order[:, :k])


class ResidentRows:
    """A store's rows held in a device's memory (a GPU's) after one verified read: exact top-k per query batch at
    the device's memory bandwidth, the same scores and order as `exact_topk` on the CPU up to the device's float32
    GEMM rounding. The rows are a copy of what was verified when it was made: later changes to the store's files
    are never served. Memory: N·k floats (the store's dtype, half for float16/bfloat16 stores) on the device.

        rows = ResidentRows.load(store.blocks(), "cuda")   # or KernelScorer.resident("cuda"), session search_device
        indices, scores = rows.topk(q', 10)
    """

    kind = "resident"

    def __init__(self, blocks: list[tuple[int, torch.Tensor]], device: torch.device | str,
                 row_weights: torch.Tensor | None = None):
        self.blocks, self.device = blocks, torch.device(device)
        self.row_weights = None if row_weights is None else row_weights.detach().to(self.device, torch.float32)
        self.num_rows = sum(len(block) for _, block in blocks)

    @classmethod
    def load(cls, blocks: Iterable[tuple[int, torch.Tensor]], device: torch.device | str,
             row_weights: torch.Tensor | None = None, block_rows: int = 1 << 18) -> "ResidentRows":
        """Copy `blocks` (as read: every check of the reader applies) to `device`, merged into blocks of up to
        `block_rows` rows (fewer, larger GEMMs)."""
        device = torch.device(device)
        merged, pending, pending_start, pending_rows = [], [], None, 0
        for start, block in blocks:
            if pending_start is None:
                pending_start = start
            pending.append(block.detach().to(device))
            pending_rows += len(block)
            if pending_rows >= block_rows:
                merged.append((pending_start, torch.cat(pending)))
                pending, pending_start, pending_rows = [], None, 0
        if pending:
            merged.append((pending_start, torch.cat(pending)))
        return cls(merged, device, row_weights)

    def topk(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices [n, k'], scores [n, k']) on the CPU: `exact_topk` over the resident blocks on their device."""
        return exact_topk(query, self.blocks, k, self.row_weights, device=self.device)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "device": str(self.device), "num_rows": self.num_rows, "exact": True}


# ---------------------------------------------------------------------------------------------- FAISS


def import_faiss():
    """The `faiss` module, or an ImportError saying which extra installs it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError('approximate search needs FAISS: pip install "diffusers-attribution[index]" '
                          "(faiss-cpu; or install faiss-gpu yourself for the GPU build)") from error
    return faiss


@dataclass
class SearchIndex:
    """A FAISS inner-product index over the rows (× w_i), with how it was built and what it measured.

    `kind`: "flat" (exact IndexFlatIP), "ivf" (IndexIVFFlat) or "hnsw" (IndexHNSWFlat); `params`: nlist/nprobe or
    M/efConstruction/efSearch (and `max_norm`, the sphere's radius); `recall`: recall@10 against the exact top-10,
    measured at build time on `recall_queries` queries not used for tuning (held-out rows, or the second half of
    `tuning_queries`), with the search parameter recorded in `params`."""

    index: Any
    kind: str
    num_rows: int
    dim: int
    params: dict[str, Any] = field(default_factory=dict)
    recall: float | None = None
    recall_queries: int = 0
    build_seconds: float | None = None

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_rows": self.num_rows, "dim": self.dim, "params": dict(self.params),
                "recall_at_10": self.recall, "recall_queries": self.recall_queries, "build_seconds": self.build_seconds}


def choose_kind(num_rows: int) -> str:
    """The index `build_index` makes for `num_rows` rows: exact "flat" below `FLAT_MAX_ROWS`, else "ivf"
    (docs/scale.md: at 100k × 2048, IVF built in 24 s and reached recall@10 0.99 on real queries; HNSW took 41 s
    and stayed at 0.63 with efSearch 4096)."""
    return "flat" if num_rows < FLAT_MAX_ROWS else "ivf"


def default_params(kind: str, num_rows: int) -> dict[str, Any]:
    """Build parameters of `kind` for `num_rows` rows (the search parameter is then tuned by measured recall)."""
    if kind == "flat":
        return {}
    if kind == "ivf":
        nlist = max(1, min(num_rows // 8, int(round(4 * math.sqrt(num_rows)))))
        return {"nlist": nlist, "train_rows": min(num_rows, 16 * nlist), "niter": 10}
    if kind == "hnsw":
        return {"M": 32, "efConstruction": 64}
    raise ValueError(f"unknown index kind {kind!r}: use 'flat', 'ivf' or 'hnsw'")


def _passes(blocks) -> Callable[[], Iterable[tuple[int, torch.Tensor]]]:
    """A function giving a fresh pass over the blocks: `blocks` is a callable (e.g. `store.blocks`) or a
    re-iterable collection (a list); a one-shot iterator is refused (building needs two passes)."""
    if callable(blocks):
        return blocks
    if iter(blocks) is blocks:
        raise TypeError("build_index reads the rows twice: pass a callable returning the blocks (e.g. store.blocks) "
                        "or a list of (start, block), not a one-shot iterator")
    return lambda: iter(blocks)


def _weighted(start: int, block: torch.Tensor, weights: torch.Tensor | None):
    """The rows as FAISS reads them: float32 numpy, × w_i when weighted."""
    import numpy as np

    rows = block.detach().to("cpu", torch.float32)
    if weights is not None:
        rows = rows * weights[start : start + len(rows), None]
    return np.ascontiguousarray(rows.numpy())


def _augment(rows, max_norm: float):
    """[x, √(M² − ‖x‖²)]: every row on the sphere of radius M, inner products with [q, 0] unchanged (q·x), so that
    maximum inner product is nearest neighbour on the sphere (Bachrach et al. 2014) and IVF's k-means and probing
    are not biased towards the rows of largest norm."""
    import numpy as np

    squared = np.einsum("ij,ij->i", rows, rows, dtype=np.float64)
    extra = np.sqrt(np.maximum(max_norm * max_norm - squared, 0.0)).astype(np.float32)
    return np.ascontiguousarray(np.concatenate([rows, extra[:, None]], axis=1))


def build_index(blocks, dim: int, num_rows: int, row_weights: torch.Tensor | None = None, kind: str | None = None, *,
                params: dict[str, Any] | None = None, seed: int = 0, target_recall: float = 0.95,
                recall_queries: int = 200, query_map: torch.Tensor | None = None,
                tuning_queries: torch.Tensor | None = None, use_gpu: bool | None = None) -> SearchIndex:
    """A FAISS maximum-inner-product index over `num_rows` rows of width `dim` (× `row_weights` when given).

    `blocks`: a callable giving (start, rows) blocks (e.g. `store.blocks`) or a list; it is read twice (a sample and
    the largest row norm, then every row). `kind`: None chooses by N (`choose_kind`): "flat" (exact IndexFlatIP),
    "ivf" (IndexIVFFlat) or "hnsw" (IndexHNSWFlat), all with METRIC_INNER_PRODUCT. IVF and HNSW index the rows
    augmented onto a sphere (`_augment`; queries get a 0): IVF's nlist ≈ 4·√N spherical k-means centroids are
    trained on a seeded sample of rows. The search parameter (IVF's nprobe, HNSW's efSearch) is the smallest power
    of two reaching `target_recall` recall@10 against the exact top-10 for held-out rows used as queries (not in
    the training sample): tuned on `recall_queries` of them; `SearchIndex.recall` is measured on another
    `recall_queries`. `query_map` [dim, dim]: the held-out rows are multiplied by it before being used as queries
    (e.g. (C + λI)⁻¹, the map from a training image's φ to its q'). `tuning_queries` [m, dim]: q' of real queries
    (not training rows) to tune on (the first half) and measure on (the second half) instead; prefer them: a
    training row used as a query finds itself and its near-copies, which a query from outside the training set need
    not (docs/scale.md: on the tiled digits store, tuning on rows, and on rows × (C + λI)⁻¹, both chose nprobe 8,
    which gave recall@10 0.23 on real q'). The GPU build is used when FAISS sees a GPU (`use_gpu=None`; not tested
    here: no GPU); the index kept is the CPU one.
    """
    faiss = import_faiss()
    import numpy as np

    started = time.perf_counter()
    kind = kind or choose_kind(num_rows)
    params = {**default_params(kind, num_rows), **(params or {})}
    weights = None if row_weights is None else row_weights.detach().reshape(-1).to("cpu", torch.float32)
    if weights is not None and len(weights) != num_rows:
        raise ValueError(f"row_weights has {len(weights)} entries, the store {num_rows} rows")
    fresh = _passes(blocks)
    generator = np.random.default_rng(seed)
    train_rows = params.get("train_rows", 0) if kind == "ivf" else 0
    held_out = min(2 * recall_queries, max(0, num_rows - train_rows))
    chosen = generator.permutation(num_rows)[: train_rows + held_out]
    train_ids, query_ids = np.sort(chosen[:train_rows]), chosen[train_rows:]
    wanted = np.sort(chosen)
    train_set = set(train_ids.tolist())
    augmented = kind in ("ivf", "hnsw")
    sample, max_norm = {}, 0.0
    if len(wanted) or augmented:  # pass 1: the training sample, the held-out rows (unweighted), the largest norm
        for start, block in fresh():
            rows = _weighted(start, block, weights)
            if augmented and len(rows):
                max_norm = max(max_norm, float(np.sqrt(np.einsum("ij,ij->i", rows, rows, dtype=np.float64).max())))
            lo, hi = np.searchsorted(wanted, [start, start + len(rows)])
            if hi > lo:
                picked = wanted[lo:hi]
                bare = rows if weights is None else _weighted(start, block, None)
                for i in picked.tolist():
                    sample[i] = rows[i - start] if i in train_set else bare[i - start]
    width = dim + 1 if augmented else dim
    if augmented:
        params["max_norm"] = max_norm
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(width)
        index = faiss.IndexIVFFlat(quantizer, width, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = params["niter"]
        index.cp.seed = seed
        index.cp.spherical = True  # unit centroids: rows are assigned by angle on the sphere
        index.cp.min_points_per_centroid = 1  # the sample size is ours (params["train_rows"]); no warning
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(width, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
    else:
        raise ValueError(f"unknown index kind {kind!r}")
    use_gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
    working = index
    if use_gpu and kind != "hnsw":  # FAISS has no GPU HNSW
        working = faiss.index_cpu_to_all_gpus(index)
    if kind == "ivf":
        working.train(_augment(np.stack([sample[i] for i in train_ids.tolist()]), max_norm))
    queries = np.stack([sample[i] for i in query_ids.tolist()]) if len(query_ids) else np.empty((0, dim), "float32")
    if query_map is not None and len(queries):
        queries = np.ascontiguousarray((torch.from_numpy(queries).double() @ query_map.detach().cpu().double()).float().numpy())
    if tuning_queries is not None:
        queries = np.ascontiguousarray(tuning_queries.detach().to("cpu", torch.float32).reshape(-1, dim).numpy())
    truth_parts = []
    for start, block in fresh():  # pass 2: every row, and the exact top-10 of the held-out queries
        rows = _weighted(start, block, weights)
        if len(queries):
            truth_parts.append(exact_topk(torch.from_numpy(queries), [(start, torch.from_numpy(rows))], 10))
        working.add(_augment(rows, max_norm) if augmented else rows)
    if working.ntotal != num_rows:
        raise ValueError(f"the blocks held {working.ntotal} rows, expected {num_rows}")
    if working is not index:
        index = faiss.index_gpu_to_cpu(working)
    result = SearchIndex(index, kind, num_rows, dim, params)
    if len(queries):
        truth = merge_topk(truth_parts, 10)[0].numpy()
        half = len(queries) // 2 if len(queries) >= 2 else len(queries)
        tune, report = slice(0, half), slice(half, None) if len(queries) >= 2 else slice(0, half)
        knob = {"ivf": "nprobe", "hnsw": "efSearch"}.get(kind)
        if knob is not None:
            limit = params["nlist"] if kind == "ivf" else 4096
            value = 1
            while True:
                result.params[knob] = value
                if value >= limit or _recall(result, queries[tune], truth[tune]) >= target_recall:
                    break
                value = min(2 * value, limit)
        result.recall = _recall(result, queries[report], truth[report])
        result.recall_queries = len(queries[report])
    result.build_seconds = time.perf_counter() - started
    return result


def _recall(index: SearchIndex, queries, truth) -> float:
    import numpy as np

    found = search(index, torch.from_numpy(queries), truth.shape[1])[0].numpy()
    hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) / max(1, (t >= 0).sum()) for f, t in zip(found, truth)]
    return float(np.mean(hits))


def search(index: SearchIndex, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [n, k] int64, scores [n, k] float32) from the index, best first; -1 / -inf where there are fewer
    than k rows (for IVF, a query whose probed lists hold fewer than k rows is searched again with twice the
    lists until they do).

    The indexes keep the rows themselves in float32 (Flat storage), so the returned scores are the exact inner
    products q'·(w_i φ_i) of the returned rows (FAISS's float32 sums; no rescoring pass is needed): only which
    rows are candidates is approximate. Ties are re-ordered by lower index among the returned rows."""
    import numpy as np

    q = np.ascontiguousarray(query.detach().to("cpu", torch.float32).reshape(-1, index.dim).numpy())
    if index.index.d == index.dim + 1:  # rows augmented onto a sphere (`_augment`): the query's extra entry is 0
        q = np.ascontiguousarray(np.concatenate([q, np.zeros((len(q), 1), np.float32)], axis=1))
    if index.kind == "ivf":
        index.index.nprobe = int(index.params.get("nprobe", 1))
    elif index.kind == "hnsw":
        index.index.hnsw.efSearch = max(int(index.params.get("efSearch", 16)), k)
    scores, indices = index.index.search(q, k)
    if index.kind == "ivf":  # a query whose probed lists hold fewer than k rows: probe more lists, for it only
        nprobe = index.index.nprobe
        while (indices < 0).any() and nprobe < index.index.nlist:
            short = (indices < 0).any(axis=1)
            nprobe = min(2 * nprobe, index.index.nlist)
            index.index.nprobe = nprobe
            scores[short], indices[short] = index.index.search(np.ascontiguousarray(q[short]), k)
    scores = torch.from_numpy(scores).float()
    indices = torch.from_numpy(indices).long()
    scores[indices < 0] = -math.inf
    where, values = _select(scores, indices.where(indices >= 0, torch.iinfo(torch.long).max), k)[::-1]
    return where.where(values > -math.inf, torch.full_like(where, -1)), values


# ---------------------------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """Where indexes are cached: huggingface_hub's assets cache (`$HF_HOME/assets/diffusers-attribution/…`), or
    `~/.cache/diffusers-attribution/indexes` without huggingface_hub."""
    try:
        from huggingface_hub import cached_assets_path

        return Path(cached_assets_path(library_name="diffusers-attribution", namespace="default", subfolder="indexes"))
    except ImportError:
        return Path(os.path.expanduser("~/.cache/diffusers-attribution/indexes"))


def store_digests(store) -> list[str]:
    """The sha256 of every shard of a store on disk, in order (from its config.json); for a store in memory, one
    sha256 of its float32 rows."""
    if store.directory is not None and store.shards and all("sha256" in entry for entry in store.shards):
        return [entry["sha256"] for entry in store.shards]
    digest = hashlib.sha256()
    for _, block in store.blocks():
        digest.update(block.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return [digest.hexdigest()]


def weights_digest(row_weights: torch.Tensor | None) -> str | None:
    """sha256 of the weights' dtype, shape and bytes (None without weights)."""
    if row_weights is None:
        return None
    tensor = row_weights.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}:{list(tensor.shape)}:".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class IndexCache:
    """FAISS indexes built on this machine, saved under `root` by a key of what they were built from.

    The key is the sha256 of (the store's shard digests, the weights' bytes, the index kind and its build
    parameters, the seed, target recall and number of recall queries, the digests of `query_map` and
    `tuning_queries`, N, k, `INDEX_FORMAT`); the file is `<root>/<key>.faiss` (with its build record in
    `<key>.json`), both written to a temporary name in `root` and renamed (`store.files.atomic_write`): the path is
    a function of the key alone. An index is only ever read from there — never from a store folder or the Hub —
    and is built when absent (or unreadable, or not of the expected size)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    @staticmethod
    def key(digests: Sequence[str], row_weights: torch.Tensor | None = None, kind: str = "flat",
            params: dict[str, Any] | None = None, **options: Any) -> str:
        blob = {"format": INDEX_FORMAT, "digests": list(digests), "weights": weights_digest(row_weights),
                "kind": kind, "params": params or {}, "options": options}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not an index key: {key!r}")
        return self.root / f"{key}.faiss"

    def get_or_build(self, digests: Sequence[str], blocks, dim: int, num_rows: int,
                     row_weights: torch.Tensor | None = None, kind: str | None = None, *,
                     params: dict[str, Any] | None = None, seed: int = 0, target_recall: float = 0.95,
                     recall_queries: int = 200, query_map: torch.Tensor | None = None,
                     tuning_queries: torch.Tensor | None = None, build: bool = True,
                     latest: bool = False) -> SearchIndex | None:
        """The cached index for these digests, weights, kind and parameters, or a new one (`build_index`), saved;
        `build=False`: the cached one or None (FAISS is imported only when there is one to read, or to build).
        `latest=True` (with `build=False`): when there is none of this kind and these parameters, the index built
        last for the same rows and weights, whatever its kind and parameters (what a session looks for: an index
        built with `diffusers-attribution index --kind hnsw`, say)."""
        from .store.files import atomic_write

        kind = kind or choose_kind(num_rows)
        params = {**default_params(kind, num_rows), **(params or {})}
        key = self.key(digests, row_weights, kind, params, seed=seed, target_recall=target_recall,
                       recall_queries=recall_queries, num_rows=num_rows, dim=dim, query_map=weights_digest(query_map),
                       tuning_queries=weights_digest(tuning_queries))
        rows_key = self.key(digests, row_weights, "latest", num_rows=num_rows, dim=dim)  # the rows, not the build
        path = self.path(key)
        if not build and not (path.is_file() and path.with_suffix(".json").is_file()):
            pointer = self.root / f"{rows_key}.latest"
            if not (latest and pointer.is_file() and pointer.stat().st_size == 64):
                return None
            try:
                path = self.path(pointer.read_text())  # validated: 64 hex digits, a file in this cache
            except (OSError, ValueError, UnicodeDecodeError):
                return None
            kind = None  # the record says which
        found = self._read(path, kind, num_rows, dim)
        if found is not None or not build:
            return found
        faiss = import_faiss()
        built = build_index(blocks, dim, num_rows, row_weights, kind, params=params, seed=seed,
                            target_recall=target_recall, recall_queries=recall_queries, query_map=query_map,
                            tuning_queries=tuning_queries)
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda temporary: faiss.write_index(built.index, temporary))
        atomic_write(path.with_suffix(".json"),
                     lambda temporary: Path(temporary).write_text(json.dumps(built.describe(), indent=2)))
        atomic_write(self.root / f"{rows_key}.latest", lambda temporary: Path(temporary).write_text(key))
        return built

    @staticmethod
    def _read(path: Path, kind: str | None, num_rows: int, dim: int) -> SearchIndex | None:
        """The index at `path` with its build record, or None when absent, unreadable, or not of the expected kind
        (None: any of "flat", "ivf", "hnsw"), rows and width."""
        if not (path.is_file() and path.with_suffix(".json").is_file()):
            return None
        faiss = import_faiss()
        try:
            record = json.loads(path.with_suffix(".json").read_text())
            kind = kind or record.get("kind")
            if kind not in ("flat", "ivf", "hnsw") or record.get("kind") != kind:
                return None
            index = faiss.read_index(str(path))
            width = dim + 1 if kind in ("ivf", "hnsw") else dim  # `_augment`
            if index.ntotal == num_rows and index.d == width:
                return SearchIndex(index, kind, num_rows, dim, record["params"], record["recall_at_10"],
                                   record["recall_queries"], record["build_seconds"])
        except (OSError, RuntimeError, ValueError, KeyError, TypeError):
            pass  # unreadable: built again, and replaced
        return None

    def for_store(self, store, row_weights: torch.Tensor | None = None, kind: str | None = None,
                  **options: Any) -> SearchIndex | None:
        """`get_or_build` for a `FeatureStore`: keyed by its shard digests, built from `store.blocks`."""
        return self.get_or_build(store_digests(store), store.blocks, store.dim, len(store), row_weights, kind, **options)
