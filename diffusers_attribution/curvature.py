"""Pair-level curvature for influence functions (Mlodozeniec et al., ICLR 2025): projected Fisher and EK-FAC.

Influence of training example z on query q, with g = (1/(K·D)) Σ_{t,d} ∇θ f(·, t, ε_{t,d}) the time-averaged
gradient of the measurement (the features of the core task) and G a curvature of the training loss
L(θ) = Σ_i (1/(K·D)) Σ_{t,d} ℓ(z_i, t, ε_{t,d}) over (example, timestep, noise) *pairs*:

    τ(z, q) = g(q)ᵀ (G + λI)⁻¹ g(z)

Projected Fisher (`FisherAccumulator`): the empirical Fisher of L in the projected space,

    F = Σ_i (1/(K·D)) Σ_{t,d} ψ_{i,t,d} ψ_{i,t,d}ᵀ      ψ_{i,t,d} = P ∇θ ℓ(z_i, t, ε_{t,d}),  mean_{t,d} ψ = φ_i
    τ(q) = φ(q) (F + λI)⁻¹ Φᵀ,   λ = ratio · tr(F) / k

accumulated from the per-pair projected gradients while featurizing (one k × k product per batch). Unlike
TRAK's kernel ΦᵀΦ of the time-averaged features it keeps the curvature of every single (t, ε) term.

EK-FAC (`ekfac_calibrate`), per Linear / Conv2d (groups = 1) weight W (d_out × d_in), K-FAC-expand (every
spatial position or token of every pair is one row a (input; conv: the unfolded patch), δ = ∂ℓ/∂y):

    A = E[a aᵀ],  S = E[δ δᵀ],  Q_A, Q_S their eigenvectors
    Λ_ij = E_pairs[(Q_Sᵀ G_pair Q_A)_ij²]                      (eigenvalue correction, G_pair = ∇_W ℓ of one pair)
    (G + λI)⁻¹ g ≈ Q_S [(Q_Sᵀ g Q_A) ⊘ (Λ + λ)] Q_Aᵀ,   λ = ratio · mean(Λ) over every coordinate

A bias of such a layer is rotated by Q_S (its gradient is Σ_pos δ_pos); every other parameter (norm affine
parameters, grouped convs, embeddings) keeps the calibration's starting sides (identity, or MAX_SIDE random
orthonormal directions for wider sides) with its own measured Λ: a diagonal eigenvalue correction. The
curvature is measured, like the calibrated projection (projection/calibrated.py), on `calibration_examples` training
examples × their K·D pairs; `fisher="mc"` replaces ∇ℓ by the gradient of one Monte-Carlo sample of the
model's Gaussian likelihood (the GGN of the MSE, the paper's default), `"empirical"` uses ∇ℓ itself.

The calibrated projector's machinery then does the rest: in the EK-FAC eigenbases the coordinates
H = Q_Sᵀ G Q_A are one factored pass (no per-sample gradient), the top `sketch_dim` coordinates by their
preconditioned energy E_i[H̄_i²] / (Λ + λ_f) are kept, and the seeded mix M (calibrated.py) maps them to k features.
λ_f is the featurization's damping (the config's λ; saved as "feature_damping"). Features (`VERSION` 2):

    training  φ(z) = (H(z) ⊘ sqrt(Λ + λ_f)) M          queries  φ̃(q) = (H(q) ⊙ sqrt(Λ + λ_f) ⊘ (Λ + λ)) M

so that E_M[φ̃(q) · φ(z)] = Σ H(q) H(z) / (Λ + λ), the EK-FAC influence over the kept coordinates, at any λ, exactly
when the mix is one-to-one (k ≥ the kept coordinates). Both sides are whitened before the mix: its collisions
then add noise on the scale of the preconditioned (whitened) coordinates, whereas mixing H raw against
H ⊘ (Λ + λ) (version 1: training H M, queries (H ⊘ (Λ + λ)) M, the stores written before) lets the large raw
coordinates of big-Λ directions collide with the large preconditioned ones of small-Λ directions, which small λ
makes dominant. The bases are saved in the store's projection.safetensors and Λ (with λ_f) in its
method_state.safetensors, so a store from the Hub scores new queries without training data.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import ModelInputs
from .gradients.hooks import attribution_hooks
from .gradients.task import AttributionTask
from .gradients.timesteps import PairParts, PointTask, point_chunks, timestep_features
from .objectives import OBJECTIVES, flat_rows
from .projection.calibrated import (CalibratedProjector, coordinate_blocks, eigenvectors, keep_top, progress_bar,
                                    reduced_sides)
from .projection.factored import FactoredProjector, handled_parameters

VERSION = 2  # 2: both sides whitened by sqrt(Λ + λ_f) before the mix; 1: training features H M (module docstring)
FISHERS = ("mc", "empirical")
EIGENVALUES = "::eigenvalues"  # state-dict suffix of Λ (kept rectangle of each parameter)
MEAN_EIGENVALUE = "mean_eigenvalue"  # mean Λ over every coordinate before truncation (the λ rule's scale)
FEATURE_DAMPING = "feature_damping"  # λ_f of version 2's training features (absent from version 1 states)


# ---------------------------------------------------------------------------------------------- projected Fisher


class FisherAccumulator:
    """F = Σ_i (1/(K·D)) Σ_{t,d} ψ ψᵀ in float64 from chunks of per-pair projected gradients ψ [rows, k].

    Sums of several accumulators (batches, shards, processes) add up: `merge`."""

    def __init__(self, dim: int, pairs_per_example: int):
        self.matrix = torch.zeros(dim, dim, dtype=torch.float64)
        self.pairs_per_example = pairs_per_example
        self.pairs = 0

    def __call__(self, index: torch.Tensor, psi: torch.Tensor) -> None:
        psi = psi.double().cpu()
        self.matrix.addmm_(psi.T, psi, alpha=1.0 / self.pairs_per_example)
        self.pairs += len(psi)

    on_pairs = __call__  # a featurizer's state collector (featurize.Featurizer.pair_features)

    def merge(self, other: "FisherAccumulator") -> None:
        self.matrix += other.matrix
        self.pairs += other.pairs

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"pair_fisher": self.matrix, "pairs": torch.tensor([self.pairs], dtype=torch.int64)}

    state = state_dict


def pair_features(featurizer, inputs: ModelInputs, keys: Sequence, accumulator: FisherAccumulator | None = None):
    """φ [B, k] of the core task (mean of the per-pair ψ over its K·D pairs), adding every ψ ψᵀ to `accumulator`.

    `featurizer`: a `Featurizer` (adapter, config, parameters, projector); the pairs are the core task's
    timesteps × noise draws, with the core task's noises (`PointTask`)."""
    task = featurizer.task
    rows = featurizer.config.batch_size * task.num_columns  # as many rows per pass as the core task's batches
    return timestep_features(featurizer, inputs, keys, task.timesteps(keys), task.noise_draws, rows_per_pass=rows,
                             on_rows=accumulator).features


