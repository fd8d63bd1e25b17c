"""Factored (LoGra-style) projection: per-layer P_outᵀ G P_in from hooks, near the cost of one training step.

For a layer y = W a + b (W: d_out × d_in) the per-sample gradient of F_i is G_i = Σ_pos δ_pos a_posᵀ, the
sum running over the positions (pixels, tokens) of every one of example i's K' timestep rows. With
P_in (d_in × k_in) and P_out (d_out × k_out):

    P_outᵀ G_i P_in = Σ_pos (P_outᵀ δ_pos)(P_inᵀ a_pos)ᵀ          (k_out × k_in)

is computed from the layer input a and output gradient δ of one batched backward (`hooks.py`); G_i itself
is never formed. Conv2d: a_pos is the unfolded patch (d_in = C_in/groups · kh · kw), and P_inᵀ a_pos at all
positions is a convolution of the input with P_in reshaped to a [k_in, C_in/groups, kh, kw] kernel (same
stride, padding, dilation), applied to each group. nn.Embedding (W: num × dim, row idx looked up):
G_i = Σ_pos e_idx δ_posᵀ, so P_outᵀ G_i P_in = Σ_pos P_out[idx_pos]ᵀ (P_inᵀ δ_pos)ᵀ, the padding row
excluded. Exact per-sample gradients of small parameters come from the same (a, δ) and are projected
densely:

    bias of Linear/Conv2d:       g_b = Σ_pos δ_pos
    GroupNorm/LayerNorm scale:   g_γ = Σ_pos δ_pos ⊙ x̂_pos   (x̂ = the normalized input, recomputed)
    GroupNorm/LayerNorm shift:   g_β = Σ_pos δ_pos

Everything else (bare `nn.Parameter`s such as positional or scale-shift tables, Conv1d/Conv3d, custom
layers such as diffusers' RMSNorm) is left out of the features, by choice: a warning names them, and
selecting only such parameters is an error (use a dense projector for them).

Dimensions: parameter p gets k_p features, Σ_p k_p = k exactly (`split_dims`: k_p ∝ sqrt(numel_p), at
least 1, at most numel_p), or what `layer_dims` sets. A weight's k_p features are the first k_p entries,
row-major, of the k_out × k_in matrix with k_out ≈ k_in ≈ sqrt(k_p) (`weight_dims`), times a fixed scale.
Scale: P_in, P_out ~ N(0, 1), and each entry pᵀ G q has E[(pᵀ G q)(pᵀ G' q)] = ⟨G, G'⟩, so the k_p kept
entries are scaled by 1/sqrt(k_p); a side that keeps its full width (k_out = d_out, e.g. conv_out with
d_out = 1) uses P = I instead and scales per row (column) of the grid (`Block.entry_scale`); dense
P ~ N(0, 1/k_p). Hence E⟨φ(z), φ(z')⟩ = ⟨g(z), g(z')⟩ over the projected parameters (JL).

Every matrix is drawn in float32 on the CPU from `seed_from(seed, "factored", name, shape, role, rows,
cols)`, then cast and moved: the same on any device, in any dtype, for any batch size. Or the matrices are
given (`bases=`): calibrated.py measures eigenbases on training examples, the default for TRAK/D-TRAK.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import ModelInputs
from ..gradients.hooks import attribution_hooks
from ..gradients.task import AttributionTask
from ..seeding import seed_from
from .base import Projector

VERSION = 1  # bump if the definition of the projection changes
CONV_OUT_ADVANTAGE = 1.5  # see `weight_costs`
UNFOLD_PENALTY = 3.0  # see `weight_costs`
GROUPED_CHANNELS = 8  # see `_grouped_width`


@dataclass
class Block:
    """The k features of one parameter: columns [offset, offset + k) of φ."""

    name: str
    module: str
    role: str  # "weight" (Linear/Conv2d/Embedding), "bias", "norm-weight", "norm-bias"
    shape: tuple[int, ...]
    k: int
    k_out: int = 0  # weights only
    k_in: int = 0
    offset: int = 0
    basis: dict[str, torch.Tensor] | None = None  # given matrices ("out"/"in", or "dense"): projection/calibrated.py

    @property
    def d_out(self) -> int:
        return self.shape[0]

    @property
    def d_in(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def exact_in(self) -> bool:
        """P_in = I: the grid keeps every input dimension."""
        return self.k_in == self.d_in

    @property
    def exact_out(self) -> bool:
        """P_out = I: every output dimension kept, unless that would leave entries of G out entirely (both
        sides full but k < d_out·d_in): then P_out stays Gaussian and the columns are estimated instead."""
        return self.k_out == self.d_out and (not self.exact_in or self.k == self.d_out * self.d_in)

    def __post_init__(self):
        self._orders: dict[tuple, str] = {}  # `_order`, by (positions, groups, conv)
        if self.basis is not None:  # checked once: a given side may be I (calibration's starting sides)
            self._identity = {role: _is_identity(matrix) for role, matrix in self.basis.items()}
        elif self.role == "weight":
            self._identity = {"in": self.exact_in, "out": self.exact_out}
        else:
            self._identity = {"dense": False}

    def identity(self, role: str) -> bool:
        """The side's matrix is I (an exact side, or a given identity basis): it is never multiplied."""
        return self._identity[role]

    def entry_scale(self) -> torch.Tensor:
        """s [k] with E⟨s ⊙ e, s ⊙ e'⟩ = ⟨G, G'⟩ for the kept entries e = vec(P_outᵀ G P_in)[:k].

        Both sides Gaussian: every entry estimates ⟨G, G'⟩, s = 1/sqrt(k). P_out = I: row i of the grid
        estimates ⟨G_i:, G'_i:⟩ from its n_i entries, s = 1/sqrt(n_i); P_in = I: the same by columns.
        """
        if self.basis is not None:  # given (orthonormal) directions: every entry is a coordinate, unscaled
            return torch.ones(self.k)
        index = torch.arange(self.k)
        rows, cols = index // self.k_in, index % self.k_in
        if self.exact_out and self.exact_in:
            count = torch.ones(self.k)
        elif self.exact_out:
            count = torch.bincount(rows)[rows].float()
        elif self.exact_in:
            count = torch.bincount(cols)[cols].float()
        else:
            count = torch.full((self.k,), float(self.k))
        return count.rsqrt()


