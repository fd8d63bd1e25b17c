"""`AttributionConfig`: every choice that changes a feature or a score, serialized to JSON with a stable hash.

Each field declares its role (`field(metadata={"role": ...})`), and the feature hash derives from the roles:

    feature      changes feature values                            hashed
    projection   changes the projection (and so the features)      hashed
    score        changes only scores (damping)                     not hashed
    execution    changes only where and how fast                    not hashed
    data         names dataset columns                             not hashed (the example hashes pin the data)

A hashed field with `omit` in its metadata is left out of the hash while its value is one of `omit` (a later
field whose unset value gives the old features, so that earlier hashes stay valid). Method names, their
defaults and the fields each reads come from the method registry (methods/base.py), projector names from
the projector registry (projection/registry.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from .methods.base import METHOD_FIELDS, get_method
from .projection.registry import projector_names

OUTPUTS = ("loss", "squared-norm", "mean", "l1-norm", "l2-norm", "linf-norm", "weighted-mse")
TIMESTEP_SCHEDULES = ("uniform", "random")
NOISE_MODES = ("shared", "per-example")
PARAMETER_SETS = ("all", "lora")
DTYPES = ("float32", "float16", "bfloat16")
ROLES = ("feature", "projection", "score", "execution", "data")
HASHED_ROLES = ("feature", "projection")
# Upper bounds of the count fields, checked before anything is allocated from them (a store's config.json, --config
# and the CLI flags come from outside): far above any real run, far below an allocation that cannot succeed.
CAPS = {"num_timesteps": 10_000, "noise_draws": 10_000, "query_timesteps": 10_000, "query_noise_draws": 10_000,
        "projection_dim": 1 << 20, "sketch_dim": 1 << 21, "calibration_examples": 1 << 20, "batch_size": 1 << 16,
        "timestep_chunk_size": 1 << 16}


def _field(role: str, default: Any = None, *, omit: tuple = (), factory=None):
    if role not in ROLES:
        raise ValueError(f"unknown config field role {role!r}; roles: {ROLES}")
    metadata = {"role": role, "omit": omit}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class AttributionConfig:
    """How to featurize training data and score queries.

    Args:
        method: `"trak"` (output = training loss) or `"d-trak"` (output = squared norm of the denoiser output);
            `"journey-trak"` (TRAK features, plus per-sampling-step queries: `pipe.attribute_trajectory`);
            `"tracin"` / `"retrac"` (Diffusion-TracIn / -ReTrac, methods/tracin.py); the similarity baselines
            `"pixel-dot"`, `"pixel-cosine"`, `"embedding-cosine"` (methods/similarity.py); influence with pair-level
            curvature `"fisher"` (the projected Fisher, methods/fisher.py), `"ekfac"` / `"ekfac-empirical"`
            (methods/ekfac.py); `"das"` (methods/das.py), the default since the validation-only choice of issue 14
            (docs/benchmarks.md, "The default method"). docs/methods.md.
        output: the per-sample output f(z, t, ε; θ) that is differentiated; defaults to the method's own
            (`loss` for TRAK, `squared-norm` for D-TRAK). Any of D-TRAK's variants: `loss`, `squared-norm`,
            `mean`, `l1-norm`, `l2-norm`, `linf-norm`, `weighted-mse`.
        num_timesteps: K, the number of timesteps the gradient is averaged over: g(z) = (1/K) Σ_t ∇θ f(z, t, ε_t).
        timestep_schedule: `"uniform"`: t ∈ {0, T/K, 2T/K, ...} for every example (D-TRAK);
            `"random"`: K timesteps drawn per example from (seed, example id) (Journey-TRAK's featurization).
        noise_seed: seed of the noise ε_t and of random timesteps.
        noise_draws: D, noise draws per timestep (None = 1): g(z) = (1/(K·D)) Σ_t Σ_d ∇θ f(z, t, ε_{t,d}), ε_{t,d}
            a function of (noise_seed, [example,] t, d) whose draw 0 is the single-draw noise, so `noise_draws=1`
            gives the same features (and feature hash) as None. Costs D times the forward/backward rows of K.
            TracIn/ReTrac: draws per training timestep (queries use `query_noise_draws`); not for the baselines.
        noise_mode: `"shared"`: ε depends on (noise_seed, t) only, so every example and every query sees the same
            noise at a given t (D-TRAK's code); `"per-example"`: ε depends on (noise_seed, example id, t).
        projector: `"factored"` (per-layer P_outᵀ G P_in, the fast default), dense `"gaussian"` /
            `"rademacher"` (generated blockwise), or `"identity"` (exact, small models only).
        projection_dim: k, the total feature dimension (ignored by `identity`).
        projection_seed: seed of the random projection; a projection is a pure function of
            (projection_seed, parameter name, shape, k).
        layer_dims: `factored` only: features per parameter, by glob pattern on parameter names (first match
            wins): an int k_p, or `[k_out, k_in]` for a Linear/Conv2d weight (k_p = k_out·k_in). Parameters not
            matched share the rest of `projection_dim` (k_p ∝ sqrt(numel)); the total is always `projection_dim`.
            None: the default split for all (docs/projection.md). Only with `calibration_examples=0`.
        calibration_examples: `factored`, kernel methods: n training examples (a seeded subset) on which the
            per-layer eigenbases of the gradient's second moments are measured (calibration.py); the features
            are then the top `sketch_dim` coordinates in those bases mixed into `projection_dim` by a seeded
            Gaussian. None = 64 for TRAK/D-TRAK/Journey-TRAK with `factored` (0 with `layer_dims`), else 0; 0 = the random
            per-layer projection (a pure function of seeds; TracIn/ReTrac always use it).
        sketch_dim: calibrated `factored` only: how many eigen-coordinates are ranked in (None = 2 × projection_dim).
        damping: λ of the kernel (ΦᵀΦ + λI)⁻¹. `None` applies the rule λ = damping_ratio · tr(ΦᵀΦ) / rank,
            i.e. a fixed fraction of the kernel's mean non-zero eigenvalue; it never looks at queries.
        damping_ratio: the fraction used by the rule above; None = the method's default (its `Method.defaults`, methods/:
            0.18 for TRAK, 0.0018 for D-TRAK, chosen on validation queries, docs/benchmarks.md; else 0.1).
            Like `damping`, it only changes scores, never features (not part of the feature hash).
        parameters: `"all"` (every trainable parameter of the denoiser), `"lora"` (only LoRA weights of the
            active peft adapter), or a list of glob patterns matched against parameter names.
        adapter_name: which peft adapter to attribute when `parameters="lora"` (default: the active one).
        batch_size: training examples per featurization step.
        timestep_chunk_size: timesteps evaluated together per forward pass (memory knob; None = all K).
        dtype: the dtype of the denoiser's forward pass; features and kernels are always accumulated in float32.
        device: where to featurize (None = the pipeline's device).
        image_column, caption_column: column names of a `datasets.Dataset` (None = detect).
        num_timesteps, timestep_schedule: None = the method's default (its `Method.defaults`, methods/: K = 30 for D-TRAK;
            else 10, `"uniform"`);
            for TracIn/ReTrac they define the training gradient (1 random timestep per example by default).
        checkpoints: TracIn/ReTrac: the denoiser checkpoints c (paths, or dicts `{"path", "revision",
            "subfolder"}`; checkpoints.py). None = the pipeline's current weights only.
        learning_rates: TracIn/ReTrac: η_c per checkpoint in τ = Σ_c η_c ⟨g_c(z), g_c(q)⟩ (None = all 1). Kept in
            the store's config (a query with other rates is refused, not silently rescored); to rescore a
            store with other rates: `methods.tracin.TracInScorer(store.features, rates, C)`.
        query_timesteps: TracIn/ReTrac: the query gradient is averaged over this many evenly spaced timesteps.
        query_noise_draws: TracIn/ReTrac: noises per query timestep; Journey-TRAK: fresh noises per sampling step.
        encoder: `"embedding-cosine"`: a transformers image encoder (a path or Hub id; CLIP or DINOv2).
        adapter_options: options of the pipeline family that change features, e.g. `{"max_sequence_length": 256}`
            (Flux, SD3, PixArt) or `{"guidance_scale": 3.5}` (Flux-dev); a key the family does not take is an error
            (docs/families.md).
    """

    method: str = _field("feature", "das")
    output: str | None = _field("feature")
    num_timesteps: int | None = _field("feature")
    timestep_schedule: str | None = _field("feature")
    noise_seed: int = _field("feature", 0)
    noise_draws: int | None = _field("feature", omit=(None, 1))
    noise_mode: str = _field("feature", "shared")
    projector: str = _field("projection", "factored")
    projection_dim: int = _field("projection", 2048)
    projection_seed: int = _field("projection", 0)
    layer_dims: dict[str, int | list[int]] | None = _field("projection", omit=(None,))
    calibration_examples: int | None = _field("projection")
    sketch_dim: int | None = _field("projection")
    damping: float | None = _field("score")
    damping_ratio: float | None = _field("score")
    parameters: str | list[str] = _field("feature", "all")
    adapter_name: str | None = _field("feature")
    batch_size: int = _field("execution", 16)
    timestep_chunk_size: int | None = _field("execution")
    dtype: str = _field("feature", "float32")
    device: str | None = _field("execution")
    image_column: str | None = _field("data")
    caption_column: str | None = _field("data")
    checkpoints: list[str | dict[str, Any]] | None = _field("feature", omit=(None,))
    # η_c only weighs scores, but a TracIn store pins them: a query with other rates is refused, not rescored.
    learning_rates: list[float] | None = _field("feature", omit=(None,))
    query_timesteps: int | None = _field("feature", omit=(None,))
    query_noise_draws: int | None = _field("feature", omit=(None,))
    encoder: str | None = _field("feature", omit=(None,))
    adapter_options: dict[str, Any] = _field("feature", factory=dict)

    def __post_init__(self):
        method = get_method(self.method)
        self.method = method.name
        if self.output is None:
            self.output = method.default_output
        for name, value in method.resolved_defaults().items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name, cap in CAPS.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value > cap):
                raise ValueError(f"AttributionConfig.{name} must be an integer <= {cap}, got {value!r}")
        _check_method_fields(self, method)
        _check_choice("output", self.output, OUTPUTS)
        _check_choice("timestep_schedule", self.timestep_schedule, TIMESTEP_SCHEDULES)
        _check_choice("noise_mode", self.noise_mode, NOISE_MODES)
        _check_choice("projector", self.projector, projector_names())
        _check_choice("dtype", self.dtype, DTYPES)
        if isinstance(self.parameters, str):
            _check_choice("parameters", self.parameters, PARAMETER_SETS)
        else:
            self.parameters = list(self.parameters)
        for name in ("num_timesteps", "projection_dim", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AttributionConfig.{name} must be >= 1, got {getattr(self, name)}")
        _resolve_calibration(self, method)
        if self.layer_dims is not None:
            self.layer_dims = _check_layer_dims(self.layer_dims, self.projector)
            if self.calibration_examples:
                raise ValueError("AttributionConfig.layer_dims sets the random factored split; calibrated bases choose "
                                 "their own dims: set calibration_examples=0 to use layer_dims")
        for name in ("damping", "damping_ratio"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"AttributionConfig.{name} must be a finite number > 0, got {value!r}")
        method.check_config(self)

    @classmethod
    def fields_with_role(cls, *roles: str) -> tuple[str, ...]:
        """The names of the fields whose role is one of `roles` (module docstring)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["role"] in roles)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AttributionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown AttributionConfig fields: {unknown}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "AttributionConfig":
        return cls.from_dict(json.loads(text))

    def feature_dict(self) -> dict[str, Any]:
        """The fields that determine feature values: the hashed roles, without fields at an `omit` value."""
        data = self.to_dict()
        return {f.name: data[f.name] for f in dataclasses.fields(self)
                if f.metadata["role"] in HASHED_ROLES and not _omitted(data[f.name], f.metadata["omit"])}

    def feature_hash(self) -> str:
        """A stable hash of the fields that determine feature values."""
        blob = json.dumps(self.feature_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _omitted(value: Any, omit: tuple) -> bool:
    return any(value is o if o is None else value == o for o in omit)


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"AttributionConfig.{name}={value!r} is not one of {list(choices)}")


