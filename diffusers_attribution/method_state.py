"""`ShardStateFeaturizer`: a `Featurizer` that collects tensors besides Φ while it featurizes training rows (the
projected Fisher's F, DAS's residuals), kept in the store's `method_state` (method_state.safetensors).

In memory the state of all rows is collected in one pass. In a directory (resumable, or each process its share of
the shards under accelerate) each shard's state is written beside it in `PARTS/` before the shard itself, and the
main process `combine`s the parts in shard order when it finalizes the store: the same state in any number of
processes, and a resumed run reuses the parts of finished shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .featurize import Featurizer
from .store.files import atomic_write, open_shard

PARTS = "method_state_parts"


class ShardStateFeaturizer(Featurizer):
    """Subclasses define `start_collecting()`, `stop_collecting() -> dict` (the state of the rows featurized in
    between, read from `features`) and `combine(parts) -> dict` (parts in row order)."""

    _parts: Path | None = None

    def start_collecting(self) -> None:
        raise NotImplementedError

    def stop_collecting(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def combine(self, parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def featurize_dataset(self, dataset: Any, progress: bool = True, **options):
        data = self.training_data(dataset)
        if options.get("output_dir") is not None:
            self._parts = Path(options["output_dir"]) / PARTS
            try:
                return super().featurize_dataset(data, progress, **options)
            finally:
                self._parts = None
        if not self.projector.fitted:
            self.fit_projection(data)
        self.start_collecting()
        try:
            store = super().featurize_dataset(data, progress, **options)
        finally:
            state = self.stop_collecting()
        store.method_state = state
        return store

    def featurize_rows(self, data, start: int, stop: int, bar=None):
        if self._parts is None:
            return super().featurize_rows(data, start, stop, bar)
        self.start_collecting()
        try:
            features, hashes = super().featurize_rows(data, start, stop, bar)
        finally:
            state = self.stop_collecting()
        self._parts.mkdir(parents=True, exist_ok=True)  # written before its shard: a finished shard has its part
        tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
        atomic_write(self._parts / part_name(start, stop), lambda path: save_file(tensors, path))
        return features, hashes

    def method_state_from_parts(self, directory: Path, plan: list[dict]) -> dict[str, torch.Tensor]:
        """`combine` of every shard's part, in shard order (called by the main process when finalizing)."""
        parts = []
        for entry in plan:
            with open_shard(Path(directory) / PARTS / part_name(entry["start"], entry["stop"])) as handle:
                parts.append({key: handle.get_tensor(key) for key in handle.keys()})
        return self.combine(parts)


def part_name(start: int, stop: int) -> str:
    return f"rows-{start:09d}-{stop:09d}.safetensors"
