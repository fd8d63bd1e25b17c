"""`FeatureStore`: projected training features Φ [N, k] with the exact configuration that produced them.

On disk: a directory with `config.json` (AttributionConfig, projection spec, model fingerprint, dataset
size and per-example content hashes, package version) and `features.safetensors`. Files are written to a
temporary name and renamed, so a crash never leaves a half-written store. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import AttributionConfig

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
FEATURES_NAME = "features.safetensors"


class StoreMismatchError(ValueError):
    """A store is used with a model, adapter, projection or dataset other than the one it was built from."""


@dataclass
class FeatureStore:
    features: torch.Tensor
    config: AttributionConfig
    metadata: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def check_compatible(self, config: AttributionConfig, metadata: dict[str, Any]) -> None:
        """Raise `StoreMismatchError` naming the first difference between this store and a query setup."""
        if config.feature_hash() != self.config.feature_hash():
            ours, theirs = self.config.feature_dict(), config.feature_dict()
            diffs = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs.get(k)}
            raise StoreMismatchError(f"store config differs from the query config: {diffs} (store, query)")
        for key in ("projection", "model_fingerprint", "adapter"):
            if key in self.metadata and key in metadata and self.metadata[key] != metadata[key]:
                raise StoreMismatchError(
                    f"store {key} differs from the query pipeline's: the store was featurized from "
                    f"{_short(self.metadata[key])}, the query uses {_short(metadata[key])}"
                )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        header = {"format_version": FORMAT_VERSION, "config": self.config.to_dict(), **self.metadata}
        _atomic_write(directory / FEATURES_NAME, lambda p: save_file({"features": self.features.contiguous()}, p))
        _atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(header, indent=2)))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "FeatureStore":
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} is not a feature store: it has no {CONFIG_NAME}")
        header = json.loads(config_path.read_text())
        if header.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path}: unsupported store format {header.get('format_version')!r}")
        config = AttributionConfig.from_dict(header.pop("config"))
        header.pop("format_version")
        features = load_file(directory / FEATURES_NAME)["features"]
        return cls(features, config, header)


def _atomic_write(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) < 200 else text[:200] + "…"
