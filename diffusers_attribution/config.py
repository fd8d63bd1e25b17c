"""`AttributionConfig`: every choice that changes a feature or a score, serialized to JSON with a stable hash.

Each field declares its role (`field(metadata={"role": ...})`), and the feature hash derives from the roles:

    feature      changes feature values                            hashed
    projection   changes the projection (and so the features)      hashed
    score        changes only scores (damping)                     not hashed
    execution    changes only where and how fast                    not hashed
    query        changes only the query features (and so scores)   not hashed; a query config's value overrides
                                                                   the store's at attribute time (api.py)
    data         names dataset columns                             not hashed (the example hashes pin the data)

A hashed field with `omit` in its metadata is left out of the hash while its value is one of `omit` (a later
field whose unset value gives the old features, so that earlier hashes stay valid). Method names, their
defaults and the fields each reads come from the method registry (methods/base.py), projector names from
the projector registry (projection/registry.py). Every field has a one-line `help`, and
cli/options.py makes a flag of each (its type from the annotation, `choices` where the field declares them).
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

from .methods.registry import PerPair, default_method, get_method
from .projection.registry import projector_names

OUTPUTS = ("loss", "squared-norm", "mean", "l1-norm", "l2-norm", "linf-norm", "weighted-mse")
TIMESTEP_SCHEDULES = ("uniform", "random")
NOISE_MODES = ("shared", "per-example")
QUERY_NOISE = ("shared-then-fresh", "fresh", "fresh-noise")
PARAMETER_SETS = ("all", "lora")
DTYPES = ("float32", "float16", "bfloat16")
ROLES = ("feature", "projection", "score", "execution", "data", "query")
HASHED_ROLES = ("feature", "projection")
# Upper bounds of the count fields, checked before anything is allocated from them (a store's config.json, --config
# and the CLI flags come from outside): far above any real run, far below an allocation that cannot succeed.
CAPS = {"num_timesteps": 10_000, "noise_draws": 10_000, "query_timesteps": 10_000, "query_noise_draws": 10_000,
        "query_samples": 10_000,
        "projection_dim": 1 << 20, "sketch_dim": 1 << 21, "calibration_examples": 1 << 20, "batch_size": 1 << 16,
        "timestep_chunk_size": 1 << 16}


def _field(role: str, default: Any = None, *, omit: tuple = (), factory=None, help: str, choices: tuple | None = None,
           method_specific: bool = False, metavar: str | None = None, flag: str | None = None, cli: bool = True,
           legacy: Any = None):
    """A config field. role: the module docstring; help: one line (the CLI flag's help); choices: the values it
    takes; method_specific: only some methods read it (`METHOD_FIELDS`, `Method.reads`); metavar, flag: the CLI
    flag's (flag defaults to --kebab-name); cli=False: no flag (cli/options.py makes one for every other field);
    legacy: what a store written before the field existed meant by leaving it out, where a method's default for it
    is now another value (store/schema.py)."""
    if role not in ROLES:
        raise ValueError(f"unknown config field role {role!r}; roles: {ROLES}")
    metadata = {"role": role, "omit": omit, "help": help, "choices": choices, "method_specific": method_specific,
                "metavar": metavar, "flag": flag, "cli": cli, "legacy": legacy}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class AttributionConfig:
    """How to featurize training data and score queries.

    Each field says what it is in one line (its `help`, which the CLI flag shows); what needs more:

    Args:
        method: None = the default for the setting, chosen on validation queries (docs/benchmarks.md):
            `"das-fisher"` (DAS's score with the pair-level curvature; issue 24's choice on the digits benchmark)
            and, with `parameters="lora"`, `"ekfac"` (issue 24's choice on the LoRA benchmark, where the kernel
            methods need 4–7 decades more damping); `"das"`, `"trak"`
            (output = training loss), `"d-trak"` (output = squared norm of the denoiser output), `"journey-trak"`
            (TRAK features, plus per-sampling-step queries: `pipe.attribute_trajectory`), `"tracin"` / `"retrac"`
            (methods/tracin.py), the similarity baselines `"pixel-dot"`, `"pixel-cosine"`, `"embedding-cosine"`
            (methods/similarity.py), influence with pair-level curvature `"fisher"` (methods/fisher.py),
            `"ekfac"` / `"ekfac-empirical"` (methods/ekfac.py). docs/methods.md.
        output: any of D-TRAK's variants (`OUTPUTS`); None = the method's own (`loss` for TRAK, `squared-norm`
            for D-TRAK).
        num_timesteps: K in g(z) = (1/K) Σ_t ∇θ f(z, t, ε_t); None = the method's default (`Method.defaults`:
            K = 30 for D-TRAK, else 10). For TracIn/ReTrac it defines the training gradient (1 random timestep
            per example by default).
        timestep_schedule: `"uniform"`: t ∈ {0, T/K, 2T/K, ...} for every example (D-TRAK); `"random"`: K
            timesteps drawn per example from (seed, example id) (Journey-TRAK's featurization).
        timestep_fraction: f ∈ (0, 1]: the timesteps lie in [0, ⌊f·T⌋) (the grid t_k = k·⌊f·T/K⌋, the random
            draws, and fresh query samples); None = the method's default (DAS-Fisher on every parameter: 0.3,
            chosen on the digits benchmark's validation queries; else every timestep: on the LoRA benchmark low
            timesteps lowered DAS-Fisher slightly and EK-FAC and TRAK much, docs/benchmarks.md). TracIn's query grid
            (`query_timesteps`) and Journey-TRAK's sampling steps keep every timestep.
        noise_draws: D in g(z) = (1/(K·D)) Σ_t Σ_d ∇θ f(z, t, ε_{t,d}), ε_{t,d} a function of (noise_seed,
            [example,] t, d) whose draw 0 is the single-draw noise, so `noise_draws=1` gives the same features (and
            feature hash) as None. Costs D times the forward/backward rows of K. TracIn/ReTrac: draws per training
            timestep (queries use `query_noise_draws`); not for the baselines.
        noise_mode: `"shared"`: every example and every query sees the same noise at a given t. This library's own
            choice, not D-TRAK's or DAS's code: theirs reseeds before each batch, so each batch slot has its own
            noise and a query shares its noise with every B-th training image (81 % of D-TRAK's top-10 on the digits
            benchmark were such images). One noise per timestep for everyone gave 1.5–2× their LDS there (D-TRAK
            .180 / .430 generated / real against their code's .121 / .218; DAS .233 / .516 against .201 / .399;
            `"per-example"` noise .078 / .163 and .145 / .298): docs/methods.md, "Noise, and query samples".
        projector: `"factored"` (per-layer P_outᵀ G P_in, the fast default), dense `"gaussian"` / `"rademacher"`
            (generated blockwise), or `"identity"` (exact, small models only).
        projection_seed: a projection is a pure function of (projection_seed, parameter name, shape, k).
        layer_dims: `factored` only: features per parameter, by glob pattern on parameter names (first match
            wins): an int k_p, or `[k_out, k_in]` for a Linear/Conv2d weight (k_p = k_out·k_in). Parameters not
            matched share the rest of `projection_dim` (k_p ∝ sqrt(numel)); the total is always `projection_dim`.
            None: the default split for all (docs/projection.md). Only with `calibration_examples=0`.
        calibration_examples: `factored`, kernel methods: n training examples (a seeded subset) on which the
            per-layer eigenbases of the gradient's second moments are measured (projection/calibrated.py); the
            features are then the top `sketch_dim` coordinates in those bases mixed into `projection_dim` by a
            seeded signed partition. None = 64 for the methods that calibrate (`Method.calibrated`) with
            `factored` (0 with `layer_dims`), else 0; 0 = the random per-layer projection (a pure function of
            seeds; TracIn/ReTrac always use it).
        damping: λ of the kernel (ΦᵀΦ + λI)⁻¹. `None` applies the rule λ = damping_ratio · tr(ΦᵀΦ) / rank,
            i.e. a fixed fraction of the kernel's mean non-zero eigenvalue; it never looks at queries.
        damping_ratio: None = the method's default (`Method.defaults`: 0.18 for TRAK, 0.0018 for D-TRAK, chosen on
            validation queries, docs/benchmarks.md; else 0.1; with `parameters="lora"`, `Method.lora_defaults`, chosen
            on the LoRA benchmark's). Like `damping`, it only changes scores.
        parameters: `"all"` (every trainable parameter of the denoiser), `"lora"` (only LoRA weights of the
            active peft adapter), or a list of glob patterns matched against parameter names.
        dtype: features and kernels are always accumulated in float32.
        checkpoints: paths, or dicts `{"path", "revision", "subfolder"}` (checkpoints.py).
        learning_rates: η_c in τ = Σ_c η_c ⟨g_c(z), g_c(q)⟩. Kept in the store's config (a query with other rates
            is refused, not silently rescored); to rescore a store with other rates, featurize it with another
            `learning_rates` config (its features are the same).
        query_samples: S, the (t, ε) samples each query's measurement gradient is averaged over (every gradient
            method but TracIn / ReTrac, whose queries take `query_timesteps` × `query_noise_draws`); None = the
            training set's K·D pairs with the query's position as its id (the query features of earlier versions),
            unless the method's default is another (`ekfac`: 3·K·D, shared-then-fresh, unless `parameters="lora"`;
            docs/benchmarks.md); 0 = the training set's pairs whatever the method's default (what a store written
            before its method had a default of query samples records).
            Set, query q's sample s is a pure function of (noise_seed, q's content hash, s) (gradients/queries.py):
            the same query gives the same features in any batch, order or process. A query-side setting: it
            leaves the store's feature hash alone, and a query config's value overrides the store's.
        query_noise: `"shared-then-fresh"` (the default when `query_samples` is set): samples 0..K·D-1 are exactly
            the training features' (t_k, ε_k) (shared noise: the coupling that helps, docs/methods.md), the rest
            fresh; `"fresh"`: every sample fresh. Fresh: ε from (noise_seed, query, s), t from a golden-ratio
            sequence with a per-query offset (every prefix covers [0, T) evenly; sample s never depends on S).
            `"fresh-noise"`: the training pairs' timesteps, cycled, each with fresh noise.
        encoder: a CLIP or DINOv2 image model.
        adapter_options: e.g. `{"max_sequence_length": 256}` (Flux, SD3, PixArt) or `{"guidance_scale": 3.5}`
            (Flux-dev); a key the family does not take is an error (docs/families.md).
    """

    method: str | None = _field("feature", help="attribution method (docs/methods.md), e.g. das-fisher, das, trak, "
                                                "d-trak, tracin (default: das-fisher; ekfac with --parameters lora)")
    output: str | None = _field("feature", choices=OUTPUTS,
                                help="the per-sample output f that is differentiated (default: the method's own)")
    num_timesteps: int | None = _field("feature", metavar="K",
                                       help="K, timesteps each gradient is averaged over (default: the method's)")
    timestep_schedule: str | None = _field("feature", choices=TIMESTEP_SCHEDULES,
                                           help="the same K timesteps for every example, or K drawn per example "
                                                "(default: the method's)")
    timestep_fraction: float | None = _field("feature", omit=(None, 1.0), metavar="f", legacy=1.0,
                                             help="the timesteps lie in the lowest f of the T training timesteps "
                                                  "(default: the method's: 0.3 for das-fisher, else 1)")
    noise_seed: int = _field("feature", 0, help="seed of the noise ε_t and of random timesteps")
    noise_draws: int | None = _field("feature", omit=(None, 1), method_specific=True, metavar="D",
                                     help="D, noise draws per timestep (default: 1)")
    noise_mode: str = _field("feature", "shared", choices=NOISE_MODES,
                             help="whether ε depends on (seed, t) only, or on the example id too")
    projector: str = _field("projection", "factored",
                            help="gradient projection (docs/projection.md), e.g. factored, gaussian, identity")
    projection_dim: int = _field("projection", 2048, metavar="k",
                                 help="k, the total feature dimension (ignored by identity)")
    projection_seed: int = _field("projection", 0, help="seed of the random projection")
    layer_dims: dict[str, int | list[int]] | None = _field(
        "projection", omit=(None,), metavar="PATTERN=JSON",
        help="factored, uncalibrated: features of the parameters a glob pattern matches, k_p or [k_out, k_in] "
             "(repeatable)")
    calibration_examples: int | None = _field(
        "projection", metavar="N",
        help="examples the factored bases are calibrated on (0: random; default: 64 for the methods that calibrate)")
    sketch_dim: int | None = _field("projection", help="calibrated factored: eigen-coordinates ranked "
                                                       "(default: 2 × projection_dim)")
    damping: float | None = _field("score", metavar="λ", help="kernel damping λ (default: the ratio rule)")
    damping_ratio: float | None = _field("score", help="λ = ratio · tr(ΦᵀΦ) / rank when damping is not given "
                                                       "(default: the method's)")
    parameters: str | list[str] = _field("feature", "all", metavar="P",
                                         help="all, lora, or glob patterns of denoiser parameter names")
    adapter_name: str | None = _field("feature", help="the peft adapter attributed with parameters lora (default: the "
                                                      "active one; the CLI's --lora loads under this name)")
    batch_size: int = _field("execution", 16, help="training examples per featurization step")
    timestep_chunk_size: int | None = _field("execution", help="timesteps per forward pass, a memory knob "
                                                               "(default: all K)")
    dtype: str = _field("feature", "float32", choices=DTYPES, help="dtype of the denoiser's forward pass")
    feature_dtype: str = _field("feature", "float32", omit=("float32",), choices=DTYPES,
                                help="dtype of the stored features (float16 / bfloat16: half the size and read time; "
                                     "kernels and curvature stay float64)")
    device: str | None = _field("execution", help="where to featurize, e.g. cpu, cuda, cuda:1 "
                                                  "(default: the pipeline's)")
    image_column: str | None = _field("data", help="image column of a datasets.Dataset (default: detected)")
    caption_column: str | None = _field("data", help="caption column of a datasets.Dataset (default: detected)")
    checkpoints: list[str | dict[str, Any]] | None = _field(
        "feature", omit=(None,), method_specific=True, metavar="PATH",
        help="tracin/retrac: denoiser checkpoints (default: the pipeline's current weights)")
    # η_c only weighs scores, but a TracIn store pins them: a query with other rates is refused, not rescored.
    learning_rates: list[float] | None = _field("feature", omit=(None,), method_specific=True, metavar="η",
                                                help="tracin/retrac: η_c, one per checkpoint (default: all 1)")
    # query-side (not hashed): a query config may set them against any store; stores hashed them before session 9
    query_timesteps: int | None = _field("query", omit=(None,), method_specific=True,
                                         help="tracin/retrac: evenly spaced timesteps of each query gradient")
    query_noise_draws: int | None = _field("query", omit=(None,), method_specific=True,
                                           help="tracin/retrac: noises per query timestep; journey-trak: fresh "
                                                "noises per sampling step")
    query_samples: int | None = _field("query", omit=(None,), method_specific=True, metavar="S", legacy=0,
                                       help="S, (t, ε) samples per query gradient (default: the method's: 3·K·D for "
                                            "ekfac on every parameter, else the training set's K·D; 0: those K·D)")
    query_noise: str | None = _field("query", omit=(None,), choices=QUERY_NOISE, method_specific=True,
                                     help="query samples: the training set's K·D pairs first, then fresh; or all fresh "
                                          "(default: shared-then-fresh)")
    encoder: str | None = _field("feature", omit=(None,), method_specific=True,
                                 help="embedding-cosine: a transformers image encoder (path or Hub id)")
    adapter_options: dict[str, Any] = _field("feature", factory=dict, metavar="KEY=JSON", flag="--adapter-option",
                                             help="an option of the pipeline family that changes features, e.g. "
                                                  "max_sequence_length=256 (repeatable)")

    def __post_init__(self):
        if self.method is None:  # the method declaring itself the default for this setting (methods/)
            self.method = default_method(self.parameters)
        method = get_method(self.method)
        self.method = method.name
        if self.output is None:
            self.output = method.default_output
        per_pair = {}
        for name, value in method.resolved_defaults(self.parameters).items():
            if getattr(self, name) is None:
                if isinstance(value, PerPair):
                    per_pair[name] = value  # counted in training pairs: resolved once K and D are
                else:
                    setattr(self, name, value)
        for name, value in per_pair.items():
            setattr(self, name, value.of(self.num_timesteps, self.noise_draws))
        for name, cap in CAPS.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value > cap):
                raise ValueError(f"AttributionConfig.{name} must be an integer <= {cap}, got {value!r}")
        _check_method_fields(self, method)
        for f in dataclasses.fields(self):
            if f.metadata["choices"] is not None and not (f.metadata["method_specific"] and getattr(self, f.name) is None):
                _check_choice(f.name, getattr(self, f.name), f.metadata["choices"])
        names = projector_names()
        _check_choice("projector", self.projector, names if self.projector in names else projector_names(refresh=True))
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
        fraction = self.timestep_fraction
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
                raise ValueError(f"AttributionConfig.timestep_fraction must be a number in (0, 1], got {fraction!r}")
            self.timestep_fraction = float(fraction)
        method.check_config(self)

    @classmethod
    def fields_with_role(cls, *roles: str) -> tuple[str, ...]:
        """The names of the fields whose role is one of `roles` (module docstring)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata["role"] in roles)

    def with_query_fields(self, query: "AttributionConfig | None") -> "AttributionConfig":
        """This (a store's) config with the query-role fields of `query` (`query_samples`, `query_noise`): they
        change only query features, so a query config may set them against any store. None: this config."""
        if query is None:
            return self
        fields = {name: getattr(query, name) for name in self.fields_with_role("query")}
        if all(getattr(self, name) == value for name, value in fields.items()):
            return self
        return dataclasses.replace(self, **fields)

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

    def feature_dict(self, *, method_fields: bool = True) -> dict[str, Any]:
        """The fields that determine feature values: the hashed roles and the fields of other roles the method's
        features depend on (`Method.feature_fields`: EK-FAC whitens its features at the store's λ), without fields
        at an `omit` value. `method_fields=False`: the hashed roles only (what stores written before issue 24 recorded)."""
        data = self.to_dict()
        extra = get_method(self.method).feature_fields if method_fields else ()
        return {f.name: data[f.name] for f in dataclasses.fields(self)
                if (f.metadata["role"] in HASHED_ROLES or f.name in extra)
                and not _omitted(data[f.name], f.metadata["omit"])}

    def feature_hash(self) -> str:
        """A stable hash of the fields that determine feature values."""
        blob = json.dumps(self.feature_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# The fields only some methods read; a method lists those it reads in `Method.reads`, and any other set to a value
# is an error (not a silent no-op).
METHOD_FIELDS = tuple(f.name for f in dataclasses.fields(AttributionConfig) if f.metadata["method_specific"])


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
    for name in ("query_timesteps", "query_noise_draws", "noise_draws", "query_samples"):
        least = 0 if name == "query_samples" else 1  # query_samples=0: the training pairs (no samples of its own)
        if getattr(config, name) is not None and int(getattr(config, name)) < least:
            raise ValueError(f"AttributionConfig.{name} must be >= {least}, got {getattr(config, name)}")
    if config.query_samples == 0 and config.query_noise is not None:
        raise ValueError(f"AttributionConfig.query_samples=0 (the training set's pairs) takes no query_noise, got "
                         f"{config.query_noise!r}")
    pairs = config.num_timesteps * int(config.noise_draws or 1)
    if config.query_samples and config.query_noise in (None, "shared-then-fresh") and config.query_samples < pairs:
        raise ValueError(f"AttributionConfig.query_samples={config.query_samples} is below the training set's "
                         f"K·D = {pairs} (time, noise) pairs, which query_noise='shared-then-fresh' uses first: ask "
                         f"for at least {pairs}, or query_noise='fresh'")
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