def _check_method_fields(config: "AttributionConfig", method) -> None:
    """The fields only some methods read (`METHOD_FIELDS`): set for another method, they are an error, not a
    silent no-op."""
    for name in METHOD_FIELDS:
        if getattr(config, name) is not None and name not in method.reads:
            raise ValueError(f"AttributionConfig.{name} does not apply to method={config.method!r}")
    for name in ("query_timesteps", "query_noise_draws", "noise_draws"):
        if getattr(config, name) is not None and int(getattr(config, name)) < 1:
            raise ValueError(f"AttributionConfig.{name} must be >= 1, got {getattr(config, name)}")
    if config.checkpoints is not None:
        config.checkpoints = [os.fspath(c) if isinstance(c, os.PathLike) else c for c in config.checkpoints]
        if not config.checkpoints or not all(isinstance(c, (str, dict)) for c in config.checkpoints):
            raise ValueError("AttributionConfig.checkpoints must be a non-empty list of paths or dicts "
                             "(pass in-memory state dicts to tracin_scores)")
    if config.learning_rates is not None:
        config.learning_rates = [float(lr) for lr in config.learning_rates]
        expected = len(config.checkpoints) if config.checkpoints is not None else 1
        if len(config.learning_rates) != expected:
            raise ValueError(f"AttributionConfig.learning_rates has {len(config.learning_rates)} values for "
                             f"{expected} checkpoint(s)")


