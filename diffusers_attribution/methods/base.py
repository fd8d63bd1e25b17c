"""`Method`: what one `AttributionConfig.method` is — its name, defaults, the fields it owns, its featurizer and
scorer — and the one registry of methods.

A method is one file in `methods/` that subclasses `Method` and decorates it with `@register_method`; the
registry finds every module of the package on first use (no list to edit elsewhere):

    @register_method
    class MyMethod(Method):
        name = "my-method"
        title = "My method (Author et al., 2025)"
        defaults = {"num_timesteps": 10}
        def featurizer(self, pipe, config, store=None, **options): ...   # featurize_dataset / featurize_queries / metadata
        def scorer(self, store, damping=None, damping_ratio=None): ...    # scores(query_features) -> [n, N], metadata

This module imports nothing heavy (no torch), so that `config.py` and the CLI can ask for names and defaults.
"""

from __future__ import annotations

from ..discovery import discover
from typing import Any, ClassVar

# Config fields that only some methods read; a method lists those it reads in `Method.reads`, and any other
# set to a value is an error (not a silent no-op).
METHOD_FIELDS = ("checkpoints", "learning_rates", "query_timesteps", "query_noise_draws", "encoder", "noise_draws")
# The defaults of every method, unless its `defaults` say otherwise (fields left as None in the config).
BASE_DEFAULTS = {"num_timesteps": 10, "timestep_schedule": "uniform", "damping_ratio": 0.1}


class Method:
    """One attribution method. Class attributes describe it; `featurizer` / `scorer` build its two halves.

    name: the `AttributionConfig.method` value; aliases: other accepted spellings.
    title: the method with its paper, for store cards.
    default_output: the per-sample output differentiated when `config.output` is None (objectives.py).
    defaults: values of config fields left as None (over `BASE_DEFAULTS`).
    reads: which of `METHOD_FIELDS` the method reads.
    calibrated: the calibrated factored projection applies (`calibration_examples` defaults to 64 with `factored`).
    kernel: scores go through the kernel (ΦᵀΦ + λI)⁻¹, so a saved store includes its Gram matrix.
    fingerprints: the store metadata (dotted paths) that pin what the features were computed from; a store of
        this method without them is refused (store/schema.py).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    title: ClassVar[str | None] = None
    default_output: ClassVar[str] = "loss"
    defaults: ClassVar[dict[str, Any]] = {}
    reads: ClassVar[tuple[str, ...]] = ("noise_draws",)
    calibrated: ClassVar[bool] = False
    kernel: ClassVar[bool] = False
    fingerprints: ClassVar[tuple[str, ...]] = ("model_fingerprint",)

    def resolved_defaults(self) -> dict[str, Any]:
        return {**BASE_DEFAULTS, **self.defaults}

    def check_config(self, config) -> None:
        """Method-specific checks of a config (after defaults are applied); raise `ValueError` naming the field."""

    def featurizer(self, pipe, config, store=None, **options):
        """An object with `featurize_dataset(dataset, progress, **store_options) -> FeatureStore`,
        `featurize_queries(images, prompts) -> Tensor [n, d]` and `metadata()`. `store`: the store queries will
        be scored against (its fitted projection, if any, is used)."""
        raise NotImplementedError

    def scorer(self, store, damping: float | None = None, damping_ratio: float | None = None):
        """An object with `scores(query_features) -> Tensor [n, N]` and `metadata` for the store's features."""
        raise NotImplementedError

    def projected_featurizer(self, featurizer_class, pipe, config, store, options: dict):
        """`featurizer_class(pipe, config, projection_state=..., projection_spec=...)` for a method whose
        featurizer takes no options: queries are projected with the store's fitted projection, if it has one."""
        refuse_options(config, options)
        if store is None:
            return featurizer_class(pipe, config)
        return featurizer_class(pipe, config, projection_state=store.projection_state,
                                projection_spec=store.metadata.get("projection"))


def refuse_options(config, options: dict) -> None:
    """A method whose featurizer takes no options: any given is a `TypeError` naming them."""
    if options:
        raise TypeError(f"method {config.method!r} takes no featurizer options, got {sorted(options)}")


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: register a `Method` subclass under its name and aliases."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    for key in (cls.name, *cls.aliases):
        owner = _ALIASES.get(key)
        if owner is not None and owner != cls.name:
            raise ValueError(f"method name {key!r} of {cls.__name__} is already taken by {owner!r}")
        _ALIASES[key] = cls.name
    _REGISTRY[cls.name] = cls()
    return cls


def _discover() -> None:
    discover(__package__)


def method_names() -> tuple[str, ...]:
    """The registered method names, in registration order."""
    _discover()
    return tuple(_REGISTRY)


def get_method(name: str) -> Method:
    """The `Method` registered as `name` (or an alias); `ValueError` listing the choices otherwise."""
    _discover()
    key = _ALIASES.get(str(name).lower())
    if key is None:
        raise ValueError(f"AttributionConfig.method={name!r} is not one of {list(_REGISTRY)}")
    return _REGISTRY[key]
