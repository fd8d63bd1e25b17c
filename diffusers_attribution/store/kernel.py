"""The Gram matrix of a store's features, accumulated block by block in float64 (kernel.safetensors).

    K = ΦᵀΦ [k, k] when N > k (primal: a sum over rows, so shards and processes add up), else ΦΦᵀ [N, N] (dual)
"""

from __future__ import annotations

import torch


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
