"""Per-(timestep, noise) features: the building block of TracIn, ReTrac, Journey-TRAK and the bias diagnostics.

The core `AttributionTask` averages an example's gradient over its K timesteps before projecting. These
methods need the gradient of every single (example i, timestep t, noise draw d) row on its own:

    g_{i,t,d} = ∇θ f(ε_θ(add_noise(x0_i, ε_{i,t,d}, t), t, c_i), target, w_t)

so each row is featurized as a pseudo-example with one timestep (`PointTask`), through the configured
projector (`identity`: exact; dense or factored: φ = P g with ‖φ‖ = ‖g‖ (1 ± O(1/sqrt(k))) by JL), and the
rows are reduced per example:

    mean:        φ_i = (1/(K·D)) Σ_{t,d} φ_{i,t,d}
    normalized:  φ_i = (1/(K·D)) Σ_{t,d} φ_{i,t,d} / ‖φ_{i,t,d}‖          (ReTrac)

Noise of draw d at timestep t: exactly the core task's ε for (t, d) (`AttributionTask.noise`, `draw_noise`),
so D draws at the core task's timesteps reproduce its features with `noise_draws=D`; draw 0 is
`seeded_randn(shape, noise_seed, "noise", [key,] t)`, draw d > 0 appends d to the seed (`key` only in
`per-example` noise mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..adapters import ModelInputs
from .task import AttributionTask, draw_noise, gradients_only_for


class PointTask(AttributionTask):
    """An `AttributionTask` whose examples are (key, t, d) rows: one timestep t and noise draw d each
    (`column_keys`: (key, t, column) rows, column = the pair's index k·D + d in its example: a query's sample)."""

    column_keys = False

    def __init__(self, adapter, config, noise_mode: str | None = None):
        super().__init__(adapter, config)
        self.noise_mode = noise_mode or config.noise_mode

    @property
    def noise_draws(self) -> int:
        return 1  # the draw is part of each row's key

    @property
    def num_columns(self) -> int:
        return 1

    def chunks(self) -> list[slice]:
        return [slice(0, 1)]

    def timesteps(self, keys: Sequence) -> torch.Tensor:
        return torch.tensor([[int(t)] for _, t, _ in keys], dtype=torch.long)

    def noise(self, key, timestep: int, shape: torch.Size, draw: int = 0) -> torch.Tensor:
        example, t, row_draw = key
        return draw_noise(shape, self.config.noise_seed, self.noise_mode, example, t, row_draw, self._shared_noise)


@dataclass
class PairParts:
    """What `timestep_features` uses of a featurizer: its adapter, config, selected parameters and projector (a
    `featurize.Featurizer` has them all; EK-FAC's fit passes its rotated projector this way)."""

    adapter: object
    config: object
    parameters: dict
    projector: object


@dataclass
class TimestepFeatures:
    """features [B, k]: the reduced features; norms [B, K, D]: ‖φ_{i,t,d}‖ of every row before normalizing."""

    features: torch.Tensor
    norms: torch.Tensor


def timestep_features(
    featurizer,
    inputs: ModelInputs,
    keys: Sequence,
    timesteps: torch.Tensor,
    draws: int = 1,
    normalize: bool = False,
    noise_mode: str | None = None,
    rows_per_pass: int | None = None,
    on_rows: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    task: PointTask | None = None,
) -> TimestepFeatures:
    """Reduce per-(t, d) projected gradients of each example (module docstring).

    Args:
        featurizer: its adapter, config, selected parameters and projector are used (a `Featurizer`, or `PairParts`).
        inputs: the encoded examples (x0 [B, ...], conditioning), one row per key.
        keys: the examples' keys (they seed `per-example` noise).
        timesteps: LongTensor [B, K] (or [K], shared by all examples).
        draws: D, noise draws per timestep.
        normalize: divide each row's φ by its L2 norm before averaging (ReTrac).
        noise_mode: override of `config.noise_mode` for these rows.
        rows_per_pass: rows per forward/backward pass (default `config.batch_size`).
        on_rows: called with (example index [rows], φ [rows, k] float64) of every chunk of rows before they are
            reduced (curvature.py accumulates per-pair moments from them).
        task: the `PointTask` to differentiate (default: one of `config.output`; curvature.py passes the loss).
    """
    batch = len(keys)
    if timesteps.ndim == 1:
        timesteps = timesteps.expand(batch, -1)
    K = timesteps.shape[1]
    task = task or PointTask(featurizer.adapter, featurizer.config, noise_mode)
    out = torch.zeros(batch, featurizer.projector.dim, dtype=torch.float64)
    norms = torch.zeros(batch * K * draws, dtype=torch.float64)
    with gradients_only_for(featurizer.adapter.denoiser, featurizer.parameters):
        for rows, index, chunk_inputs, chunk_keys in point_chunks(inputs, keys, timesteps, draws,
                                                                   rows_per_pass or featurizer.config.batch_size,
                                                                   task.column_keys):
            phi = featurizer.projector.features(task, featurizer.parameters, chunk_inputs, chunk_keys)
            phi = phi.detach().double().cpu()
            if on_rows is not None:
                on_rows(index.cpu(), phi)
            norm = phi.norm(dim=1)
            norms[rows] = norm
            if normalize:
                phi = phi / norm.clamp_min(torch.finfo(torch.float64).tiny)[:, None]
            out.index_add_(0, index.cpu(), phi)
    return TimestepFeatures((out / (K * draws)).float(), norms.view(batch, K, draws).float())


def point_chunks(inputs: ModelInputs, keys: Sequence, timesteps: torch.Tensor, draws: int, size: int,
                 column_keys: bool = False):
    """The (example i, t, d) rows of a batch, `size` at a time, example-major: yields (rows: a slice of the
    B·K·D rows, index [rows] of each row's example, the rows' inputs, their `PointTask` keys (key_i, t, d), or
    (key_i, t, k·D + d) with `column_keys`)."""
    rows = [(i, int(t), d, k * draws + d) for i in range(len(keys)) for k, t in enumerate(timesteps[i].tolist())
            for d in range(draws)]
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        index = torch.tensor([row[0] for row in chunk], device=inputs.x0.device)
        chunk_inputs = ModelInputs(
            inputs.x0.index_select(0, index), {k: v.index_select(0, index) for k, v in inputs.conditioning.items()}
        )
        yield (slice(start, start + len(chunk)), index, chunk_inputs,
               [(keys[i], t, column if column_keys else d) for i, t, d, column in chunk])


def uniform_timesteps(num: int, num_train_timesteps: int) -> torch.Tensor:
    """t_k = k · (T // K), k = 0..K-1: the core task's uniform grid (K evenly spaced timesteps)."""
    if num > num_train_timesteps:
        raise ValueError(f"asked for {num} evenly spaced timesteps out of only {num_train_timesteps}")
    return torch.arange(num, dtype=torch.long) * (num_train_timesteps // num)
