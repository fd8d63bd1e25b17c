"""Model outputs for LDS: the diffusion loss of a (retrained) pipeline on query images.

    loss(q; θ) = (1 / (T'·D)) Σ_{t ∈ grid} Σ_{d < D} mean over elements of (ε_θ(x_t, t, c) - target)²,
    x_t = add_noise(x0(q), ε_{q,t,d}, t)

over a fixed grid of T' timesteps and D noises per timestep. The noises are a pure function of
(seed, query key): every retrained model sees exactly the same x_t, so differences between models are
differences of the models, not of the noise (common random numbers). D-TRAK's protocol is all 1000
timesteps × 3 noise seeds; `LossSpec` makes the grid and the number of draws explicit.

`QueryLosses` bundles named query sets (e.g. "generated", "validation", "real") with a `LossSpec` into a
measure for the retraining harness (retrain.py): `measure(pipe) -> {name: loss [n_name]}`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch

from ..data import query_batch, to_image_batch
from ..seeding import seeded_randn

__all__ = ["LossSpec", "diffusion_losses", "QueryLosses"]


@dataclass(frozen=True)
class LossSpec:
    """How the loss of a model on a query is measured.

    timesteps: an int (that many evenly spaced timesteps t = i·T/n, i < n) or an explicit list.
    noise_draws: D, noises per timestep. seed: seed of the noises. rows_per_batch: denoiser rows per forward pass.
    """

    timesteps: int | tuple[int, ...] = 100
    noise_draws: int = 1
    seed: int = 0
    rows_per_batch: int = 2048

    def __post_init__(self):
        if not isinstance(self.timesteps, int):
            object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        if self.noise_draws < 1:
            raise ValueError(f"noise_draws must be >= 1, got {self.noise_draws}")

    def grid(self, num_train_timesteps: int) -> torch.Tensor:
        """long [T']: the timesteps, each in [0, num_train_timesteps)."""
        if isinstance(self.timesteps, int):
            n = self.timesteps
            if not 1 <= n <= num_train_timesteps:
                raise ValueError(f"timesteps must be in [1, {num_train_timesteps}], got {n}")
            return torch.arange(n, dtype=torch.long) * num_train_timesteps // n
        grid = torch.tensor(self.timesteps, dtype=torch.long)
        if len(grid) == 0 or int(grid.min()) < 0 or int(grid.max()) >= num_train_timesteps:
            raise ValueError(f"timesteps must be in [0, {num_train_timesteps}), got {self.timesteps}")
        return grid

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("rows_per_batch")  # execution only: never changes a value
        if not isinstance(data["timesteps"], int):
            data["timesteps"] = list(data["timesteps"])
        return data


@torch.no_grad()
def diffusion_losses(
    pipe,
    images: Any,
    spec: LossSpec = LossSpec(),
    *,
    prompts: Sequence[str | None] | str | None = None,
    keys: Sequence | None = None,
) -> torch.Tensor:
    """float64 [n]: the diffusion loss of `pipe`'s denoiser on each query image, as described in the module.

    `keys`: stable ids of the queries (default 0..n-1); the noise of query i depends on (spec.seed, keys[i]) only.
    Works for every pipeline family with an adapter (pixels or VAE latents, text or class conditioning).
    """
    from ..adapters import get_adapter

    adapter = get_adapter(pipe)
    batch, prompts = query_batch(images, prompts, adapter.validate_images)
    n = len(batch)
    keys = list(range(n)) if keys is None else list(keys)
    if len(keys) != n:
        raise ValueError(f"got {len(keys)} keys for {n} query images")

    grid = spec.grid(adapter.num_train_timesteps)
    per_query = len(grid) * spec.noise_draws
    t_rows = grid.repeat_interleave(spec.noise_draws)  # (t0, d0), (t0, d1), ..., (t1, d0), ...
    denoiser = adapter.denoiser
    was_training = denoiser.training
    denoiser.eval()
    dtype = next(denoiser.parameters()).dtype
    device = adapter.device
    out = torch.empty(n, dtype=torch.float64)
    queries_per_pass = max(1, spec.rows_per_batch // per_query)
    try:
        for start in range(0, n, queries_per_pass):
            stop = min(start + queries_per_pass, n)
            inputs = adapter.encode(batch[start:stop], prompts[start:stop], keys[start:stop], spec.seed)
            shape = inputs.x0.shape[1:]
            noise = torch.cat([seeded_randn((per_query, *shape), spec.seed, "lds-loss", key) for key in keys[start:stop]])
            rows = inputs.repeat_rows(per_query)
            t = t_rows.repeat(stop - start).to(device)
            total = torch.zeros(stop - start, dtype=torch.float64)
            # forward passes of at most rows_per_batch rows
            step = max(1, spec.rows_per_batch)
            for a in range(0, len(t), step):
                b = min(a + step, len(t))
                x0 = rows.x0[a:b]
                eps = noise[a:b].to(device, x0.dtype)
                x_t = adapter.add_noise(x0, eps, t[a:b])
                conditioning = {name: value[a:b] for name, value in rows.conditioning.items()}
                prediction = adapter.predict(x_t.to(dtype), t[a:b], conditioning)
                target = adapter.target(x0, eps, t[a:b])
                values = (prediction.float() - target.float()).pow(2).flatten(1).mean(1).double().cpu()
                owner = torch.arange(a, b) // per_query
                total.index_add_(0, owner, values)
            out[start:stop] = total / per_query
    finally:
        denoiser.train(was_training)
    return out


class QueryLosses:
    """A measure for the retraining harness: `measure(pipe) -> {name: float64 loss [n_name]}` for named query sets.

        measure = QueryLosses({"generated": generated, "real": held_out}, LossSpec(timesteps=100, noise_draws=2))

    Query keys are `"<name>:<i>"`, so each set has its own fixed noises.
    """

    def __init__(self, queries: Mapping[str, Any], spec: LossSpec = LossSpec(),
                 prompts: Mapping[str, Sequence[str | None] | str | None] | None = None):
        if not queries:
            raise ValueError("QueryLosses needs at least one query set")
        self.queries = {name: to_image_batch(images) for name, images in queries.items()}
        self.prompts = dict(prompts or {})
        self.spec = spec

    def __call__(self, pipe, job: Any = None) -> dict[str, torch.Tensor]:
        return {
            name: diffusion_losses(pipe, images, self.spec, prompts=self.prompts.get(name),
                                   keys=[f"{name}:{i}" for i in range(len(images))])
            for name, images in self.queries.items()
        }

    def describe(self) -> dict[str, Any]:
        """What the measure is: recorded by the harness so that a rerun with other queries is refused."""
        digests = {}
        for name, images in self.queries.items():
            h = hashlib.sha256(str(tuple(images.shape)).encode())
            h.update(images.float().contiguous().numpy().tobytes())
            h.update(repr(self.prompts.get(name)).encode())
            digests[name] = h.hexdigest()[:16]
        return {"kind": "diffusion-loss", "spec": self.spec.to_dict(), "queries": digests}
