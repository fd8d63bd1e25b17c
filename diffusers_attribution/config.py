"""`AttributionConfig`: every choice that changes a feature or a score, serialized to JSON with a stable hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

METHODS = ("trak", "d-trak")
OUTPUTS = ("loss", "squared-norm", "mean", "l1-norm", "l2-norm", "linf-norm", "weighted-mse")
TIMESTEP_SCHEDULES = ("uniform", "random")
NOISE_MODES = ("shared", "per-example")
PROJECTORS = ("factored", "gaussian", "rademacher", "identity")
PARAMETER_SETS = ("all", "lora")
DTYPES = ("float32", "float16", "bfloat16")

# The output each method differentiates when `output` is left unset (METHODS.md).
DEFAULT_OUTPUT = {"trak": "loss", "d-trak": "squared-norm"}

# Fields that only change how fast or where features are computed, never their values:
# they are left out of the hash, so a store featurized on a GPU with batch 64 matches a CPU query.
_EXECUTION_FIELDS = ("batch_size", "device", "timestep_chunk_size", "damping", "damping_ratio")


@dataclass
class AttributionConfig:
    """How to featurize training data and score queries.

    Args:
        method: `"trak"` (output = training loss) or `"d-trak"` (output = squared norm of the denoiser output).
        output: the per-sample output f(z, t, ε; θ) that is differentiated; defaults to the method's own
            (`loss` for TRAK, `squared-norm` for D-TRAK). Any of D-TRAK's variants: `loss`, `squared-norm`,
            `mean`, `l1-norm`, `l2-norm`, `linf-norm`, `weighted-mse`.
        num_timesteps: K, the number of timesteps the gradient is averaged over: g(z) = (1/K) Σ_t ∇θ f(z, t, ε_t).
        timestep_schedule: `"uniform"`: t ∈ {0, T/K, 2T/K, ...} for every example (D-TRAK);
            `"random"`: K timesteps drawn per example from (seed, example id) (Journey-TRAK's featurization).
        noise_seed: seed of the noise ε_t and of random timesteps.
        noise_mode: `"shared"`: ε depends on (noise_seed, t) only, so every example and every query sees the same
            noise at a given t (D-TRAK's code); `"per-example"`: ε depends on (noise_seed, example id, t).
        projector: `"factored"` (per-layer P_outᵀ G P_in, the fast default), dense `"gaussian"` /
            `"rademacher"` (generated blockwise), or `"identity"` (exact, small models only).
        projection_dim: k, the total feature dimension (ignored by `identity`).
        projection_seed: seed of the random projection; a projection is a pure function of
            (projection_seed, parameter name, shape, k).
        damping: λ of the kernel (ΦᵀΦ + λI)⁻¹. `None` applies the rule λ = damping_ratio · tr(ΦᵀΦ) / rank,
            i.e. a fixed fraction of the kernel's mean non-zero eigenvalue; it never looks at queries.
        damping_ratio: the fraction used by the rule above.
        parameters: `"all"` (every trainable parameter of the denoiser), `"lora"` (only LoRA weights of the
            active peft adapter), or a list of glob patterns matched against parameter names.
        adapter_name: which peft adapter to attribute when `parameters="lora"` (default: the active one).
        batch_size: training examples per featurization step.
        timestep_chunk_size: timesteps evaluated together per forward pass (memory knob; None = all K).
        dtype: the dtype of the denoiser's forward pass; features and kernels are always accumulated in float32.
        device: where to featurize (None = the pipeline's device).
        image_column, caption_column: column names of a `datasets.Dataset` (None = detect).
    """

    method: str = "d-trak"
    output: str | None = None
    num_timesteps: int = 10
    timestep_schedule: str = "uniform"
    noise_seed: int = 0
    noise_mode: str = "shared"
    projector: str = "gaussian"
    projection_dim: int = 2048
    projection_seed: int = 0
    damping: float | None = None
    damping_ratio: float = 0.1
    parameters: str | list[str] = "all"
    adapter_name: str | None = None
    batch_size: int = 16
    timestep_chunk_size: int | None = None
    dtype: str = "float32"
    device: str | None = None
    image_column: str | None = None
    caption_column: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.method = self.method.lower()
        _check_choice("method", self.method, METHODS)
        if self.output is None:
            self.output = DEFAULT_OUTPUT[self.method]
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
        return data

    def feature_hash(self) -> str:
        """A stable hash of the fields that determine feature values."""
        blob = json.dumps(self.feature_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"AttributionConfig.{name}={value!r} is not one of {list(choices)}")
