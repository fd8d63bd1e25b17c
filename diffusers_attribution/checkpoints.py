"""Checkpoints of a denoiser: where they come from, how they are loaded in place, and how a config records them.

A checkpoint is any of:
    - a state dict {parameter name: tensor} of the denoiser (or an `nn.Module` whose `state_dict()` is used);
    - a path: a `.safetensors` / `.bin` / `.pt` file holding such a state dict, a saved model directory
      (`denoiser.save_pretrained(dir)`), or a saved pipeline directory (the denoiser's subfolder is used);
    - a dict `{"path": <dir or Hub repo id>, "revision": ..., "subfolder": ...}`; with no "path", the
      pipeline's own repo (`pipe.config._name_or_path`) and the denoiser's subfolder.
Only the JSON forms (paths, dicts) can go into `AttributionConfig.checkpoints`; in-memory state dicts are
recorded there as `{"state_dict": <fingerprint>}` and must be passed again to score against their store.

`CheckpointSet.loaded(c)` copies checkpoint c's values into the denoiser's parameters in place (the same
`nn.Parameter` objects, so projectors and hooks stay valid) and restores the original values on exit.
Keys the denoiser does not have are an error; a checkpoint may leave out parameters that are not attributed
(e.g. a LoRA-only state dict), which then keep their current values.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from .fingerprint import state_fingerprint


class CheckpointSet:
    """The checkpoints c = 1..C of one method run, loadable one at a time into `denoiser`."""

    def __init__(self, checkpoints: Sequence | None, pipe, denoiser: torch.nn.Module, attributed: Sequence[str]):
        self.pipe = pipe
        self.denoiser = denoiser
        self.attributed = list(attributed)
        self.specs = list(checkpoints) if checkpoints else [None]  # None: the denoiser's current weights

    def __len__(self) -> int:
        return len(self.specs)

    def describe(self) -> list[Any] | None:
        """The JSON form for `AttributionConfig.checkpoints` (None when only the current weights are used)."""
        if self.specs == [None]:
            return None
        return [describe(spec) for spec in self.specs]

    @contextlib.contextmanager
    def loaded(self, index: int) -> Iterator[None]:
        spec = self.specs[index]
        if spec is None:
            yield
            return
        state = self.state_dict(spec)
        named = dict(self.denoiser.named_parameters())
        buffers = dict(self.denoiser.named_buffers())
        unknown = sorted(set(state) - set(named) - set(buffers))
        if unknown:
            raise KeyError(f"checkpoint {describe(spec)} has keys the denoiser lacks: {unknown[:5]}")
        missing = sorted(set(self.attributed) - set(state))
        if missing:
            raise KeyError(f"checkpoint {describe(spec)} lacks attributed parameters: {missing[:5]}")
        targets = {**buffers, **named}
        saved = {name: targets[name].detach().clone() for name in state}
        try:
            with torch.no_grad():
                for name, value in state.items():
                    if targets[name].shape != value.shape:
                        raise ValueError(f"checkpoint {describe(spec)}: {name} has shape {tuple(value.shape)}, "
                                         f"the denoiser's is {tuple(targets[name].shape)}")
                    targets[name].copy_(value)
            yield
        finally:
            with torch.no_grad():
                for name, value in saved.items():
                    targets[name].copy_(value)

    def state_dict(self, spec) -> dict[str, torch.Tensor]:
        if isinstance(spec, torch.nn.Module):
            return spec.state_dict()
        if isinstance(spec, dict) and spec and all(isinstance(v, torch.Tensor) for v in spec.values()):
            return spec
        if isinstance(spec, dict) and "state_dict" in spec:
            raise ValueError(
                f"checkpoint {spec} was an in-memory state dict: pass the state dicts again "
                "(tracin_scores(..., checkpoints=[...]) or make_featurizer(pipe, config, checkpoints=[...]))"
            )
        if isinstance(spec, (str, os.PathLike)):
            return self._from_path(Path(spec))
        if isinstance(spec, dict):
            path = spec.get("path") or getattr(self.pipe.config, "_name_or_path", None)
            if not path:
                raise ValueError(f"checkpoint {spec}: no path, and the pipeline has no _name_or_path")
            subfolder = spec.get("subfolder", None if "path" in spec else self._component_name())
            model = type(self.denoiser).from_pretrained(path, subfolder=subfolder, revision=spec.get("revision"))
            return model.state_dict()
        raise TypeError(f"cannot read a checkpoint from a {type(spec).__name__}")

    def _from_path(self, path: Path) -> dict[str, torch.Tensor]:
        if path.is_file():
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                return load_file(str(path))
            return torch.load(path, map_location="cpu", weights_only=True)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        subfolder = None
        if not (path / "config.json").is_file() and (path / self._component_name() / "config.json").is_file():
            subfolder = self._component_name()
        return type(self.denoiser).from_pretrained(path, subfolder=subfolder).state_dict()

    def _component_name(self) -> str:
        for name, component in getattr(self.pipe, "components", {}).items():
            if component is self.denoiser:
                return name
        return "unet"


def describe(spec) -> Any:
    """A JSON-serializable description of one checkpoint."""
    if spec is None or isinstance(spec, str):
        return spec
    if isinstance(spec, os.PathLike):
        return os.fspath(spec)
    if isinstance(spec, torch.nn.Module):
        spec = spec.state_dict()
    if isinstance(spec, dict) and spec and all(isinstance(v, torch.Tensor) for v in spec.values()):
        return {"state_dict": state_fingerprint(spec)}
    if isinstance(spec, dict):
        return {str(k): (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in spec.items()}
    raise TypeError(f"cannot describe a checkpoint given as a {type(spec).__name__}")


@contextlib.contextmanager
def load_checkpoint(pipe, checkpoint) -> Iterator[None]:
    """Inside: `pipe`'s denoiser holds `checkpoint`'s values (any form above); restored on exit."""
    from .adapters import get_adapter

    with CheckpointSet([checkpoint], pipe, get_adapter(pipe).denoiser, []).loaded(0):
        yield
