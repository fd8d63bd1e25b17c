"""`AttributionConfig`: every choice that changes a feature or a score, serialized to JSON with a stable hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

METHODS = (
    "trak", "d-trak", "journey-trak",  # kernel scores φ(q)(ΦᵀΦ + λI)⁻¹Φᵀ (scoring.py, methods/journey.py)
    "tracin", "retrac",  # Σ_c η_c ⟨g_c(z), g_c(q)⟩, ReTrac with normalized gradients (methods/tracin.py)
    "pixel-dot", "pixel-cosine", "embedding-cosine",  # similarity baselines (methods/similarity.py)
)
OUTPUTS = ("loss", "squared-norm", "mean", "l1-norm", "l2-norm", "linf-norm", "weighted-mse")
TIMESTEP_SCHEDULES = ("uniform", "random")
NOISE_MODES = ("shared", "per-example")
PROJECTORS = ("factored", "gaussian", "rademacher", "identity")
PARAMETER_SETS = ("all", "lora")
DTYPES = ("float32", "float16", "bfloat16")

# The output each method differentiates when `output` is left unset (METHODS.md).
DEFAULT_OUTPUT = {"trak": "loss", "d-trak": "squared-norm", "journey-trak": "loss", "tracin": "loss", "retrac": "loss",
                  "pixel-dot": "loss", "pixel-cosine": "loss", "embedding-cosine": "loss"}  # unused by the baselines
# Per-method defaults of the fields left as None (METHODS.md): TracIn/ReTrac take each training gradient at one
# random timestep and average the query gradient over 100 evenly spaced timesteps × 16 noises; Journey-TRAK
# featurizes with 20 random timesteps per example and averages each sampling step over 4 fresh noises.
# damping_ratio (TRAK, D-TRAK): the ratio with the best mean LDS on the validation queries of the digits
# benchmark, never on the evaluation queries; D-TRAK's K = 30: more timesteps beat K = 10 there by more than the
# noise-seed spread, while more noise draws or ensembles did not (docs/benchmarks.md, "Choosing the defaults").
METHOD_DEFAULTS = {
    "trak": {"damping_ratio": 0.18},
    "d-trak": {"damping_ratio": 0.0018, "num_timesteps": 30},
    "tracin": {"num_timesteps": 1, "timestep_schedule": "random", "query_timesteps": 100, "query_noise_draws": 16},
    "retrac": {"num_timesteps": 1, "timestep_schedule": "random", "query_timesteps": 100, "query_noise_draws": 16},
    "journey-trak": {"num_timesteps": 20, "timestep_schedule": "random", "query_noise_draws": 4},
}
_BASE_DEFAULTS = {"num_timesteps": 10, "timestep_schedule": "uniform", "damping_ratio": 0.1}

# Fields that only change how fast or where features are computed, never their values:
# they are left out of the hash, so a store featurized on a GPU with batch 64 matches a CPU query.
_EXECUTION_FIELDS = ("batch_size", "device", "timestep_chunk_size", "damping", "damping_ratio")
# Later fields, left out of the hash while unset so that earlier hashes stay valid.
_OPTIONAL_FIELDS = ("layer_dims", "checkpoints", "learning_rates", "query_timesteps", "query_noise_draws", "encoder",
                    "noise_draws")
# Optional fields whose explicit value equals the unset behaviour: left out of the hash too (same features).
_OPTIONAL_NEUTRAL = {"noise_draws": 1}


@dataclass
class AttributionConfig:
    """How to featurize training data and score queries.

    Args:
        method: `"trak"` (output = training loss) or `"d-trak"` (output = squared norm of the denoiser output);
            `"journey-trak"` (TRAK features, plus per-sampling-step queries: `pipe.attribute_trajectory`);
            `"tracin"` / `"retrac"` (Diffusion-TracIn / -ReTrac, methods/tracin.py); the similarity baselines
            `"pixel-dot"`, `"pixel-cosine"`, `"embedding-cosine"` (methods/similarity.py). docs/methods.md.
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
        damping_ratio: the fraction used by the rule above; None = the method's default (`METHOD_DEFAULTS`:
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
        num_timesteps, timestep_schedule: None = the method's default (`METHOD_DEFAULTS`: K = 30 for D-TRAK;
            else 10, `"uniform"`);
            for TracIn/ReTrac they define the training gradient (1 random timestep per example by default).
        checkpoints: TracIn/ReTrac: the denoiser checkpoints c (paths, or dicts `{"path", "revision",
            "subfolder"}`; methods/checkpoints.py). None = the pipeline's current weights only.
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

    method: str = "d-trak"
    output: str | None = None
    num_timesteps: int | None = None
    timestep_schedule: str | None = None
    noise_seed: int = 0
    noise_draws: int | None = None
    noise_mode: str = "shared"
    projector: str = "factored"
    projection_dim: int = 2048
    projection_seed: int = 0
    layer_dims: dict[str, int | list[int]] | None = None
    calibration_examples: int | None = None
    sketch_dim: int | None = None
    damping: float | None = None
    damping_ratio: float | None = None
    parameters: str | list[str] = "all"
    adapter_name: str | None = None
    batch_size: int = 16
    timestep_chunk_size: int | None = None
    dtype: str = "float32"
    device: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    checkpoints: list[str | dict[str, Any]] | None = None
    learning_rates: list[float] | None = None
    query_timesteps: int | None = None
    query_noise_draws: int | None = None
    encoder: str | None = None
    adapter_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.method = self.method.lower()
        _check_choice("method", self.method, METHODS)
        if self.output is None:
            self.output = DEFAULT_OUTPUT[self.method]
        for name, value in {**_BASE_DEFAULTS, **METHOD_DEFAULTS.get(self.method, {})}.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        _check_method_fields(self)
        _check_choice("output", self.output, OUTPUTS)
        _check_choice("timestep_schedule", self.timestep_schedule, TIMESTEP_SCHEDULES)
        _check_choice("noise_mode", self.noise_mode, NOISE_MODES)
        _check_choice("projector", self.projector, PROJECTORS)
        _check_choice("dtype", self.dtype, DTYPES)
        if isinstance(self.parameters, str):
            _check_choice("parameters", self.parameters, PARAMETER_SETS)
        else:
            self.parameters = list(self.parameters)
        for name in ("num_timesteps", "projection_dim", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AttributionConfig.{name} must be >= 1, got {getattr(self, name)}")
        _resolve_calibration(self)
        if self.layer_dims is not None:
            self.layer_dims = _check_layer_dims(self.layer_dims, self.projector)
            if self.calibration_examples:
                raise ValueError("AttributionConfig.layer_dims sets the random factored split; calibrated bases choose "
                                 "their own dims: set calibration_examples=0 to use layer_dims")
        if self.damping is not None and self.damping < 0:
            raise ValueError(f"AttributionConfig.damping must be >= 0, got {self.damping}")

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
        """The fields that determine feature values (execution-only fields removed)."""
        data = self.to_dict()
        for name in _EXECUTION_FIELDS:
            data.pop(name)
        for name in _OPTIONAL_FIELDS:
            if data[name] is None or name in _OPTIONAL_NEUTRAL and data[name] == _OPTIONAL_NEUTRAL[name]:
                data.pop(name)
        return data

    def feature_hash(self) -> str:
        """A stable hash of the fields that determine feature values."""
        blob = json.dumps(self.feature_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"AttributionConfig.{name}={value!r} is not one of {list(choices)}")


def _check_method_fields(config: "AttributionConfig") -> None:
    """The fields that only some methods read: set for another method, they are an error, not a silent no-op."""
    tracin = config.method in ("tracin", "retrac")
    for name, allowed in {"checkpoints": tracin, "learning_rates": tracin, "query_timesteps": tracin,
                          "query_noise_draws": tracin or config.method == "journey-trak",
                          "encoder": config.method == "embedding-cosine",
                          "noise_draws": config.method not in ("pixel-dot", "pixel-cosine", "embedding-cosine")}.items():
        if getattr(config, name) is not None and not allowed:
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


def _resolve_calibration(config: "AttributionConfig") -> None:
    """calibration_examples: 64 for the kernel methods with the factored projector (0 with `layer_dims`, which
    sets the random split), else 0; sketch_dim: 2k."""
    calibrated_kind = config.projector == "factored" and config.method in ("trak", "d-trak", "journey-trak")
    if config.calibration_examples is None:
        config.calibration_examples = 64 if calibrated_kind and config.layer_dims is None else 0
    if config.calibration_examples < 0:
        raise ValueError(f"AttributionConfig.calibration_examples must be >= 0, got {config.calibration_examples}")
    if config.calibration_examples and not calibrated_kind:
        raise ValueError("AttributionConfig.calibration_examples applies to projector='factored' with the kernel "
                         f"methods (trak, d-trak, journey-trak), not projector={config.projector!r}, "
                         f"method={config.method!r}")
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
