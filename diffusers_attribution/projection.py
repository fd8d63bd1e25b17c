"""Projectors: per-sample gradients → k-dimensional features φ(z) = g(z) P.

A projector's matrix is a pure function of (seed, parameter name, shape, k): it is generated on the CPU in
fixed-size row blocks, each block from its own counter-based seed, so features agree on any device, in
any dtype, for any batch size. `features(task, parameters, inputs, keys)` is the one call the
featurization loop makes; the factored projector overrides it to work from hooks instead of gradients.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .adapters import ModelInputs
from .gradients import per_example_gradients
from .seeding import seed_from
from .task import AttributionTask

BLOCK_ROWS = 4096  # rows of P generated from one seed; part of the projection's definition, never change it


class Projector:
    """Base class: the dimension k, and features from per-example autograd gradients."""

    kind: str = "base"

    def __init__(self, shapes: dict[str, torch.Size], dim: int, seed: int = 0):
        self.shapes = {name: torch.Size(shape) for name, shape in shapes.items()}
        self.dim = dim
        self.seed = seed

    def spec(self) -> dict:
        """What defines this projection, for the store's metadata."""
        return {"kind": self.kind, "dim": self.dim, "seed": self.seed, "block_rows": BLOCK_ROWS,
                "parameters": {name: list(shape) for name, shape in self.shapes.items()}}

    def features(
        self, task: AttributionTask, parameters: dict, inputs: ModelInputs, keys: Sequence
    ) -> torch.Tensor:
        return self.project(per_example_gradients(task, parameters, inputs, keys))

    def project(self, gradients: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


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


def make_projector(config, denoiser: torch.nn.Module, parameters: dict[str, torch.nn.Parameter]) -> Projector:
    """The projector named by `config.projector` for the selected `parameters` of `denoiser`."""
    kind, dim, seed = config.projector, config.projection_dim, config.projection_seed
    shapes = {name: p.shape for name, p in parameters.items()}
    if kind == "identity":
        return IdentityProjector(shapes, dim, seed)
    if kind in ("gaussian", "rademacher"):
        return DenseProjector(shapes, dim, seed, kind=kind)
    if kind == "factored":
        from .factored import FactoredProjector  # the fast path (hooks), its own module

        return FactoredProjector(denoiser, parameters, dim, seed, layer_dims=config.layer_dims)
    raise ValueError(f"unknown projector {kind!r}")
