"""Calibrated factored projection: per-layer eigenbases measured on training examples, then a dense mix.

Random per-layer projections (factored.py) estimate ⟨G, G'⟩ with a Kronecker variance that a dense Gaussian
projection of the same k does not have. Calibration replaces the random P_out, P_in by data. On n training
examples (a seeded subset, `calibration_indices`), for every weight G_p (d_out × d_in):

    S_p = E[G_p G_pᵀ],   A_p = E[G_pᵀ G_p],   U_p, V_p = their eigenvectors, descending

(for biases and norm parameters C_p = E[g_p g_pᵀ] and its eigenvectors). In these bases the coordinates
H_p = U_pᵀ G_p V_p hold the gradient's energy in few entries. Their second moments E[(H_p)_ij²], measured
on the same examples, rank every (parameter, i, j) in one pool; the top `sketch_dim` entries are kept, as
per parameter the smallest rectangle U_p[:, :s_out]ᵀ G_p V_p[:, :s_in] that holds its chosen entries. That
first stage is one factored pass (the hooks of factored.py, no per-sample gradient), k_mid features h. A
seeded mix M [k_mid, k] then maps them to k features, φ(z) = h(z) M, h(z) = [vec(U_pᵀ G_p(z) V_p[:, :s])]_p:

    version 2 (`VERSION`, the default): a signed partition. A seeded permutation π of the k_mid coordinates
        and signs σ_c = ±1; coordinate π(r) goes to feature r mod k:  φ_j = Σ_{r ≡ j (mod k)} σ_π(r) h_π(r).
        Each feature sums ⌈k_mid / k⌉ or ⌊k_mid / k⌋ coordinates, so E⟨φ, φ'⟩ = ⟨h, h'⟩ and, unlike a
        Gaussian, no coordinate's own square enters another's error: Var⟨φ, φ'⟩ = Σ_{c ≠ c' same feature}
        (h_c² h'_c'² + h_c h'_c h_c' h'_c'), which is small when the energy sits in few coordinates, as it
        does in the eigenbases. O(k_mid) per row instead of O(k_mid · k).
    version 1 (stores written before it): a dense Gaussian M ~ N(0, 1/k), seeded in row blocks.

Why the calibrated features beat a dense Gaussian at the same k (docs/projection.md, Fidelity): the mix keeps
the geometry of the kept coordinates, and the truncation drops a low-energy tail that adds JL noise to the
kernel scores but little signal. Sides wider than `MAX_SIDE` are first reduced to MAX_SIDE
orthonormal random directions (seeded), so calibration costs O(MAX_SIDE²) per layer and side.

Cost: one factored pass over the calibration examples (identity sides are not multiplied, so a weight's
coordinates are its per-example gradient), in batches of CALIBRATION_BATCH; the moments are summed per
batch in float64, and the energies E[(H_p)_ij²] come from the kept coordinates of that same pass (a second
pass only when they exceed KEEP_BYTES). n is `calibration_examples` capped by the training set size
(`calibration_count`). The mix runs once per example, on blocks of rows (`CalibratedProjector.finish`).

The bases depend on the model and the calibration examples, not only on seeds: they are saved with the
features (`projection.safetensors` in a store) and queries are always projected with the saved ones.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..adapters import ModelInputs
from ..gradients.task import AttributionTask
from ..seeding import seed_from
from .base import BLOCK_ROWS, Projector
from .factored import FactoredProjector, handled_parameters
from .registry import register_projector

VERSION = 2  # bump if the definition of the features changes (the stored bases define them; see `calibrate`)
MIX_VERSIONS = {1: "gaussian", 2: "signed-partition"}  # what each version mixes with (module docstring)
MAX_SIDE = 1024  # sides wider than this are reduced to MAX_SIDE random orthonormal directions first
CALIBRATION_BATCH = 16  # examples per calibration step (fixed: sums in float64 in this order)
KEEP_BYTES = 1 << 30  # pass 1's coordinates are kept for the energies up to this size, else pass 2 recomputes them
CAP_FRACTION, CAP_MINIMUM = 32, 32  # at most max(CAP_MINIMUM, N / CAP_FRACTION) calibration examples


def calibration_count(num_examples: int, requested: int) -> int:
    """How many examples calibrate a training set of N: `requested`, at most max(32, N // 32), at most N.

    A calibration example costs about 2.5 featurized ones (a per-example gradient of every layer and its
    moments); with the cap calibration stays under about a tenth of the featurization. Fidelity on the digits
    DDPM (N = 500, k = 512 / 2048, Spearman vs exact scores): 64 examples 0.931 / 0.976, 32 0.930 / 0.976,
    16 0.926 / 0.971 (docs/projection.md): 32 lose nothing measurable, 16 do."""
    return min(requested, num_examples, max(CAP_MINIMUM, num_examples // CAP_FRACTION))


def calibration_indices(num_examples: int, count: int, seed: int) -> list[int]:
    """The training examples calibration uses: the first `count` of a permutation seeded by (seed, N), sorted."""
    generator = torch.Generator().manual_seed(seed_from(seed, "calibration", num_examples))
    return sorted(torch.randperm(num_examples, generator=generator)[: min(count, num_examples)].tolist())


class CalibratedProjector(Projector):
    """φ = (factored features in the calibrated bases) @ M; the bases are measured by `fit` (`calibrate` on the
    `fit_examples`) or restored from a store (`load_state_dict`, or `bases=`)."""

    kind = "factored"
    fits_on_data = True
    fit_batch_size = CALIBRATION_BATCH

    def __init__(self, denoiser: nn.Module, parameters: dict[str, nn.Parameter], dim: int, seed: int,
                 bases: dict[str, dict[str, torch.Tensor]] | None = None, *, sketch_dim: int | None = None,
                 examples: int = 64, version: int = VERSION):
        """`version`: the projection's definition (`MIX_VERSIONS`); a store's own is taken by `load_state_dict`."""
        self.denoiser, self.parameters = denoiser, parameters
        self.sketch_dim, self.examples = sketch_dim or 2 * dim, examples
        super().__init__({name: p.shape for name, p in parameters.items()}, dim, seed)
        self._mix: dict[tuple, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}
        self.bases = None
        self.version = check_version(version)
        if bases is not None:
            self._use(bases)

    def _use(self, bases: dict[str, dict[str, torch.Tensor]]) -> None:
        with warnings.catch_warnings():  # parameters left out were reported when the bases were calibrated
            warnings.simplefilter("ignore")
            self.sketch = FactoredProjector(self.denoiser, self.parameters, None, self.seed, bases=bases)
        self.shapes = self.sketch.shapes
        self.bases = bases
        self.digest = bases_digest(bases)
        self._mix = {}

    @property
    def fitted(self) -> bool:
        return self.bases is not None

    def fit_examples(self, num_examples: int) -> list[int]:
        """`examples` (calibration_examples) capped by the training set: `calibration_count`."""
        return calibration_indices(num_examples, calibration_count(num_examples, self.examples), self.seed)

    def fit(self, task: AttributionTask, parameters: dict, batches, progress: bool = False) -> None:
        self._use(calibrate(task, self.denoiser, parameters, batches, self.sketch_dim, self.seed, progress=progress))

    def load_state_dict(self, state: dict[str, torch.Tensor], spec: dict | None = None) -> None:
        """The bases of `state`; `spec` (the store's projection spec) gives the version they were mixed with."""
        if spec is not None:
            self.version = check_version(spec.get("version"))
        bases = bases_from_state_dict(state)
        if spec is not None and spec.get("bases_sha256") not in (None, bases_digest(bases)):
            raise ValueError("the saved bases are not the ones the store's projection spec records (bases_sha256)")
        self._use(bases)

    def mix(self, device) -> torch.Tensor:
        """M [k_mid, k] as a dense matrix (what `finish` multiplies by; version 2 never forms it): version 1
        N(0, 1/k), generated on the CPU in row blocks from (seed, k_mid, k, block); version 2 the signed
        partition, one ±1 per row (`partition`). Cached per device."""
        key = ("dense", str(device))
        if key not in self._mix:
            rows = self.sketch.dim
            if self.version == 1:
                blocks = []
                for index, start in enumerate(range(0, rows, BLOCK_ROWS)):
                    generator = torch.Generator().manual_seed(seed_from(self.seed, "mix", rows, self.dim, index))
                    blocks.append(torch.randn(min(BLOCK_ROWS, rows - start), self.dim, generator=generator))
                matrix = torch.cat(blocks).div_(math.sqrt(self.dim))
            else:
                index, signs = self.partition("cpu")
                matrix = torch.zeros(rows, self.dim)  # the padding entries add 0
                matrix.index_put_((index, torch.arange(self.dim).expand_as(index)), signs, accumulate=True)
            self._mix[key] = matrix.to(device)
        return self._mix[key]

    def partition(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Version 2's mix as (index, signs), both [m, k] with m = ⌈k_mid / k⌉: feature j sums
        signs[q, j] · h[index[q, j]] over q; index[q, j] = π(q·k + j), or 0 with sign 0 past the end.
        π and σ come from (seed, k_mid, k), generated on the CPU; cached per device."""
        key = ("partition", str(device))
        if key not in self._mix:
            rows, k = self.sketch.dim, self.dim
            generator = torch.Generator().manual_seed(seed_from(self.seed, "mix-partition", rows, k))
            order = torch.randperm(rows, generator=generator)
            sign = torch.randint(0, 2, (rows,), generator=generator, dtype=torch.float32).mul_(2).sub_(1)
            width = max(1, math.ceil(rows / k))
            index = torch.zeros(width * k, dtype=torch.long)
            index[:rows] = order
            signs = torch.zeros(width * k)
            signs[:rows] = sign[order]
            self._mix[key] = (index.view(width, k).to(device), signs.view(width, k).to(device))
        return self._mix[key]

    @property
    def partial_dim(self) -> int:
        """k_mid: the featurization loop keeps `finish_rows` sketches and mixes them in one `finish` (for
        version 1 one product [rows, k_mid] @ M reads M, 85 MB on the digits UNet, once for all of them; for
        version 2 one gather and one copy to the CPU per block)."""
        return self.sketch.dim if self.fitted else self.dim

    def features(self, task: AttributionTask, parameters: dict, inputs: ModelInputs, keys: Sequence) -> torch.Tensor:
        return self.finish(self.partial_features(task, parameters, inputs, keys))

    def partial_features(self, task: AttributionTask, parameters: dict, inputs: ModelInputs,
                         keys: Sequence) -> torch.Tensor:
        """The sketch [B, k_mid]: each example's coordinates, summed over its timesteps and noise draws."""
        if not self.fitted:
            raise RuntimeError(
                f"this factored projection is calibrated on training examples (calibration_examples={self.examples}): "
                "featurize the training set first, or build the featurizer from the store "
                "(get_method(store.config.method).featurizer(pipe, store.config, store=store))")
        return self.sketch.features(task, parameters, inputs, keys)

    def finish(self, partial: torch.Tensor) -> torch.Tensor:
        """φ = sketch @ M, once per example: M is linear, so mixing the averaged sketch is mixing each row.
        Version 2 gathers each feature's ⌈k_mid / k⌉ signed coordinates and sums them (no atomics: the same
        result for any batch of rows)."""
        if self.version == 1:
            return partial @ self.mix(partial.device).to(partial.dtype)
        index, signs = self.partition(partial.device)
        gathered = partial.index_select(1, index.flatten()).view(len(partial), *index.shape)  # [rows, m, k]
        return (gathered * signs.to(partial.dtype)).sum(1)

    def spec(self) -> dict:
        spec = {"kind": self.kind, "calibrated": True, "version": self.version, "dim": self.dim, "seed": self.seed,
                "sketch_dim": self.sketch.dim, "bases_sha256": self.digest, "sketch": self.sketch.spec()}
        if self.version >= 2:
            spec["mix"] = MIX_VERSIONS[self.version]
        return spec

    def state_dict(self) -> dict[str, torch.Tensor]:
        return bases_to_state_dict(self.bases)


def check_version(version) -> int:
    """A calibrated projection version this package can compute (`MIX_VERSIONS`), else a `ValueError`."""
    if version not in MIX_VERSIONS:
        raise ValueError(f"calibrated projection version {version!r}: this package computes versions "
                         f"{sorted(MIX_VERSIONS)}; a newer diffusers-attribution wrote it, upgrade to score against it")
    return version


# ------------------------------------------------------------------------------------------- calibration


def calibrate(task: AttributionTask, denoiser: nn.Module, parameters: dict[str, nn.Parameter],
              batches: Iterable[tuple[ModelInputs, Sequence]], sketch_dim: int, seed: int, progress: bool = False) -> dict:
    """The calibrated bases {parameter: {"out", "in"} or {"dense"}} from the examples of `batches`.

    Pass 1 (`calibration_moments`) accumulates S, A (or C) from the coordinates of G in the (possibly
    reduced) full sides; their eigenvectors are the bases; then E[H_ij²] in the eigenbases, from pass 1's
    coordinates when they fit in KEEP_BYTES, else from a second pass; the top `sketch_dim` entries choose
    each rectangle. `batches` must be re-iterable (a list): a second pass reads the same examples.
    `progress`: a bar per pass.
    """
    batches = list(batches)
    moments = calibration_moments(task, denoiser, parameters, batches, seed, progress)
    full, count, kept = moments.pop("projector"), moments.pop("count"), moments.pop("coordinates")
    reduced, eigen = {}, {}
    for block in coordinate_blocks(full):
        sides = ("out", "in") if block.role == "weight" else ("dense",)
        reduced[block.name] = {side: eigenvectors(m / count) for side, m in zip(sides, moments[block.name])}
        eigen[block.name] = {side: vectors if block.identity(side) else full.matrix(block.name, side, torch.float64) @ vectors
                             for side, vectors in reduced[block.name].items()}
    if kept is not None:  # the rotated coordinates U_rᵀ H V_r of the kept H: no second pass
        energy = _energies(full, reduced, kept) / count
    else:
        rotated = FactoredProjector(denoiser, parameters, None, seed, bases=eigen)
        energy = torch.zeros(rotated.dim, dtype=torch.float64)
        for inputs, keys in progress_bar(batches, "calibrating projection (pass 2/2: energy in the eigenbases)", progress):
            energy += rotated.features(task, parameters, inputs, keys).double().pow(2).sum(0).cpu()
        energy /= count
    return keep_top(full, eigen, energy, sketch_dim)


def calibration_moments(task: AttributionTask, denoiser: nn.Module, parameters: dict[str, nn.Parameter],
                        batches: Iterable[tuple[ModelInputs, Sequence]], seed: int, progress: bool = False) -> dict:
    """Pass 1: {parameter: (Σ_n H_n H_nᵀ, Σ_n H_nᵀ H_n) for a weight, (Σ_n h_n h_nᵀ,) otherwise} in float64,
    H_n = Q_outᵀ G_n Q_in the coordinates of example n's gradient in the reduced sides (`reduced_sides`: I, or
    MAX_SIDE orthonormal directions), plus "count" (examples), "projector" (the factored projector with those
    sides) and "coordinates" (every H_n in its layout, [n, dim] float32 on the CPU, when that fits in
    KEEP_BYTES, else None).

    Sums run in float64 in batch order; identity sides are never multiplied (factored.py), so a weight's H_n
    is its per-example gradient Σ_pos δ_pos a_posᵀ, summed over the example's timesteps and noise draws.
    """
    batches = list(batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # left-out parameters: warned about once, by the caller's projector
        full = FactoredProjector(denoiser, parameters, None, seed, bases=reduced_sides(denoiser, parameters, seed))
    count = sum(len(keys) for _, keys in batches)
    if count == 0:
        raise ValueError("calibration needs at least one training example")
    keep = count * full.dim * 4 <= KEEP_BYTES
    moments, kept = None, []
    description = ("calibrating projection (one pass: gradient moments, energies)" if keep
                   else "calibrating projection (pass 1/2: gradient moments)")
    for inputs, keys in progress_bar(batches, description, progress):
        coordinates = full.features(task, parameters, inputs, keys)
        device = coordinates.device if coordinates.device.type in ("cpu", "cuda") else torch.device("cpu")  # float64
        if moments is None:
            moments = {b.name: _zero_moments(b, device) for b in coordinate_blocks(full)}
        for block in coordinate_blocks(full):
            h = coordinates[:, block.offset : block.offset + block.k].to(device, torch.float64)
            if block.role == "weight":
                h = h.reshape(len(h), block.k_out, block.k_in)
                moments[block.name][0].add_(torch.einsum("bij,bkj->ik", h, h))
                moments[block.name][1].add_(torch.einsum("bji,bjk->ik", h, h))
            else:
                moments[block.name][0].add_(h.T @ h)
        if keep:
            kept.append(coordinates.float().cpu())
    return {**{name: tuple(m.cpu() for m in ms) for name, ms in moments.items()}, "count": count, "projector": full,
            "coordinates": torch.cat(kept) if keep else None}


def _energies(full: FactoredProjector, reduced: dict, coordinates: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Σ_n (U_rᵀ H_n V_r)² entry by entry (float64), laid out as `full`'s blocks (the rotated projector's too)."""
    energy = torch.zeros(full.dim, dtype=torch.float64)
    for block in coordinate_blocks(full):
        sides = reduced[block.name]
        for start in range(0, len(coordinates), chunk):
            h = coordinates[start : start + chunk, block.offset : block.offset + block.k].double()
            if block.role == "weight":
                h = sides["out"].T @ h.reshape(len(h), block.k_out, block.k_in) @ sides["in"]
            else:
                h = h @ sides["dense"]
            energy[block.offset : block.offset + block.k] += h.pow(2).sum(0).flatten()
    return energy


def progress_bar(batches: list, description: str, enabled: bool):
    """`batches` under a tqdm bar counting examples (calibration is most of a small featurization's time)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(keys) for _, keys in batches), desc=description, unit="example", disable=not enabled)
    for inputs, keys in batches:
        yield inputs, keys
        bar.update(len(keys))
    bar.close()


def keep_top(rotated: FactoredProjector, eigen: dict, energy: torch.Tensor, sketch_dim: int) -> dict:
    """Per parameter, the smallest rectangle of leading eigen-directions holding its share of the top entries
    (`rotated`: a projector with the blocks' layout in the full eigenbases, or the reduced sides: the same)."""
    chosen = torch.zeros_like(energy, dtype=torch.bool)
    chosen[torch.topk(energy, min(sketch_dim, len(energy))).indices] = True
    # A parameter whose gradient is zero (an unused module) gets no features, nor does a direction whose energy is
    # rounding noise (a null direction of the moments): which of those won a tie would depend on the thread count.
    chosen &= energy > CLUSTER_TOLERANCE * energy.max()
    bases = {}
    for block in coordinate_blocks(rotated):
        mask = chosen[block.offset : block.offset + block.k]
        if not mask.any():
            continue
        if block.role == "weight":
            grid = mask.reshape(block.k_out, block.k_in)
            rows = int(grid.any(1).nonzero().max()) + 1
            cols = int(grid.any(0).nonzero().max()) + 1
            bases[block.name] = {"out": eigen[block.name]["out"][:, :rows].float().contiguous(),
                                 "in": eigen[block.name]["in"][:, :cols].float().contiguous()}
        else:
            bases[block.name] = {"dense": eigen[block.name]["dense"][:, : int(mask.nonzero().max()) + 1].float().contiguous()}
    return bases


def reduced_sides(denoiser: nn.Module, parameters: dict, seed: int) -> dict:
    """Per handled parameter, the calibration's starting sides: I, or MAX_SIDE seeded orthonormal directions."""
    def side(name: str, rows: int, role: str) -> torch.Tensor:
        if rows <= MAX_SIDE:
            return torch.eye(rows)
        generator = torch.Generator().manual_seed(seed_from(seed, "calibration-side", name, rows, role))
        return torch.linalg.qr(torch.randn(rows, MAX_SIDE, generator=generator, dtype=torch.float64)).Q.float()

    sides = {}
    for name, (_, _, role) in handled_parameters(denoiser, parameters)[0].items():
        shape = parameters[name].shape
        if role == "weight":
            sides[name] = {"out": side(name, shape[0], "out"), "in": side(name, math.prod(shape[1:]), "in")}
        else:
            sides[name] = {"dense": side(name, shape.numel(), "dense")}
    return sides


def _zero_moments(block, device) -> tuple[torch.Tensor, ...]:
    sizes = (block.k_out, block.k_in) if block.role == "weight" else (block.k,)
    return tuple(torch.zeros(size, size, dtype=torch.float64, device=device) for size in sizes)


def eigenvectors(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix as columns, by descending eigenvalue (float64, CPU), canonical."""
    return canonical_eigenvectors(matrix)


CLUSTER_TOLERANCE = 1e-9  # eigenvalues closer than this × the largest share one eigenspace


def canonical_eigenvectors(matrix: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix, descending, as a function of the matrix alone: the same (to rounding)
    whatever the thread count, process count, device or summation order that produced the matrix.

    `eigh` fixes neither an eigenvector's sign nor the basis of an eigenspace of equal eigenvalues (the null space
    of a moment matrix measured on fewer examples than its side is one). Eigenvalues within CLUSTER_TOLERANCE ×
    λ_max of their neighbour form one cluster; each cluster's orthogonal projector V Vᵀ is basis-free, and the
    cluster's basis is the Gram–Schmidt (QR, positive diagonal) of V Vᵀ G for fixed seeded Gaussian columns G.
    For a single eigenvalue that is v · sign(vᵀg)."""
    if not torch.isfinite(matrix).all():
        raise ValueError("calibration: the gradients' second moments are not finite (a NaN or overflowing gradient)")
    values, vectors = torch.linalg.eigh(matrix.detach().cpu().double())
    values, vectors = values.flip(0), vectors.flip(1)
    size = len(values)
    if size == 0:
        return vectors
    probe = torch.randn(size, size, generator=torch.Generator().manual_seed(seed_from(0, "canonical-basis", size)),
                        dtype=torch.float64)
    scale = max(float(values.abs().max()), 1e-300)
    gaps = (values[:-1] - values[1:] > CLUSTER_TOLERANCE * scale).nonzero().flatten().add(1).tolist()
    bounds = [0] + gaps + [size]
    # single eigenvalues (most of them), all at once: v · sign(vᵀg)
    signs = torch.sign((vectors * probe).sum(0))
    signs[signs == 0] = 1
    out = vectors * signs
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop - start == 1:
            continue
        basis = vectors[:, start:stop]
        q, r = torch.linalg.qr(basis @ (basis.T @ probe[:, start:stop]))
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1
        out[:, start:stop] = q * signs
    return out


def coordinate_blocks(projector: FactoredProjector):
    return sorted((b for blocks in projector.blocks.values() for b in blocks), key=lambda b: b.offset)


# ------------------------------------------------------------------------------------------- saving


def bases_to_state_dict(bases: dict) -> dict[str, torch.Tensor]:
    """{"<parameter>::<side>": tensor}, for safetensors."""
    return {f"{name}::{side}": matrix.contiguous() for name, sides in bases.items() for side, matrix in sides.items()}


def bases_from_state_dict(state: dict[str, torch.Tensor]) -> dict:
    bases: dict[str, dict[str, torch.Tensor]] = {}
    for key, matrix in state.items():
        name, _, side = key.rpartition("::")
        if side not in ("out", "in", "dense") or not name:
            raise ValueError(f"not a calibrated projection tensor: {key!r}")
        bases.setdefault(name, {})[side] = matrix.float()
    return bases


def bases_digest(bases: dict) -> str:
    """sha256 over names, shapes and float32 values of the bases (what a store records and checks)."""
    h = hashlib.sha256()
    for key, matrix in sorted(bases_to_state_dict(bases).items()):
        h.update(f"{key}:{tuple(matrix.shape)}".encode())
        h.update(matrix.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@register_projector("factored")
def make_factored(config, denoiser: nn.Module, parameters: dict[str, nn.Parameter]) -> Projector:
    """`factored`: calibrated bases when `config.calibration_examples > 0` (fitted on data), else the seeded
    random per-layer projection of factored.py (with `layer_dims`)."""
    if config.calibration_examples:
        return CalibratedProjector(denoiser, parameters, config.projection_dim, config.projection_seed,
                                   sketch_dim=config.sketch_dim, examples=config.calibration_examples)
    return FactoredProjector(denoiser, parameters, config.projection_dim, config.projection_seed,
                             layer_dims=config.layer_dims)