def _resolve_calibration(config: "AttributionConfig", method) -> None:
    """calibration_examples: 64 for the methods whose features may be calibrated (`Method.calibrated`) with the
    factored projector (0 with `layer_dims`, which sets the random split), else 0; sketch_dim: 2k."""
    calibrated_kind = config.projector == "factored" and method.calibrated
    if config.calibration_examples is None:
        config.calibration_examples = 64 if calibrated_kind and config.layer_dims is None else 0
    if config.calibration_examples < 0:
        raise ValueError(f"AttributionConfig.calibration_examples must be >= 0, got {config.calibration_examples}")
    if config.calibration_examples and not calibrated_kind:
        raise ValueError("AttributionConfig.calibration_examples applies to projector='factored' with the methods "
                         "that calibrate it (trak, d-trak, journey-trak), not projector="
                         f"{config.projector!r}, method={config.method!r}")
    if config.sketch_dim is None and config.calibration_examples:
        config.sketch_dim = 2 * config.projection_dim
    if config.sketch_dim is not None and (not config.calibration_examples or config.sketch_dim < config.projection_dim):
        raise ValueError(f"AttributionConfig.sketch_dim={config.sketch_dim} needs calibration_examples > 0 and "
                         f"sketch_dim >= projection_dim ({config.projection_dim})")


def _check_layer_dims(layer_dims: dict, projector: str) -> dict[str, int | list[int]]:
    if projector != "factored":
        raise ValueError(f"AttributionConfig.layer_dims only applies to projector='factored', not {projector!r}")
    checked: dict[str, int | list[int]] = {}
    for pattern, value in dict(layer_dims).items():
        dims = [value] if isinstance(value, int) else list(value)
        if not 1 <= len(dims) <= 2 or not all(isinstance(d, int) and d >= 1 for d in dims):
            raise ValueError(f"AttributionConfig.layer_dims[{pattern!r}]={value!r}: use an int >= 1 or [k_out, k_in]")
        checked[str(pattern)] = dims[0] if len(dims) == 1 else dims
    return checked