# ---------------------------------------------------------------------------------------------- EK-FAC factors


def kronecker_eligible(module: nn.Module) -> bool:
    """Layers whose weight gets Kronecker factors: nn.Linear, nn.Conv2d with groups = 1."""
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def layer_rows(module: nn.Module, a: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K-FAC-expand rows: (a [n, d_in], δ [n, d_out]), one row per position (pixel, token) of every input row;
    for Conv2d a is the unfolded patch (C_in·kh·kw, the weight's flattening order)."""
    if isinstance(module, nn.Linear):
        return a.reshape(-1, a.shape[-1]), delta.reshape(-1, delta.shape[-1])
    padding = module.padding
    if module.padding_mode != "zeros":
        a, padding = F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode), 0
    if isinstance(padding, str):
        raise ValueError(f"Conv2d with padding={padding!r}: give explicit padding for EK-FAC factors")
    patches = F.unfold(a, module.kernel_size, module.dilation, padding, module.stride)  # [R, d_in, L]
    return patches.transpose(1, 2).reshape(-1, patches.shape[1]), delta.flatten(2).transpose(1, 2).reshape(-1, delta.shape[1])


class KroneckerFactors:
    """`on_gradient` callback: Σ a aᵀ and Σ δ δᵀ (float64) per eligible module, in the given sides R_in, R_out
    (a ↦ R_inᵀ a, δ ↦ R_outᵀ δ; R = I for sides up to MAX_SIDE), and the number of rows."""

    def __init__(self, sides: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.sides = sides
        self.A = {name: torch.zeros(r_in.shape[1], r_in.shape[1], dtype=torch.float64) for name, (r_in, _) in sides.items()}
        self.S = {name: torch.zeros(r_out.shape[1], r_out.shape[1], dtype=torch.float64) for name, (_, r_out) in sides.items()}
        self.rows = dict.fromkeys(sides, 0)

    def __call__(self, name: str, module: nn.Module, a: torch.Tensor, delta: torch.Tensor) -> None:
        r_in, r_out = self.sides[name]
        with torch.autocast(a.device.type, enabled=False):
            a, delta = layer_rows(module, a.float(), delta.float())
            a = a @ r_in.to(a.device) if r_in.shape[0] != r_in.shape[1] else a
            delta = delta @ r_out.to(delta.device) if r_out.shape[0] != r_out.shape[1] else delta
            self.A[name] += (a.T @ a).double().cpu()
            self.S[name] += (delta.T @ delta).double().cpu()
            self.rows[name] += len(a)


class SampledLoss:
    """One Monte-Carlo sample of the model's likelihood: ℓ̃ = (1/D) ‖ε_θ − y‖², y = sg(ε_θ) + sqrt(D/2) ξ.

    ∇θ ℓ̃ = −sqrt(2/D) Jᵀ ξ, so E_ξ[∇ℓ̃ ∇ℓ̃ᵀ] = (2/D) JᵀJ, the GGN of ℓ = (1/D) ‖ε_θ − target‖² (MC Fisher).
    ξ ~ N(0, I) from a generator seeded once: the same batches give the same samples."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, prediction, target, weight):
        p = flat_rows(prediction)
        xi = torch.randn(p.shape, generator=self.generator, dtype=torch.float32).to(p.device)
        y = p.detach() + math.sqrt(p.shape[1] / 2) * xi
        return (p - y).pow(2).mean(1)


def curvature_task(adapter, config, fisher: str, seed: int) -> PointTask:
    """The per-pair task whose gradients define the curvature: the training loss, or its MC-sampled version."""
    if fisher not in FISHERS:
        raise ValueError(f"fisher={fisher!r} is not one of {list(FISHERS)}")
    task = PointTask(adapter, config)
    task.objective = OBJECTIVES["loss"] if fisher == "empirical" else SampledLoss(seed)
    return task


def ekfac_calibrate(task: AttributionTask, denoiser: nn.Module, parameters: dict[str, nn.Parameter],
                    batches: Iterable[tuple[ModelInputs, Sequence]], sketch_dim: int, seed: int, *,
                    fisher: str = "mc", damping_ratio: float, damping: float | None = None, rows_per_pass: int = 64,
                    progress: bool = False) -> dict:
    """EK-FAC bases and Λ from three passes over `batches` (a list of (inputs, keys) of training examples).

    1. Kronecker factors A, S over the pairs (hooks, `curvature_task`); their eigenvectors.
    2. Λ = E_pairs[H²] of the rotated per-pair gradients H = Q_Sᵀ G Q_A (a factored pass in those bases).
    3. The preconditioned energy E_i[H̄_i²] / (Λ + λ_f) of the time-averaged measurement gradients (the core
       task), λ_f = `damping`, else damping_ratio · mean(Λ), ranks the coordinates; the top `sketch_dim` are kept
       (`keep_top`).

    Returns {"bases": {...}, "eigenvalues": {parameter: Λ of its kept rectangle}, "mean_eigenvalue": float,
    "feature_damping": λ_f}. `progress`: a bar per pass.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("EK-FAC needs at least one training example")
    owners, _ = handled_parameters(denoiser, parameters)
    sides = reduced_sides(denoiser, parameters, seed)
    eligible = {module_name: module for name, (module_name, module, role) in owners.items()
                if role == "weight" and kronecker_eligible(module)}
    weight_of = {module_name: name for name, (module_name, _, role) in owners.items() if module_name in eligible and role == "weight"}
    factors = KroneckerFactors({m: (sides[weight_of[m]]["in"], sides[weight_of[m]]["out"]) for m in eligible})
    pairs = curvature_task(task.adapter, task.config, fisher, seed)

    with attribution_hooks(eligible, factors) as capture:  # pass 1: A, S
        for inputs, keys in progress_bar(batches, "EK-FAC (pass 1/3: Kronecker factors)", progress):
            for _, _, chunk_inputs, chunk_keys in point_chunks(inputs, keys, task.timesteps(keys), task.noise_draws,
                                                                rows_per_pass):
                capture.backward(pairs.outputs(chunk_inputs, chunk_keys).sum())
    eigen = {name: dict(value) for name, value in sides.items()}
    for module_name, name in weight_of.items():
        if factors.rows[module_name] == 0:
            continue
        q_s = eigenvectors(factors.S[module_name] / factors.rows[module_name]).float()
        q_a = eigenvectors(factors.A[module_name] / factors.rows[module_name]).float()
        eigen[name] = {"out": sides[name]["out"] @ q_s, "in": sides[name]["in"] @ q_a}
        bias = next((n for n, (m, _, role) in owners.items() if m == module_name and role == "bias"), None)
        if bias is not None:
            eigen[bias] = {"dense": sides[name]["out"] @ q_s}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # left-out parameters: warned about by the caller's projector
        rotated = FactoredProjector(denoiser, parameters, None, seed, bases=eigen)
    second = torch.zeros(rotated.dim, dtype=torch.float64)
    count = 0

    def add_squares(index, h):
        nonlocal count
        second.add_(h.pow(2).sum(0))
        count += len(h)

    point = PairParts(task.adapter, task.config, parameters, rotated)
    for inputs, keys in progress_bar(batches, "EK-FAC (pass 2/3: eigenvalue correction)", progress):  # Λ over pairs
        timestep_features(point, inputs, keys, task.timesteps(keys), task.noise_draws, rows_per_pass=rows_per_pass,
                          on_rows=add_squares, task=pairs)
    eigenvalues = second / count
    mean_eigenvalue = float(eigenvalues.mean())
    damping = damping_ratio * mean_eigenvalue if damping is None else float(damping)
    if not damping > 0:
        raise ValueError(f"EK-FAC damping must be > 0, got {damping}")

    energy = torch.zeros(rotated.dim, dtype=torch.float64)
    examples = 0
    for inputs, keys in progress_bar(batches, "EK-FAC (pass 3/3: energy)", progress):  # time-averaged measurement
        energy += rotated.features(task, parameters, inputs, keys).double().pow(2).sum(0).cpu()
        examples += len(keys)
    bases = keep_top(rotated, eigen, energy / examples / (eigenvalues + damping), sketch_dim)
    kept = {}
    for block in coordinate_blocks(rotated):
        if block.name not in bases:
            continue
        values = eigenvalues[block.offset : block.offset + block.k]
        if block.role == "weight":
            rows, cols = bases[block.name]["out"].shape[1], bases[block.name]["in"].shape[1]
            kept[block.name] = values.reshape(block.k_out, block.k_in)[:rows, :cols].float().contiguous()
        else:
            kept[block.name] = values[: bases[block.name]["dense"].shape[1]].float().contiguous()
    return {"bases": bases, "eigenvalues": kept, "mean_eigenvalue": mean_eigenvalue, "feature_damping": damping}


class PreconditionedProjector(CalibratedProjector):
    """`CalibratedProjector` in EK-FAC bases, with Λ: training features (H ⊘ sqrt(Λ + λ_f)) M; queries
    (H ⊙ sqrt(Λ + λ_f) ⊘ (Λ + λ)) M (`precondition`, `for_queries`; version 1: H M and (H ⊘ (Λ + λ)) M). `fit`
    measures bases and Λ (`ekfac_calibrate`) on the `fit_examples`; `state_dict` / `load_state_dict` carry the bases
    (projection.safetensors, like any calibrated projection), `curvature_state` / `load_curvature` carry Λ and λ_f
    (the store's method_state.safetensors; a state without λ_f is version 1)."""

    def __init__(self, denoiser: nn.Module, parameters: dict[str, nn.Parameter], dim: int, seed: int,
                 curvature: dict | None = None, *, sketch_dim: int | None = None, examples: int = 64,
                 fisher: str = "mc", damping_ratio: float = 0.1, feature_damping: float | None = None):
        """`curvature`: an `ekfac_calibrate` result ({"bases", "eigenvalues", "mean_eigenvalue"[, "feature_damping"]}:
        without it, version 1 features), or None to `fit`. `fisher`, `damping_ratio` / `feature_damping` (λ_f =
        `feature_damping`, else damping_ratio · mean(Λ): the λ that ranks coordinates and whitens the features):
        used by `fit`."""
        if fisher not in FISHERS:
            raise ValueError(f"fisher={fisher!r} is not one of {list(FISHERS)}")
        super().__init__(denoiser, parameters, dim, seed, sketch_dim=sketch_dim, examples=examples)
        self.fisher, self.damping_ratio, self.damping = fisher, float(damping_ratio), None
        self.fit_damping = feature_damping
        self.eigenvalues: dict[str, torch.Tensor] | None = None
        self.feature_damping: float | None = None
        if curvature is not None:
            self._use(curvature["bases"])
            self._set_eigenvalues(curvature["eigenvalues"], curvature["mean_eigenvalue"], curvature.get(FEATURE_DAMPING))

    @property
    def correction_version(self) -> int:
        """2: features whitened by sqrt(Λ + λ_f); 1: a store's curvature without λ_f (module docstring)."""
        return 1 if self.eigenvalues is not None and self.feature_damping is None else VERSION

    def _set_eigenvalues(self, eigenvalues: dict[str, torch.Tensor], mean_eigenvalue: float,
                         feature_damping: float | None = None) -> None:
        if set(eigenvalues) != set(self.bases):
            raise ValueError("EK-FAC eigenvalues and bases name different parameters")
        scale = torch.zeros(self.sketch.dim, dtype=torch.float32)
        for block in coordinate_blocks(self.sketch):
            values = eigenvalues[block.name].flatten()
            if len(values) != block.k:
                raise ValueError(f"EK-FAC eigenvalues of {block.name}: {len(values)} values for {block.k} coordinates")
            scale[block.offset : block.offset + block.k] = values
        if feature_damping is not None and not (math.isfinite(feature_damping) and feature_damping > 0):
            raise ValueError(f"EK-FAC feature damping must be a finite number > 0, got {feature_damping}")
        self.eigenvalues, self.mean_eigenvalue, self.sketch_eigenvalues = eigenvalues, float(mean_eigenvalue), scale
        self.feature_damping = None if feature_damping is None else float(feature_damping)

    def fit(self, task: AttributionTask, parameters: dict, batches, progress: bool = False) -> None:
        result = ekfac_calibrate(task, self.denoiser, parameters, batches, self.sketch_dim, self.seed,
                                 fisher=self.fisher, damping_ratio=self.damping_ratio, damping=self.fit_damping,
                                 rows_per_pass=task.config.batch_size * task.num_columns, progress=progress)
        self._use(result["bases"])
        self._set_eigenvalues(result["eigenvalues"], result["mean_eigenvalue"], result[FEATURE_DAMPING])

    def load_state_dict(self, state: dict[str, torch.Tensor], spec: dict | None = None) -> None:
        """The bases only; Λ comes with `load_curvature` (dropped here: it belongs to the bases it was measured in)."""
        super().load_state_dict(state, spec)
        self.eigenvalues, self.feature_damping = None, None

    def curvature_state(self) -> dict[str, torch.Tensor]:
        """{"<parameter>::eigenvalues": Λ of its kept rectangle (float32), "mean_eigenvalue": [1] float64,
        "feature_damping": [1] float64 (version 2)}."""
        if self.eigenvalues is None:
            raise RuntimeError("no EK-FAC eigenvalues: fit the projector, or load_curvature a store's method_state")
        state = {f"{name}{EIGENVALUES}": values.contiguous() for name, values in self.eigenvalues.items()}
        state[MEAN_EIGENVALUE] = torch.tensor([self.mean_eigenvalue], dtype=torch.float64)
        if self.feature_damping is not None:
            state[FEATURE_DAMPING] = torch.tensor([self.feature_damping], dtype=torch.float64)
        return state

    def load_curvature(self, state: dict[str, torch.Tensor]) -> None:
        if MEAN_EIGENVALUE not in state:
            raise ValueError(f"not an EK-FAC curvature state (no {MEAN_EIGENVALUE!r}): the store was featurized by "
                             "another method")
        eigenvalues = {key[: -len(EIGENVALUES)]: value.float() for key, value in state.items() if key.endswith(EIGENVALUES)}
        feature_damping = float(state[FEATURE_DAMPING][0]) if FEATURE_DAMPING in state else None
        self._set_eigenvalues(eigenvalues, float(state[MEAN_EIGENVALUE][0]), feature_damping)

    def for_queries(self, damping: float) -> "PreconditionedProjector":
        """The same bases and mix, with features preconditioned by 1 / (Λ + λ) before the mix."""
        if self.eigenvalues is None:
            raise RuntimeError("no EK-FAC eigenvalues to precondition with: load_curvature the store's method_state")
        if damping < 0 or (damping == 0 and bool((self.sketch_eigenvalues <= 0).any())):
            raise ValueError(f"EK-FAC damping must be > 0 (some Λ are 0), got {damping}")
        query = PreconditionedProjector.__new__(PreconditionedProjector)
        query.__dict__.update(self.__dict__)
        query.damping = float(damping)
        return query

    def partial_features(self, task: AttributionTask, parameters: dict, inputs: ModelInputs,
                         keys: Sequence) -> torch.Tensor:
        """The weighted coordinates (`weigh`) before the mix: training rows, or queries of `for_queries`."""
        if not self.fitted:
            raise RuntimeError("the EK-FAC curvature is measured on training examples: featurize the training set "
                               "first, or build the featurizer from the store")
        return self.weigh(self.sketch.features(task, parameters, inputs, keys), self.damping)

    def precondition(self, sketch: torch.Tensor, damping: float | None) -> torch.Tensor:
        """The features from the rotated coordinates H [n, k_mid]: queries preconditioned with λ = `damping`, or
        the training features for `damping=None` (`weigh`, then the mix)."""
        return self.finish(self.weigh(sketch, damping))

    def weigh(self, sketch: torch.Tensor, damping: float | None) -> torch.Tensor:
        """H times the per-coordinate weights of the features, before the mix: training (`damping=None`)
        1 / sqrt(Λ + λ_f), queries sqrt(Λ + λ_f) / (Λ + λ); version 1: 1 and 1 / (Λ + λ)."""
        if damping is None and self.feature_damping is None:
            return sketch  # version 1 training features (or not yet fitted: `fit` sets λ_f)
        if self.eigenvalues is None:
            raise RuntimeError("no EK-FAC eigenvalues to precondition with: load_curvature the store's method_state")
        eigenvalues = self.sketch_eigenvalues.double()
        weights = torch.ones_like(eigenvalues)
        if self.feature_damping is not None:
            weights = (eigenvalues + self.feature_damping).sqrt()
            weights = weights.reciprocal() if damping is None else weights
        if damping is not None:
            weights = weights / (eigenvalues + damping)
        return sketch * weights.to(sketch.device, sketch.dtype)

    def spec(self) -> dict:
        return {**super().spec(), "eigenvalue_correction": {"version": self.correction_version, "fisher": self.fisher}}


__all__ = ["FisherAccumulator", "KroneckerFactors", "PreconditionedProjector", "SampledLoss", "ekfac_calibrate",
           "kronecker_eligible", "layer_rows", "pair_features"]
