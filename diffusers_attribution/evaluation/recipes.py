"""Recipes for the retraining harness: how to train one model on a training subset.

A recipe is anything with `train(data, seed) -> pipeline` and, optionally, `describe() -> dict` (recorded in
harness.json, so that a rerun with another recipe is refused). `as_recipe` turns a `demo.digits.DigitsRecipe`
or a plain training function into one.
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping

import torch


@dataclass(frozen=True)
class DigitsTrainingRecipe:
    """`digits.DigitsRecipe` as a harness recipe: `train(images, seed)` = `train_digits_ddpm` with that seed."""

    recipe: Any = None  # digits.DigitsRecipe; None = the default recipe
    progress: bool = False

    def _recipe(self):
        from ..demo.digits import DigitsRecipe

        return self.recipe if self.recipe is not None else DigitsRecipe()

    def train(self, data: torch.Tensor, seed: int):
        from ..demo.digits import train_digits_ddpm

        return train_digits_ddpm(torch.as_tensor(data), replace(self._recipe(), seed=int(seed)), progress=self.progress)

    def describe(self) -> dict[str, Any]:
        recipe = asdict(self._recipe())
        recipe.pop("seed")  # the harness's seeds replace it
        return {"kind": "digits-ddpm", **recipe}


class FunctionRecipe:
    """A user training function as a recipe: `fn(data, seed) -> pipeline` (or `fn(data)`: then `seed` is ignored
    and all training seeds give the same model — pass one seed). `description` is recorded in harness.json."""

    def __init__(self, fn: Callable, description: Mapping[str, Any] | None = None):
        self.fn = fn
        self.description = dict(description or {})
        try:
            parameters = inspect.signature(fn).parameters
            self._takes_seed = len(parameters) >= 2 or "seed" in parameters or any(
                p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters.values())
        except (TypeError, ValueError):
            self._takes_seed = True

    def train(self, data: Any, seed: int):
        return self.fn(data, seed) if self._takes_seed else self.fn(data)

    def describe(self) -> dict[str, Any]:
        name = f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', type(self.fn).__name__)}"
        return {"kind": "function", "function": name, **self.description}


def as_recipe(recipe: Any):
    """A harness recipe from a recipe object (`.train`), a `digits.DigitsRecipe`, or a training function."""
    from ..demo.digits import DigitsRecipe

    if isinstance(recipe, DigitsRecipe):
        return DigitsTrainingRecipe(recipe)
    if hasattr(recipe, "train") and callable(recipe.train):
        return recipe
    if callable(recipe):
        return FunctionRecipe(recipe)
    raise TypeError(f"a recipe needs a train(data, seed) method or must be callable, got {type(recipe).__name__}")


def describe_recipe(recipe: Any) -> dict[str, Any]:
    describe = getattr(recipe, "describe", None)
    if callable(describe):
        return dict(describe())
    return {"kind": type(recipe).__qualname__}
