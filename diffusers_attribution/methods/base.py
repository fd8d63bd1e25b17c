"""`Method`: one `AttributionConfig.method` as a set of declared parts, and the one registry of methods.

A method is one file in `methods/` that subclasses `Method` and decorates it with `@register_method`; the
registry finds every module of the package on first use (no list to edit elsewhere). It declares its parts;
`featurize.py` runs them in one order for every method (fit → per-batch features and state → combine → writer)
and `Method.scorer` is what every caller scores with:

    @register_method
    class MyMethod(Method):
        name = "my-method"
        title = "My method (Author et al., 2025)"
        default_output = "loss"                  # the training output f(z, t, ε) (objectives.py)
        reduction = "mean"                       # per-(t, ε) rows → one feature: "mean", "pairs", "unit-pairs"
        defaults = {"num_timesteps": 10}
        def scorer(self, store, damping=None, damping_ratio=None): ...   # scoring.KernelScorer / DotScorer

Method modules import nothing heavy at module level (torch, diffusers: inside the functions that need them), so
that `AttributionConfig` and the CLI can ask for names and defaults without importing torch.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .registry import REDUCTIONS, PerPair, default_method, get_method, method_names, register_method

__all__ = ["BASE_DEFAULTS", "Method", "PerPair", "REDUCTIONS", "default_method", "get_method", "method_names",
           "refuse_options", "register_method"]

# The defaults of every method, unless its `defaults` say otherwise (fields left as None in the config).
BASE_DEFAULTS = {"num_timesteps": 10, "timestep_schedule": "uniform", "damping_ratio": 0.1}


class Method:
    """One attribution method: class attributes declare its parts; the methods below build them.

    name: the `AttributionConfig.method` value; aliases: other accepted spellings.
    title: the method with its paper, recorded in the store (its card's title).
    default_output: the training output f differentiated when `config.output` is None (objectives.py).
    records: further per-(t, ε) outputs recorded from the same forward pass as the gradients (DAS: the loss).
    reduction: how an example's per-(t, ε) gradients become one feature: "mean" (the averaged gradient,
        projected once), "pairs" (each pair projected, then averaged), "unit-pairs" (each projected pair
        divided by its norm, then averaged); `query_reduction`: the same for queries (None: `reduction`).
    defaults: values of config fields left as None (over `BASE_DEFAULTS`; `PerPair(n)`: n per training pair);
        `lora_defaults`: over those when `parameters="lora"` (the damping ratios chosen on the LoRA benchmark,
        docs/benchmarks.md).
    default_for: the `parameters` settings ("all", "lora") for which this is the method of a config that names none.
    reads: which method-specific config fields (`config.METHOD_FIELDS`) the method reads.
    calibrated: the calibrated factored projection applies (`calibration_examples` defaults to 64 with `factored`).
    kernel: scores go through the kernel (ΦᵀΦ + λI)⁻¹, so a saved store includes its Gram matrix.
    curvature / row_weights: the names, in the store's method state, of the matrix C replacing ΦᵀΦ in the kernel
        scorer and of the per-row weights w_i (scoring.KernelScorer).
    per_step_queries: Journey-TRAK's per-step queries may be scored against this method's stores.
    feature_fields: config fields outside the hashed roles that this method's features depend on (EK-FAC: the
        damping its features are whitened at); they join the feature hash, so a store or a resumed folder of
        another value is a mismatch, not a silent reuse.
    fingerprints: the store metadata (dotted paths) that pin what the features were computed from; a store of
        this method without them is refused (recorded in config.json by the writer: store/schema.py reads them).
    """

    name: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    title: ClassVar[str | None] = None
    default_output: ClassVar[str] = "loss"
    records: ClassVar[tuple[str, ...]] = ()
    reduction: ClassVar[str] = "mean"
    query_reduction: ClassVar[str | None] = None
    defaults: ClassVar[dict[str, Any]] = {}
    lora_defaults: ClassVar[dict[str, Any]] = {}
    default_for: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ("noise_draws", "query_samples", "query_noise")
    calibrated: ClassVar[bool] = False
    kernel: ClassVar[bool] = False
    curvature: ClassVar[str | None] = None
    row_weights: ClassVar[str | None] = None
    per_step_queries: ClassVar[bool] = False
    fingerprints: ClassVar[tuple[str, ...]] = ("model_fingerprint",)
    feature_fields: ClassVar[tuple[str, ...]] = ()

    def resolved_defaults(self, parameters: Any = "all") -> dict[str, Any]:
        """The values of config fields left as None, for a `parameters` setting."""
        return {**BASE_DEFAULTS, **self.defaults, **(self.lora_defaults if parameters == "lora" else {})}

    def check_config(self, config) -> None:
        """Method-specific checks of a config (after defaults are applied); raise `ValueError` naming the field."""

    def facts(self) -> dict[str, Any]:
        """What the writer records about the method in config.json, so that nothing below `methods/` asks the
        registry: the card's title, the fingerprints a store must have, whether it keeps a kernel."""
        return {"title": self.title, "fingerprints": list(self.fingerprints), "kernel": self.kernel}

    # ------------------------------------------------------------------------------------ parts

    def projector(self, config, denoiser, parameters):
        """The projector (projection/registry.py: the one `config.projector` names, unless a method needs its own)."""
        from ..projection.registry import make_projector

        return make_projector(config, denoiser, parameters)

    def featurizer(self, pipe, config, fitted: dict | None = None, **options):
        """The featurizer of `config` for `pipe` (featurize.Featurizer runs the declared parts); `fitted`: the
        store's fitted state ({"projection": ..., "method": ...}) that queries are projected with."""
        from ..featurize import Featurizer

        refuse_options(config, options)
        return Featurizer(pipe, config, self, fitted)

    def collector(self, featurizer):
        """The state collected while featurizing training rows (`StateCollector`: on_pairs / on_records / state),
        or None when the method keeps nothing besides Φ."""
        return None

    def combine(self, parts: list[dict]) -> dict:
        """The method state of all rows from the states of consecutive row ranges, in row order."""
        raise NotImplementedError(f"method {self.name!r} collects no state")

    def query_features(self, featurizer, images, prompts=None):
        """φ(q) [n, k] of query images: the featurizer's own, unless the method transforms them (EK-FAC)."""
        return featurizer.featurize_queries(images, prompts)

    def scorer(self, store, damping: float | None = None, damping_ratio: float | None = None):
        """The scorer of `store` (scoring.py): `scores(query_features) -> [n, N]`, `topk`, `metadata`. Kernel
        methods: the kernel scorer with the declared curvature and row weights from the store's method state."""
        if not self.kernel and self.curvature is None:
            raise NotImplementedError(f"method {self.name!r} declares no scorer")
        from ..scoring import KernelScorer

        state = store.method_state or {}
        parts = {}
        for part, key in (("curvature", self.curvature), ("row_weights", self.row_weights)):
            if key is not None:
                if key not in state:
                    raise ValueError(f"the store holds no {key!r} in its method state: featurize it with "
                                     f"method={self.name!r}")
                parts[part] = state[key]
        config = store.config
        return KernelScorer(store, config.damping if damping is None else damping,
                            config.damping_ratio if damping_ratio is None else damping_ratio, **parts)


def refuse_options(config, options: dict) -> None:
    """A method whose featurizer takes no options: any given is a `TypeError` naming them."""
    if options:
        raise TypeError(f"method {config.method!r} takes no featurizer options, got {sorted(options)}")