class FactoredProjector(Projector):
    """φ(z) = [per-parameter blocks] from the hooks' (a, δ); see the module docstring for the math."""

    kind = "factored"

    def __init__(self, denoiser: nn.Module, parameters: dict[str, nn.Parameter], dim: int | None, seed: int = 0,
                 layer_dims: dict | None = None, bases: dict[str, dict[str, torch.Tensor]] | None = None):
        """`bases`: instead of seeded Gaussian matrices, the given ones, per parameter {"out": [d_out, k_out],
        "in": [d_in, k_in]} for a weight (every entry of the k_out × k_in grid is kept, unscaled) or
        {"dense": [numel, k]}; parameters without an entry get no features. `dim` is then their total."""
        owners, excluded = handled_parameters(denoiser, parameters)
        if not owners:
            raise ValueError(
                "the factored projector handles weights and biases of nn.Linear/nn.Conv2d, nn.Embedding tables and "
                f"affine parameters of nn.GroupNorm/nn.LayerNorm, and none of the {len(parameters)} selected "
                "parameters is one "
                f"(e.g. {list(parameters)[:3]}); use projector='gaussian' for them"
            )
        if excluded:
            warnings.warn(
                f"the factored projection leaves out {len(excluded)} of {len(parameters)} selected parameters "
                f"({sum(parameters[n].numel() for n in excluded)} values) that are not Linear/Conv2d weights or "
                f"biases, Embedding tables or GroupNorm/LayerNorm affine parameters: {excluded[:5]}; use "
                "projector='gaussian' to include them",
                stacklevel=2,
            )
        if bases is not None:
            owners = {name: owner for name, owner in owners.items() if name in bases}
        super().__init__({name: parameters[name].shape for name in owners}, dim or 0, seed)
        self.excluded = excluded
        self.bases = bases
        roles = {name: role for name, (_, _, role) in owners.items()}
        dims = _dims(self.shapes, roles, dim, layer_dims) if bases is None else _basis_dims(bases, self.shapes, roles)
        self.modules = {module_name: module for module_name, module, _ in owners.values()}
        self.blocks: dict[str, list[Block]] = {module_name: [] for module_name in self.modules}
        offset = 0
        for name, (module_name, _, role) in owners.items():
            k, k_out, k_in = dims[name]
            basis = None if bases is None else bases[name]
            block = Block(name, module_name, role, tuple(self.shapes[name]), k, k_out, k_in, offset, basis)
            self.blocks[module_name].append(block)
            offset += k
        self.dim = offset
        self._cache: dict[tuple, torch.Tensor] = {}
        self._out: torch.Tensor | None = None
        self._rows: tuple[int, int] = (0, 0)

    # ------------------------------------------------------------------ matrices

    def block(self, name: str) -> Block:
        return next(b for blocks in self.blocks.values() for b in blocks if b.name == name)

    def matrix(self, name: str, role: str, dtype=torch.float32, device="cpu") -> torch.Tensor:
        """`role` "in" (d_in × k_in), "out" (d_out × k_out): N(0, 1), or the identity on an exact side
        (`Block.exact_in`, `exact_out`); "dense" (numel × k): N(0, 1/k)."""
        block = self.block(name)
        if block.basis is not None:
            return block.basis[role].to(device=device, dtype=dtype)
        rows, cols = {"in": (block.d_in, block.k_in), "out": (block.d_out, block.k_out),
                      "dense": (math.prod(block.shape), block.k)}[role]
        if (role == "in" and block.exact_in) or (role == "out" and block.exact_out):
            return torch.eye(rows, dtype=dtype, device=device)
        generator = torch.Generator().manual_seed(
            seed_from(self.seed, "factored", name, block.shape, role, rows, cols)
        )
        matrix = torch.randn(rows, cols, generator=generator, dtype=torch.float32)
        if role == "dense":
            matrix /= math.sqrt(block.k)
        return matrix.to(device=device, dtype=dtype)

    def _matrix(self, block: Block, role: str, device, groups: int = 1) -> torch.Tensor:
        """`matrix` on `device`, cached; role "kernel": P_in as a conv kernel [groups·k_in, C_in/groups, kh, kw]."""
        key = (block.name, role, str(device))
        if key not in self._cache:
            if role == "kernel":
                kernel = self._matrix(block, "in", device).T.reshape(block.k_in, *block.shape[1:])
                self._cache[key] = kernel.repeat(groups, 1, 1, 1)
            elif role == "scale":
                self._cache[key] = block.entry_scale().to(device)
            else:
                self._cache[key] = self.matrix(block.name, role, device=device)
        return self._cache[key]

    def spec(self) -> dict:
        if self.bases is not None:  # the matrices themselves are stored with the features (projection/calibrated.py)
            return {"kind": self.kind, "version": VERSION, "dim": self.dim, "bases": "given",
                    "parameters": {b.name: {"role": b.role, "shape": list(b.shape), "k": b.k, "k_out": b.k_out,
                                            "k_in": b.k_in} for blocks in self.blocks.values() for b in blocks}}
        return {
            "kind": self.kind, "version": VERSION, "dim": self.dim, "seed": self.seed,
            "parameters": {b.name: {"role": b.role, "shape": list(b.shape), "k": b.k, "k_out": b.k_out,
                                    "k_in": b.k_in} for blocks in self.blocks.values() for b in blocks},
            "excluded": list(self.excluded),
        }

    # ------------------------------------------------------------------ features

    def features(self, task: AttributionTask, parameters: dict, inputs: ModelInputs, keys: Sequence) -> torch.Tensor:
        """Hooks on, then per timestep chunk: one forward of B × K' rows, one backward, project (a, δ)."""
        missing = set(self.shapes) - set(parameters)
        if missing:
            raise ValueError(f"the projector was built for parameters that are not selected: {sorted(missing)[:5]}")
        batch = len(keys)
        self._out = torch.zeros(batch, self.dim, dtype=torch.float32, device=inputs.x0.device)
        try:
            with attribution_hooks(self.modules, self._on_gradient) as capture:
                for columns in task.chunks():
                    self._rows = (batch, len(range(task.num_columns)[columns]))
                    capture.backward(task.outputs(inputs, keys, columns).sum())
            return self._out
        finally:
            self._out = None

    def _on_gradient(self, module_name: str, module: nn.Module, a: torch.Tensor, delta: torch.Tensor) -> None:
        batch, per_example = self._rows
        if a.shape[0] != batch * per_example or delta.shape[0] != batch * per_example:
            raise RuntimeError(
                f"{module_name} ran on {a.shape[0]} rows, expected {batch}×{per_example} (example-major); "
                "the factored projector needs every hooked layer to see one row per (example, timestep)"
            )
        autocast = torch.is_autocast_enabled(a.device.type)
        with torch.autocast(a.device.type, enabled=False) if autocast else contextlib.nullcontext():
            a, delta = (a if isinstance(module, nn.Embedding) else a.float()), delta.float()
            for block in self.blocks[module_name]:
                value = _PROJECT[block.role](self, block, module, a, delta, batch)
                self._out[:, block.offset : block.offset + block.k] += value

    def _weight(self, block, module, a, delta, batch):
        """Σ_pos (P_outᵀ δ_pos)(P_inᵀ a_pos)ᵀ per example, first k entries row-major.

        The same product in the cheapest of three orders (`_order`, multiply-adds): both sides projected per
        position, then one outer product per position ("both"); δ projected, Σ_pos (P_outᵀ δ_pos) a_posᵀ
        [k_out, d_in], then · P_in once per example ("out"; for a conv the weight gradient of a convolution
        grouped by example, K' rows as its batch); or a projected, Σ_pos δ_pos (P_inᵀ a_pos)ᵀ [d_out, k_in],
        then P_outᵀ · ("in"). A side whose matrix is I (an exact side, or a given identity basis, such as
        calibration's starting sides) is never multiplied; a conv with P_in = I uses the unfolded patches.
        The orders agree to float rounding (tests/test_factored.py checks each against autograd).
        """
        if isinstance(module, nn.Embedding):  # a: indices [R, ...], δ [R, ..., dim]; W rows are "out"
            p_out = self._matrix(block, "out", a.device)
            looked_up = p_out[a.reshape(batch, -1)]  # [B, n, k_out]: P_outᵀ e_idx
            if module.padding_idx is not None:  # autograd gives the padding row no gradient
                looked_up = looked_up * (a.reshape(batch, -1, 1) != module.padding_idx)
            pd = delta.reshape(batch, -1, block.d_in) @ self._matrix(block, "in", a.device)  # [B, n, k_in]
            product = looked_up.transpose(1, 2) @ pd
        elif isinstance(module, nn.Linear):  # a [R, ..., d_in], δ [R, ..., d_out]: positions in the middle
            a, delta = a.reshape(batch, -1, block.d_in), delta.reshape(batch, -1, block.d_out)  # n = K'·positions
            order = _order(block, a.shape[1], 1)
            if order == "out":
                product = self._out_side(block, delta, a.device).transpose(1, 2) @ a  # [B, k_out, d_in]
                product = self._in_side(block, product, a.device)
            elif order == "in":
                product = delta.transpose(1, 2) @ self._in_side(block, a, a.device)  # [B, d_out, k_in]
                product = self._out_side(block, product.transpose(1, 2), a.device).transpose(1, 2)
            else:
                pa, pd = self._in_side(block, a, a.device), self._out_side(block, delta, a.device)
                product = pd.transpose(1, 2) @ pa
        else:  # Conv2d: a [R, C_in, H, W], δ [R, C_out, H', W']
            groups, rows, output_shape = module.groups, a.shape[0], delta.shape[2:]
            delta = delta.reshape(rows, groups, block.d_out // groups, -1)  # [R, g, d_out/g, positions]
            a, padding = _explicit_padding(module, a)
            order = _order(block, delta.shape[-1] * rows // batch, groups, conv=True)
            if order == "out":  # Σ_pos (P_outᵀ δ) aᵀ per example: the weight gradient of a conv with groups B·g
                pd = self._conv_out_side(block, delta, groups, a.device)  # [R, g, k_out, positions]
                width = _grouped_width(block.k_out)  # zero channels up to a multiple of 8: the fast kernel
                if width > block.k_out:
                    pd = F.pad(pd, (0, 0, 0, width - block.k_out))
                per_row = rows // batch
                pd = pd.reshape(batch, per_row, -1, *output_shape).transpose(0, 1)  # [K', B, g·width, H', W']
                x = a.reshape(batch, per_row, *a.shape[1:]).transpose(0, 1)  # [K', B, C_in, H, W]
                weight_shape = (batch * groups * width, a.shape[1] // groups, *module.kernel_size)
                product = torch.nn.grad.conv2d_weight(
                    x.reshape(per_row, -1, *a.shape[2:]), weight_shape, pd.reshape(per_row, -1, *pd.shape[3:]),
                    module.stride, padding, module.dilation, batch * groups,
                ).reshape(batch, groups, width, block.d_in)[:, :, : block.k_out].sum(1)
                product = self._in_side(block, product, a.device)
            else:
                if block.identity("in"):  # the patches themselves: [R, g, d_in, positions]
                    pa = F.unfold(a, module.kernel_size, module.dilation, padding, module.stride)
                else:  # P_inᵀ a_pos at every position: a convolution with P_in as kernel, per group
                    kernel = self._matrix(block, "kernel", a.device, groups)
                    pa = F.conv2d(a, kernel, None, module.stride, padding, module.dilation, groups)
                pa = pa.reshape(rows, groups, block.k_in, -1)
                if order == "in":  # Σ_pos δ (P_inᵀ a)ᵀ [B, d_out, k_in], then P_outᵀ
                    product = (delta @ pa.transpose(2, 3)).reshape(batch, -1, block.d_out, block.k_in).sum(1)
                    product = self._out_side(block, product.transpose(1, 2), a.device).transpose(1, 2)
                else:  # both projected: Σ_pos (P_outᵀ δ)(P_inᵀ a)ᵀ
                    product = self._conv_out_side(block, delta, groups, a.device) @ pa.transpose(2, 3)
                    product = product.reshape(batch, -1, block.k_out, block.k_in).sum(1)
        return product.flatten(1)[:, : block.k] * self._matrix(block, "scale", a.device)

    def _in_side(self, block, x, device):
        """x [..., d_in] · P_in (nothing on an exact side)."""
        return x if block.identity("in") else x @ self._matrix(block, "in", device)

    def _out_side(self, block, x, device):
        """x [..., d_out] · P_out (nothing on an exact side)."""
        return x if block.identity("out") else x @ self._matrix(block, "out", device)

    def _conv_out_side(self, block, delta, groups, device):
        """δ [R, g, d_out/g, positions] → P_out[group rows]ᵀ δ per group: [R, g, k_out, positions]."""
        if block.identity("out") and groups == 1:
            return delta
        p_out = self._matrix(block, "out", device).reshape(groups, block.d_out // groups, block.k_out)
        return p_out.transpose(1, 2) @ delta

    def _bias(self, block, module, a, delta, batch):
        """P_bᵀ Σ_pos δ_pos."""
        channels_last = not isinstance(module, nn.Conv2d)
        return _per_example(delta, batch, channels_last) @ self._matrix(block, "dense", a.device)

    def _norm(self, block, module, a, delta, batch):
        """GroupNorm/LayerNorm: g_γ = Σ_pos δ ⊙ x̂, g_β = Σ_pos δ, then P_denseᵀ g."""
        if block.role == "norm-weight":
            if isinstance(module, nn.GroupNorm):
                delta = delta * F.group_norm(a, module.num_groups, eps=module.eps)
            else:
                delta = delta * F.layer_norm(a, module.normalized_shape, eps=module.eps)
        if isinstance(module, nn.GroupNorm):
            return _per_example(delta, batch, False) @ self._matrix(block, "dense", a.device)
        numel = math.prod(module.normalized_shape)
        g = delta.reshape(batch, -1, numel).sum(1)
        return g @ self._matrix(block, "dense", a.device)


_PROJECT = {
    "weight": FactoredProjector._weight,
    "bias": FactoredProjector._bias,
    "norm-weight": FactoredProjector._norm,
    "norm-bias": FactoredProjector._norm,
}


def _order(block: Block, positions: int, groups: int, conv: bool = False) -> str:
    key = (positions, groups, conv)
    if key not in block._orders:
        block._orders[key] = _cheapest(block, positions, groups, conv)
    return block._orders[key]


def _cheapest(block: Block, positions: int, groups: int, conv: bool = False) -> str:
    costs = weight_costs(block.d_out, block.d_in, block.k_out, block.k_in, positions, groups, conv,
                         block.identity("in"), block.identity("out"))
    return min(costs, key=costs.get)  # ties: the first, "both"


def weight_costs(d_out: int, d_in: int, k_out: int, k_in: int, positions: int, groups: int = 1, conv: bool = False,
                 identity_in: bool = False, identity_out: bool = False) -> dict[str, float]:
    """Multiply-adds per example of each order of `FactoredProjector._weight` ("both", "out", "in") for a
    k_out × k_in grid, `positions` positions per example (K' rows × positions per row), `groups` conv groups.

    For a conv, "out" is a grouped weight-gradient convolution on k_out rounded up to a multiple of 8
    (`_grouped_width`), slower per multiply-add than the projecting convolution on CPU: its count is
    multiplied by CONV_OUT_ADVANTAGE, so that it is chosen only when it needs that many times fewer (1.5 gave
    the least summed time of the digits UNet's 25 calibrated convs among 1, 1.25, 1.5 and 2: 21.4 ms per
    batch of 160 rows against 20.9 ms for the best order of each; a scratch timing on one core). With P_in = I
    (calibration's starting sides) "both" and "in" unfold the patches instead, which ran 3.2× slower in all
    than that grouped convolution over the digits UNet's convs (69 against 22 ms per batch of 160 rows, one
    CPU core; a scratch timing): their counts are multiplied by UNFOLD_PENALTY.
    The choice changes speed only, never the features (beyond float rounding).
    """
    project_in = 0 if identity_in else groups * d_in * k_in
    project_out = 0 if identity_out else d_out * k_out
    out_width = _grouped_width(k_out) if conv else k_out  # the grouped conv's zero-padded channels
    costs = {
        "both": positions * (project_in + project_out + groups * k_out * k_in),
        "out": positions * (project_out + groups * out_width * d_in) + (0 if identity_in else k_out * d_in * k_in),
        "in": positions * (project_in + d_out * k_in) + (0 if identity_out else d_out * k_out * k_in),
    }
    if conv and not identity_in:
        costs["out"] *= CONV_OUT_ADVANTAGE
    elif conv:
        costs["both"] *= UNFOLD_PENALTY
        costs["in"] *= UNFOLD_PENALTY
    return costs


def _grouped_width(channels: int) -> int:
    """Output channels per group for the grouped weight-gradient conv ("out" order): `channels` rounded up to
    a multiple of GROUPED_CHANNELS. On CPU (oneDNN, torch 2.13) other widths ran 3-5× slower than the next
    multiple of 8 (7 channels: 3.4 ms, 8: 0.8 ms, 28: 4.3 ms, 32: 1.7 ms for 16 examples × 10 rows of
    32 × 8 × 8, one core; a scratch timing); the extra channels are zero and dropped."""
    return -(-channels // GROUPED_CHANNELS) * GROUPED_CHANNELS


def _is_identity(matrix: torch.Tensor) -> bool:
    return matrix.shape[0] == matrix.shape[1] and torch.equal(matrix, torch.eye(len(matrix), dtype=matrix.dtype,
                                                                                 device=matrix.device))


def _explicit_padding(module: nn.Conv2d, a: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(a, padding) such that the conv is `conv2d(a, W, padding=padding)`: a non-zero padding mode, or the
    strings "same" (stride 1; the extra pixel right/bottom, as conv2d does) and "valid", applied to a."""
    if module.padding_mode != "zeros":
        return F.pad(a, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0, 0)
    if isinstance(module.padding, str):
        if module.padding == "same":
            total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size)]
            a = F.pad(a, (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2))
        return a, (0, 0)
    return a, tuple(module.padding)


def _per_example(delta: torch.Tensor, batch: int, channels_last: bool) -> torch.Tensor:
    """Σ over positions and the rows of each example: [R, C, ...] or [R, ..., C] → [B, C]."""
    if channels_last:
        return delta.reshape(batch, -1, delta.shape[-1]).sum(1)
    return delta.reshape(batch, -1, delta.shape[1], math.prod(delta.shape[2:])).sum((1, 3))


# ---------------------------------------------------------------------- which parameters, which dims


def _supported(module: nn.Module) -> str | None:
    """"linear", "conv", "norm", or None for a module whose forward is not the stock torch one."""
    kind = type(module)
    if isinstance(module, nn.Linear) and kind.forward is nn.Linear.forward:
        return "linear"
    if isinstance(module, nn.Embedding) and kind.forward is nn.Embedding.forward and module.max_norm is None:
        return "linear"  # max_norm renormalizes rows in place during the forward: left out
    stock_conv = (kind.forward, getattr(kind, "_conv_forward", None)) == (nn.Conv2d.forward, nn.Conv2d._conv_forward)
    if isinstance(module, nn.Conv2d) and stock_conv:
        return "conv"
    if isinstance(module, nn.GroupNorm) and kind.forward is nn.GroupNorm.forward:
        return "norm"
    if isinstance(module, nn.LayerNorm) and kind.forward is nn.LayerNorm.forward:
        return "norm"
    return None


def handled_parameters(denoiser: nn.Module, parameters: dict[str, nn.Parameter]):
    """{parameter name: (module name, module, role)} for the handled parameters, in `parameters` order,
    and the names of the others (unsupported module, or one tensor shared by several modules)."""
    wanted = {id(p): name for name, p in parameters.items()}
    found: dict[str, list] = {name: [] for name in parameters}
    for module_name, module in denoiser.named_modules():
        for local, p in module.named_parameters(recurse=False):
            if id(p) in wanted:
                found[wanted[id(p)]].append((module_name, module, local))
    owners, excluded = {}, []
    for name, uses in found.items():
        if len(uses) != 1 or _supported(uses[0][1]) is None or uses[0][2] not in ("weight", "bias"):
            excluded.append(name)
            continue
        module_name, module, local = uses[0]
        role = local if _supported(module) != "norm" else f"norm-{local}"
        owners[name] = (module_name, module, role)
    return owners, excluded


def split_dims(sizes: dict[str, int], k: int) -> dict[str, int]:
    """Integers k_p with Σ k_p = k exactly: 1 each, then the rest ∝ sqrt(numel_p), water-filled so that
    k_p ≤ numel_p whenever Σ numel_p ≥ k, rounded by largest remainder (ties in `sizes` order)."""
    names = list(sizes)
    if k < len(names):
        raise ValueError(f"projection_dim={k} is smaller than the number of projected parameters ({len(names)})")
    capped = sum(sizes.values()) >= k
    room = {n: (sizes[n] - 1 if capped else math.inf) for n in names}
    share, free, budget = {}, list(names), float(k - len(names))
    while free:
        weight = sum(math.sqrt(sizes[n]) for n in free)
        full = [n for n in free if budget * math.sqrt(sizes[n]) / weight >= room[n]]
        if not full:
            share.update({n: budget * math.sqrt(sizes[n]) / weight for n in free})
            break
        for n in full:
            share[n] = room[n]
            budget -= room[n]
        free = [n for n in free if n not in full]
    dims = {n: 1 + math.floor(share[n]) for n in names}
    order = sorted(names, key=lambda n: (-(share[n] - math.floor(share[n])), names.index(n)))
    for n in order[: k - sum(dims.values())]:
        dims[n] += 1
    return dims


def weight_dims(k: int, d_out: int, d_in: int) -> tuple[int, int]:
    """(k_out, k_in) with k_out · k_in ≥ k, both ≈ sqrt(k), within (d_out, d_in) when k ≤ d_out·d_in.

    Balanced, because the relative variance of the Kronecker estimate of ⟨G, G'⟩ goes like 1/k_out + 1/k_in;
    the smaller of the two goes to the wider side of W, since projecting a costs d_in·k_in per position and
    projecting δ costs d_out·k_out (a conv's d_in = C_in·kh·kw is usually the wider one). A side clamped to
    its full width (e.g. conv_out with d_out = 1) is exact: P = I there (`FactoredProjector.matrix`).
    """
    small, large = math.isqrt(k), math.ceil(k / max(1, math.isqrt(k)))
    k_in, k_out = (small, large) if d_in >= d_out else (large, small)
    if k > d_out * d_in:  # more features than entries (tiny layers, k > Σ numel): oversample
        return k_out, k_in
    if k_in > d_in:
        k_in, k_out = d_in, math.ceil(k / d_in)
    if k_out > d_out:
        k_out, k_in = d_out, math.ceil(k / d_out)
    return k_out, k_in


def _dims(shapes: dict, roles: dict[str, str], k: int, layer_dims: dict | None) -> dict[str, tuple[int, int, int]]:
    """{name: (k_p, k_out, k_in)}: `layer_dims` (glob → k or [k_out, k_in], first match wins) for the
    parameters it names, `split_dims` of what is left of k for the others."""
    fixed: dict[str, tuple[int, int, int]] = {}
    for name, shape in shapes.items():
        pattern = next((p for p in (layer_dims or {}) if fnmatch.fnmatchcase(name, p)), None)
        if pattern is None:
            continue
        value = layer_dims[pattern]
        if isinstance(value, int):
            fixed[name] = (value, *_grid(value, shape, roles[name]))
        elif roles[name] == "weight" and len(value) == 2:
            fixed[name] = (value[0] * value[1], value[0], value[1])
        else:
            raise ValueError(f"layer_dims[{pattern!r}]={value!r}: use an int, or [k_out, k_in] for a weight ({name})")
    rest = {name: math.prod(shape) for name, shape in shapes.items() if name not in fixed}
    left = k - sum(v[0] for v in fixed.values())
    if (rest and left < len(rest)) or (not rest and left != 0):
        raise ValueError(
            f"layer_dims take {k - left} of projection_dim={k} features, leaving {left} for the "
            f"{len(rest)} other projected parameters; set projection_dim so that every parameter gets at least 1"
            + ("" if rest else f" (here: projection_dim={k - left})")
        )
    split = split_dims(rest, left) if rest else {}
    dims = {name: (split[name], *_grid(split[name], shapes[name], roles[name])) for name in rest}
    return {name: fixed.get(name) or dims[name] for name in shapes}


def _basis_dims(bases: dict, shapes: dict, roles: dict[str, str]) -> dict[str, tuple[int, int, int]]:
    """{name: (k_p, k_out, k_in)} from given matrices, after checking their shapes against the parameters."""
    dims = {}
    for name, shape in shapes.items():
        basis, d_out, d_in = bases[name], shape[0], math.prod(shape[1:])
        if roles[name] == "weight":
            p_out, p_in = basis["out"], basis["in"]
            if p_out.shape[0] != d_out or p_in.shape[0] != d_in:
                raise ValueError(f"basis of {name}: out {tuple(p_out.shape)}, in {tuple(p_in.shape)} do not fit a "
                                 f"weight of shape {tuple(shape)} (d_out={d_out}, d_in={d_in})")
            dims[name] = (p_out.shape[1] * p_in.shape[1], p_out.shape[1], p_in.shape[1])
        else:
            if basis["dense"].shape[0] != math.prod(shape):
                raise ValueError(f"basis of {name}: {tuple(basis['dense'].shape)} does not fit shape {tuple(shape)}")
            dims[name] = (basis["dense"].shape[1], 0, 0)
    return dims


def _grid(k: int, shape, role: str) -> tuple[int, int]:
    return weight_dims(k, shape[0], math.prod(shape[1:])) if role == "weight" else (0, 0)
