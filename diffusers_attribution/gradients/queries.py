"""Query samples: each query's measurement gradient averaged over S (t, ε) samples of its own (`config.query_samples`).

Queries are few, so their samples are cheap next to the training set's (the EK-FAC paper uses 250 per query). On the
digits benchmark's shared-noise stores, though, more samples lowered the LDS of D-TRAK, DAS and the Fisher: fresh
samples lose the shared-noise coupling (docs/benchmarks.md, "Query samples"); the default stays unset. For query q
(id: its content hash) and sample s = 0..S-1:

    φ(q) = P (1/S) Σ_s ∇θ f(q, t_s, ε_s)            reduction "mean" (TRAK, D-TRAK, Journey-TRAK, Fisher, EK-FAC)
    φ(q) = (1/S) Σ_s ψ_s / ‖ψ_s‖,  ψ_s = P ∇θ f(q, t_s, ε_s)           "unit-pairs" (DAS)

`query_noise="shared-then-fresh"` (default): samples s < K·D are exactly the training features' pairs, in their
column order (timestep k = s // D, draw d = s % D; with `noise_mode="shared"` the very ε_k every training example
saw, the coupling that helps; with `per-example` noise or `random` timesteps, those of the query's own id, as for
any example); samples s ≥ K·D are fresh. `"fresh"`: every sample is fresh. `"fresh-noise"`: sample s at the training
pairs' timestep t_{s mod K·D}, with fresh noise (a diagnostic: the timesteps kept, the noise coupling lost). A fresh
sample s:

    ε_s = seeded_randn(shape, noise_seed, "query-noise", q, s)
    t_s = floor(T · frac(u_q + s · (√5 - 1) / 2)),   u_q uniform from (noise_seed, "query-timesteps", q)

a golden-ratio (additive recurrence) sequence: any prefix of S samples covers [0, T) evenly (discrepancy
O(log S / S)) and sample s never depends on S, which stratified draws would. So each sample is a pure function of
(noise_seed, the query's content hash, s), and its features of (noise_seed, content hash, S): the same in a batch of any size or order, in any process, and two
identical queries get identical features. The content hash (data.content_hash: image and prompt) is the id, not
the query's position, because a position depends on what else is in the batch. With `query_samples` unset, queries
are featurized as before (the training set's K·D pairs, id "query:i").

Memory: the S samples go through the denoiser `timestep_chunk_size` at a time (default: the training set's K·D per
query), so a pass never holds more rows than a training batch does.

DAS: each sample's projected gradient is divided by its norm before averaging, as on the training side; more
samples estimate E_s[ψ_s / ‖ψ_s‖] over the query's (t, ε) distribution, each timestep weighing the same. The mean
of unit vectors shrinks as they disagree, which scales a query's scores uniformly: per-query rankings and LDS do not
change with that scale.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..seeding import seed_from, seeded_randn
from .task import AttributionTask
from .timesteps import PointTask

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def fresh_timestep(seed: int, query, sample: int, num_train_timesteps: int) -> int:
    """t_s of fresh sample s of `query` (module docstring): a golden-ratio sequence with a seeded offset."""
    offset = seed_from(seed, "query-timesteps", query) / float(1 << 63)
    return min(int(num_train_timesteps * ((offset + sample * GOLDEN) % 1.0)), num_train_timesteps - 1)


def fresh_noise(shape, seed: int, query, sample: int) -> torch.Tensor:
    """ε_s of fresh sample s of `query`."""
    return seeded_randn(shape, seed, "query-noise", query, int(sample))


class QuerySamples:
    """The S (t, ε) samples of queries under `base`, the training features' task (module docstring)."""

    def __init__(self, base: AttributionTask, samples: int | None = None, mode: str | None = None):
        self.base = base
        self.mode = mode or "shared-then-fresh"
        self.shared = base.num_columns if self.mode == "shared-then-fresh" else 0
        self.count = int(samples if samples is not None else base.num_columns)
        self._task: QueryTask | None = None
        self._point_task: QueryPointTask | None = None
        if self.count < self.shared:
            raise ValueError(f"{self.count} query samples are fewer than the training set's {self.shared} (t, ε) "
                             "pairs, which shared-then-fresh uses first: use query_noise='fresh'")

    def timesteps(self, keys: Sequence) -> torch.Tensor:
        """LongTensor [B, S]: the training pairs' timesteps (column order), then fresh ones."""
        T, seed = self.base.timestep_limit, self.base.config.noise_seed  # fresh samples cover the task's [0, T')
        pairs = self.base.timesteps(keys).repeat_interleave(self.base.noise_draws, dim=1)
        if self.mode == "fresh-noise":  # the training pairs' timesteps, cycled
            return pairs[:, torch.arange(self.count) % pairs.shape[1]]
        shared = pairs[:, : self.shared]
        fresh = torch.tensor([[fresh_timestep(seed, key, s, T) for s in range(self.shared, self.count)]
                              for key in keys], dtype=torch.long).view(len(keys), self.count - self.shared)
        return torch.cat([shared, fresh], dim=1)

    def noise(self, key, timestep: int, shape, sample: int) -> torch.Tensor:
        """ε of sample s: the training pair's (the base task's noise of draw s % D at t_s), or a fresh one."""
        if sample < self.shared:
            return self.base.noise(key, timestep, shape, sample % self.base.noise_draws)
        return fresh_noise(shape, self.base.config.noise_seed, key, sample)

    def task(self) -> "QueryTask":
        """The task whose columns are the samples (reduction "mean"); made once."""
        if self._task is None:
            self._task = QueryTask(self)
        return self._task

    def point_task(self) -> "QueryPointTask":
        """The task of single samples (reductions "pairs", "unit-pairs"); made once."""
        if self._point_task is None:
            self._point_task = QueryPointTask(self)
        return self._point_task


class QueryTask(AttributionTask):
    """An `AttributionTask` whose columns are a query's S samples (not K·D pairs): F_q = (1/S) Σ_s f(q, t_s, ε_s)."""

    def __init__(self, samples: QuerySamples):
        super().__init__(samples.base.adapter, samples.base.config)
        self.samples = samples

    @property
    def noise_draws(self) -> int:
        return 1  # each column is one sample

    @property
    def num_columns(self) -> int:
        return self.samples.count

    def chunks(self) -> list[slice]:
        size = self.config.timestep_chunk_size or self.samples.base.num_columns
        return [slice(start, start + size) for start in range(0, self.num_columns, size)]

    def timesteps(self, keys: Sequence) -> torch.Tensor:
        return self.samples.timesteps(keys)

    def column_noise(self, key, timestep: int, shape, column: int) -> torch.Tensor:
        return self.samples.noise(key, timestep, shape, column)


class QueryPointTask(PointTask):
    """A `PointTask` of query samples: its rows are (query key, t_s, s) (`column_keys`)."""

    column_keys = True

    def __init__(self, samples: QuerySamples):
        super().__init__(samples.base.adapter, samples.base.config)
        self.samples = samples

    def noise(self, key, timestep: int, shape, draw: int = 0) -> torch.Tensor:
        query, t, sample = key
        return self.samples.noise(query, t, shape, sample)
