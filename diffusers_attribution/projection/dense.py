"""Dense projectors: `identity` (the exact gradient) and `gaussian` / `rademacher` (P generated blockwise).

φ(z) = Σ_params vec(g_param) P_param / sqrt(k), each block of BLOCK_ROWS rows of P from its own seed
`seed_from(seed, kind, name, shape, k, block)`: a pure function of seeds on any device and dtype.
"""

from __future__ import annotations

import math

import torch

from ..seeding import seed_from
from .base import BLOCK_ROWS, Projector
from .registry import register_projector


class IdentityProjector(Projector):
    """φ(z) = g(z): the exact, unprojected gradient (small models only); k = number of parameters."""

    kind = "identity"

    def __init__(self, shapes, dim=None, seed=0):
        super().__init__(shapes, sum(math.prod(s) for s in shapes.values()), seed)

    def project(self, gradients):
        return torch.cat([gradients[name].flatten(1).float() for name in self.shapes], dim=1)


class DenseProjector(Projector):
    """φ(z) = Σ_params vec(g_param) P_param / sqrt(k), P Gaussian or Rademacher, generated blockwise.

    Blocks are cached on the device while they fit in `cache_bytes`; beyond that they are regenerated per
    batch, so memory stays bounded by one block (BLOCK_ROWS × k floats) whatever the model size.
    """

    def __init__(self, shapes, dim, seed=0, kind="gaussian", cache_bytes=2 << 30):
        super().__init__(shapes, dim, seed)
        if kind not in ("gaussian", "rademacher"):
            raise ValueError(f"unknown dense projector kind {kind!r}")
        self.kind = kind
        self.cache_bytes = cache_bytes
        self._cache: dict[tuple, torch.Tensor] = {}
        self._cached_bytes = 0

    def block(self, name: str, index: int, device: torch.device) -> torch.Tensor:
        """Rows [index·BLOCK_ROWS, ...) of P for parameter `name`, float32 [rows, k]."""
        key = (name, index, str(device))
        if key in self._cache:
            return self._cache[key]
        numel = math.prod(self.shapes[name])
        rows = min(BLOCK_ROWS, numel - index * BLOCK_ROWS)
        generator = torch.Generator().manual_seed(
            seed_from(self.seed, self.kind, name, tuple(self.shapes[name]), self.dim, index)
        )
        if self.kind == "gaussian":
            block = torch.randn(rows, self.dim, generator=generator)
        else:
            block = torch.randint(0, 2, (rows, self.dim), generator=generator).float().mul_(2).sub_(1)
        block = block.div_(math.sqrt(self.dim)).to(device)
        size = block.numel() * 4
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = block
            self._cached_bytes += size
        return block

    def project(self, gradients):
        first = next(iter(gradients.values()))
        out = torch.zeros(first.shape[0], self.dim, dtype=torch.float32, device=first.device)
        for name in self.shapes:
            flat = gradients[name].flatten(1).float()
            for index, start in enumerate(range(0, flat.shape[1], BLOCK_ROWS)):
                out += flat[:, start : start + BLOCK_ROWS] @ self.block(name, index, flat.device)
        return out


@register_projector("identity")
def make_identity(config, denoiser, parameters) -> IdentityProjector:
    return IdentityProjector({name: p.shape for name, p in parameters.items()}, None, config.projection_seed)


@register_projector("gaussian")
def make_gaussian(config, denoiser, parameters) -> DenseProjector:
    return DenseProjector({name: p.shape for name, p in parameters.items()}, config.projection_dim,
                          config.projection_seed, kind="gaussian")


@register_projector("rademacher")
def make_rademacher(config, denoiser, parameters) -> DenseProjector:
    return DenseProjector({name: p.shape for name, p in parameters.items()}, config.projection_dim,
                          config.projection_seed, kind="rademacher")
