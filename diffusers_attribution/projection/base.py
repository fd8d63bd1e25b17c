"""`Projector`: per-sample gradients → k-dimensional features φ(z) = g(z) P; the protocol every projector follows.

A projector's matrix is a pure function of (seed, parameter name, shape, k): it is generated on the CPU in
fixed-size row blocks, each block from its own counter-based seed, so features agree on any device, in
any dtype, for any batch size. `features(task, parameters, inputs, keys)` is the one call the
featurization loop makes; the factored projector overrides it to work from hooks instead of gradients.

Projectors fitted on data (`fits_on_data = True`, e.g. the calibrated bases) are `fit` on the training examples
`fit_examples(N)` picks, before any `features` call; their `state_dict()` is saved with the features and
`load_state_dict` restores it for queries, so a fitted projection is never recomputed.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..adapters import ModelInputs
from ..gradients.reference import per_example_gradients
from ..gradients.task import AttributionTask

BLOCK_ROWS = 4096  # rows of P generated from one seed; part of the projection's definition, never change it
FINISH_ROWS, FINISH_BYTES = 256, 64 << 20  # `Projector.finish_rows`


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

    # ------------------------------------------------------------------ the featurization loop's two steps

    def partial_features(self, task: AttributionTask, parameters: dict, inputs: ModelInputs,
                         keys: Sequence) -> torch.Tensor:
        """Per batch: what `finish` turns into φ row by row; features = finish(partial_features). A projector
        whose last step is one linear map, such as the calibrated mix, runs it on `finish_rows` rows at once."""
        return self.features(task, parameters, inputs, keys)

    def finish(self, partial: torch.Tensor) -> torch.Tensor:
        return partial

    @property
    def partial_dim(self) -> int:
        """Columns of `partial_features`."""
        return self.dim

    @property
    def finish_rows(self) -> int:
        """Rows of `partial_features` the featurization loop keeps on the device before one `finish` and one
        copy to the CPU (FINISH_ROWS, fewer if they would take more than FINISH_BYTES)."""
        return max(1, min(FINISH_ROWS, FINISH_BYTES // (4 * max(1, self.partial_dim))))

    # ------------------------------------------------------------------ projectors fitted on data

    fits_on_data: bool = False
    fit_batch_size: int = 4  # examples per fitting step (fixed, so sums run in one order)

    @property
    def fitted(self) -> bool:
        """Ready for `features`: always for seeded projectors; after `fit` / `load_state_dict` for fitted ones."""
        return True

    def fit_examples(self, num_examples: int) -> list[int]:
        """The training examples `fit` must see (sorted indices)."""
        return []

    def fit(self, task: AttributionTask, parameters: dict, batches, progress: bool = False) -> None:
        """Fit on `batches` [(ModelInputs, keys), ...] of the `fit_examples` (a list: read more than once);
        `progress`: show a progress bar saying what the fit is doing."""
        raise TypeError(f"the {self.kind} projector is a function of seeds; it is not fitted on data")

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """What `fit` measured (saved in the store as projection.safetensors); None for seeded projectors."""
        return None

    def load_state_dict(self, state: dict[str, torch.Tensor], spec: dict | None = None) -> None:
        """Restore `state_dict()`; `spec`: the store's `spec()` of the projection that made it (its version)."""
        raise TypeError(f"the {self.kind} projector is a function of seeds; it has no saved state")
