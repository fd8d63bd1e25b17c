"""Timestep-induced bias (Xie et al., TMLR 2024): the diagnostics behind Diffusion-ReTrac.

Gradient norms depend strongly on the timestep t, so with TracIn a training example whose gradient was taken at
a large-norm t gets large inner products with every query: it is "generally influential".

- `timestep_gradient_norms`: the profile ‖g(z, t, ε)‖ over a grid of t for the examples of a training set,
  g the per-(example, t, noise) gradient of the configured output, projected with the configured projector
  (exact with `projector="identity"`; otherwise ‖P g‖ = ‖g‖ (1 ± O(1/sqrt(k)))).
- `generally_influential`: frequency_i = (1/n) |{q : i ∈ top-k(τ(·, q))}|, and the count of training
  examples with frequency_i > share.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ..config import AttributionConfig
from ..data import as_training_data, training_batches
from ..featurize import Featurizer
from ..gradients.timesteps import timestep_features, uniform_timesteps


@dataclass
class GeneralInfluence:
    """`frequency` [N]: share of queries whose top-k holds each training example; `indices`: the examples with
    frequency > `share`, most frequent first; `count` = len(indices)."""

    frequency: torch.Tensor
    indices: torch.Tensor
    k: int
    share: float

    @property
    def count(self) -> int:
        return len(self.indices)


def generally_influential(scores: torch.Tensor, k: int = 10, share: float = 0.5) -> GeneralInfluence:
    """Training examples in the top-k of more than `share` of the queries; `scores` [n_queries, N]."""
    if scores.ndim != 2:
        raise ValueError(f"scores must be [n_queries, N], got shape {tuple(scores.shape)}")
    if not 0 <= share < 1:
        raise ValueError(f"share must be in [0, 1), got {share}")
    n, N = scores.shape
    k = min(k, N)
    top = scores.topk(k, dim=1).indices
    frequency = torch.bincount(top.flatten(), minlength=N).double() / n
    chosen = torch.nonzero(frequency > share).flatten()
    chosen = chosen[frequency[chosen].argsort(descending=True, stable=True)]
    return GeneralInfluence(frequency.float(), chosen, k, share)


@dataclass
class GradientNormProfile:
    """`norms` [N, K, D]: ‖g(z_i, t_k, ε_d)‖ for each example i, timestep `timesteps[k]` and noise draw d."""

    timesteps: torch.Tensor
    norms: torch.Tensor

    def mean(self) -> torch.Tensor:
        """[K]: the mean norm over examples and draws at each timestep."""
        return self.norms.double().mean(dim=(0, 2)).float()

    def quantile(self, q: float) -> torch.Tensor:
        """[K]: the q-quantile of the norm over examples and draws at each timestep."""
        return self.norms.transpose(0, 1).flatten(1).double().quantile(q, dim=1).float()

    def summary(self) -> dict[str, Any]:
        mean = self.mean()
        return {
            "timesteps": self.timesteps.tolist(),
            "mean_norm": mean.tolist(),
            "max_over_min": float(mean.max() / mean.min().clamp_min(1e-30)),
            "argmax_timestep": int(self.timesteps[mean.argmax()]),
        }

    def plot(self, path: str | os.PathLike | None = None, ax=None, label: str | None = None, title: str | None = None):
        """Mean norm and its 10-90 % band against t (log scale); returns the `Figure` (Agg, no pyplot)."""
        from matplotlib.figure import Figure

        figure = None
        if ax is None:
            figure = Figure(figsize=(6, 3.6))
            ax = figure.add_subplot()
        t = self.timesteps.numpy()
        line, = ax.plot(t, self.mean().numpy(), label=label or "mean over training examples")
        ax.fill_between(t, self.quantile(0.1).numpy(), self.quantile(0.9).numpy(), color=line.get_color(),
                        alpha=0.2, label="10-90 % of examples")
        ax.set_yscale("log")
        ax.set_xlabel("timestep t")
        ax.set_ylabel("‖∇θ loss(z, t, ε)‖")
        ax.set_title(title or "per-timestep gradient norm of training examples", fontsize=9)
        ax.legend(fontsize=7)
        figure = figure or ax.figure
        if path is not None:
            figure.tight_layout()
            figure.savefig(path, dpi=120)
        return figure


def timestep_gradient_norms(
    pipe,
    train_data: Any,
    config: AttributionConfig | None = None,
    timesteps: int | Sequence[int] = 50,
    draws: int = 1,
    *,
    progress: bool = True,
) -> GradientNormProfile:
    """‖g(z_i, t, ε_d)‖ for every training example, every t of `timesteps` (an int: that many evenly spaced,
    or a list) and `draws` noises; the gradient is that of `config.output` (default: the TracIn config's, loss)."""
    config = config or AttributionConfig(method="tracin")
    featurizer = Featurizer(pipe, config)
    adapter = featurizer.adapter
    grid = (uniform_timesteps(timesteps, adapter.num_train_timesteps) if isinstance(timesteps, int)
            else torch.as_tensor(list(timesteps), dtype=torch.long))
    data = as_training_data(train_data, config.image_column, config.caption_column)
    if not featurizer.projector.fitted:  # a calibrated factored projection is measured on the training set
        featurizer.fit_projection(data)
    per_pass = max(1, config.batch_size // (len(grid) * draws))
    norms = []
    batches = training_batches(data, 0, len(data), per_pass, adapter.validate_images)
    for indices, images, captions, _ in tqdm(batches, total=-(-len(data) // per_pass), desc="gradient norms",
                                             unit="batch", disable=not progress):
        inputs = adapter.encode(images, captions, indices, config.noise_seed)
        norms.append(timestep_features(featurizer, inputs, indices, grid, draws).norms)
    return GradientNormProfile(grid, torch.cat(norms))


def plot_influence_frequency(influences: dict[str, GeneralInfluence], path: str | os.PathLike | None = None,
                             title: str | None = None):
    """The top-k frequency of every training example, sorted, one curve per method; the share threshold dashed."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.6))
    ax = figure.add_subplot()
    for label, influence in influences.items():
        sorted_frequency = influence.frequency.sort(descending=True).values.numpy()
        ax.plot(range(1, len(sorted_frequency) + 1), sorted_frequency,
                label=f"{label}: {influence.count} above {influence.share:.0%}")
    first = next(iter(influences.values()))
    ax.axhline(first.share, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("training examples, most frequent first")
    ax.set_ylabel(f"share of queries with it in their top-{first.k}")
    ax.set_title(title or "generally influential training examples", fontsize=9)
    ax.legend(fontsize=7)
    figure.tight_layout()
    if path is not None:
        figure.savefig(path, dpi=120)
    return figure
