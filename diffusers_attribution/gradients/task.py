"""`AttributionTask`: the one abstraction that says how to get a per-sample output from a pipeline.

For example i with timesteps t_1..t_K and D noise draws ε_{i,k,d} per timestep (`config.noise_draws`,
default 1), the task's output is

    F_i(θ) = (1/(K·D)) Σ_k Σ_d f(ε_θ(x_{k,d}, t_k, c_i), target_{i,k,d}, w_{t_k}),   x_{k,d} = add_noise(x0_i, ε_{i,k,d}, t_k)

so that ∇θ F_i is the averaged gradient g(z_i) every TRAK-family method projects. An example has K·D
columns (timestep-major: column c is timestep c // D, draw c % D); all rows of a batch (B examples × the
columns of one chunk) go through the denoiser in one forward pass, example-major.

Noise of draw d at timestep t: `seeded_randn(shape, noise_seed, "noise", [key,] t)` for d = 0 (so one draw
is exactly the single-draw noise), and `seeded_randn(shape, noise_seed, "noise", [key,] t, d)` for d > 0
(`key` only in `per-example` noise mode).
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Sequence

import torch

from ..adapters import ModelInputs, PipelineAdapter
from ..config import AttributionConfig
from ..objectives import OBJECTIVES
from ..seeding import seed_from, seeded_randn


class AttributionTask:
    def __init__(self, adapter: PipelineAdapter, config: AttributionConfig):
        self.adapter = adapter
        self.config = config
        self.objective = OBJECTIVES[config.output]
        adapter.configure(config)  # family options from config.adapter_options; refuses outputs undefined for the family
        self._shared_noise: dict[tuple, torch.Tensor] = {}
        # Outputs recorded per row from the same forward pass as the differentiated one (a method's declared
        # `records`, e.g. DAS's training loss): name → list of [rows] tensors; None: nothing recorded.
        self.records: dict[str, list[torch.Tensor]] | None = None

    @property
    def noise_draws(self) -> int:
        """D: noise draws per timestep."""
        return int(self.config.noise_draws or 1)

    @property
    def num_columns(self) -> int:
        """Columns (rows of the forward pass) per example: K timesteps × D noise draws; `chunks()` slices them."""
        return self.config.num_timesteps * self.noise_draws

    @property
    def timestep_limit(self) -> int:
        """T' = ⌊f·T⌋ (at least 1): the timesteps used lie in [0, T'), f = `config.timestep_fraction` (None: 1)."""
        T, fraction = self.adapter.num_train_timesteps, self.config.timestep_fraction
        return T if fraction is None else max(1, int(fraction * T))

    def timesteps(self, keys: Sequence) -> torch.Tensor:
        """LongTensor [B, K]: the uniform grid t_k = k·⌊T'/K⌋ for every example, or K per-example random draws in
        [0, T') (T' = `timestep_limit`: T unless `timestep_fraction` is set)."""
        T, K = self.timestep_limit, self.config.num_timesteps
        if self.config.timestep_schedule == "uniform":
            grid = torch.arange(K, dtype=torch.long) * (T // K) if K <= T else torch.arange(K) % T
            return grid.expand(len(keys), K).clone()
        rows = []
        for key in keys:
            generator = torch.Generator().manual_seed(seed_from(self.config.noise_seed, "timesteps", key))
            rows.append(torch.randint(0, T, (K,), generator=generator))
        return torch.stack(rows)

    def noise(self, key, timestep: int, shape: torch.Size, draw: int = 0) -> torch.Tensor:
        """ε for (example key, timestep, draw): a function of (noise_seed, t, d) in `shared` mode, else of
        (seed, key, t, d); draw 0 leaves d out of the seed (module docstring)."""
        return draw_noise(shape, self.config.noise_seed, self.config.noise_mode, key, timestep, draw, self._shared_noise)

    def column_noise(self, key, timestep: int, shape: torch.Size, column: int) -> torch.Tensor:
        """ε of column c of an example (timestep c // D, draw c % D); a query's samples (queries.py) override it."""
        return self.noise(key, timestep, shape, column % self.noise_draws)

    def chunks(self) -> list[slice]:
        """Columns evaluated per forward pass: all K·D, or `timestep_chunk_size` (timestep, draw) pairs at a time."""
        size = self.config.timestep_chunk_size or self.num_columns
        return [slice(start, start + size) for start in range(0, self.num_columns, size)]

    def outputs(self, inputs: ModelInputs, keys: Sequence, columns: slice = slice(None)) -> torch.Tensor:
        """[B] per-example outputs summed over the columns `columns`, divided by K·D (so the chunks add up)."""
        draws = self.noise_draws
        selected = range(self.num_columns)[columns]
        timesteps = self.timesteps(keys).repeat_interleave(draws, dim=1)[:, columns]  # column c: timestep c // D
        batch, per_example = timesteps.shape
        shape = inputs.x0.shape[1:]
        noise = torch.stack([self.column_noise(key, int(t), shape, column)
                             for key, row in zip(keys, timesteps) for t, column in zip(row, selected)])
        rows = inputs.repeat_rows(per_example)
        device = rows.x0.device
        t = _to_device(timesteps.flatten(), device)
        noise = _to_device(noise, device).to(rows.x0.dtype)
        x_t = self.adapter.add_noise(rows.x0, noise, t)
        with self._autocast(device):
            prediction = self.adapter.predict(x_t, t, rows.conditioning)
        target = self.adapter.target(rows.x0, noise, t)
        weight = _to_device(self.adapter.timestep_weight(timesteps.flatten()), device)  # from the CPU timesteps
        values = self.objective(prediction, target, weight)
        for name, rows in (self.records or {}).items():
            rows.append(OBJECTIVES[name](prediction.detach(), target, weight).float())
        return values.view(batch, per_example).sum(1) / self.num_columns

    def _autocast(self, device: torch.device):
        if self.config.dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=getattr(torch, self.config.dtype))


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU-drawn tensor on `device`; to CUDA through pinned memory without blocking the host (no sync)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def draw_noise(shape, seed: int, noise_mode: str, key, t: int, draw: int = 0, cache: dict | None = None) -> torch.Tensor:
    """ε for (example key, timestep t, draw d): `seeded_randn(shape, seed, "noise", [key,] t[, d])`, d only if d > 0.

    `shared` mode leaves the key out (and caches the draws in `cache`); `per-example` mode includes it.
    """
    extra = () if draw == 0 else (int(draw),)
    if noise_mode == "per-example":
        return seeded_randn(shape, seed, "noise", key, int(t), *extra)
    cache_key = (int(t), int(draw), tuple(shape))
    if cache is not None and cache_key in cache:
        return cache[cache_key]
    value = seeded_randn(shape, seed, "noise", int(t), *extra)
    if cache is not None:
        cache[cache_key] = value
    return value


def select_parameters(denoiser: torch.nn.Module, config: AttributionConfig) -> dict[str, torch.nn.Parameter]:
    """The parameters whose gradients form the features, by name, in `named_parameters` order.

    `all`: every parameter except LoRA weights; `lora`: the LoRA weights of one adapter
    (`config.adapter_name`, else the active one); a list: glob patterns on parameter names.
    """
    named = dict(denoiser.named_parameters())
    lora_names = [name for name in named if ".lora_" in name]
    if config.parameters == "all":
        selected = [name for name in named if name not in set(lora_names)]
    elif config.parameters == "lora":
        if not lora_names:
            raise ValueError(
                "parameters='lora' but the denoiser has no LoRA weights: load an adapter first "
                "(pipe.load_lora_weights(path, adapter_name=...))"
            )
        adapter = config.adapter_name or _active_adapter(denoiser)
        selected = [name for name in lora_names if _lora_adapter_of(name) == adapter]
        if not selected:
            adapters = sorted({_lora_adapter_of(name) for name in lora_names})
            raise ValueError(f"no LoRA weights for adapter {adapter!r}; the denoiser has adapters {adapters}")
        # peft skips inactive or disabled adapters: their gradients would all be zero
        active = _active_adapters(denoiser)
        if hasattr(denoiser, "active_adapters") and adapter not in active:
            raise ValueError(
                f"LoRA adapter {adapter!r} is loaded but not active (active: {active}); "
                f"activate it first, e.g. pipe.set_adapters({adapter!r})"
            )
        if any(getattr(m, "disable_adapters", False) for m in denoiser.modules() if hasattr(m, "lora_A")):
            raise ValueError("the LoRA layers are disabled (pipe.disable_lora()); enable them with pipe.enable_lora()")
    else:
        selected = [name for name in named if any(fnmatch.fnmatchcase(name, p) for p in config.parameters)]
        if not selected:
            raise ValueError(f"no denoiser parameter matches the patterns {config.parameters}")
    return {name: named[name] for name in selected}


def _lora_adapter_of(name: str) -> str:
    """The adapter a peft LoRA parameter belongs to: `...to_q.lora_A.<adapter>.weight` → `<adapter>`."""
    return name.split(".lora_")[1].split(".")[1]


def _active_adapters(denoiser: torch.nn.Module) -> list[str]:
    active = getattr(denoiser, "active_adapters", None)
    if callable(active):
        active = active()
    return [active] if isinstance(active, str) else list(active or [])


def _active_adapter(denoiser: torch.nn.Module) -> str:
    active = _active_adapters(denoiser)
    if not active:
        raise ValueError("the denoiser has LoRA weights but no active adapter; set config.adapter_name")
    if len(active) > 1:
        raise ValueError(f"several adapters are active ({list(active)}); choose one with config.adapter_name")
    return active[0]


_ACTIVE: dict[int, frozenset] = {}  # id(denoiser) → the parameter ids of the `gradients_only_for` it is inside


@contextlib.contextmanager
def gradients_only_for(denoiser: torch.nn.Module, parameters: dict[str, torch.nn.Parameter]):
    """Inside: eval mode, and `requires_grad` only on `parameters`. On exit, both restored exactly.

    Set after any peft `set_adapter` call, which turns `requires_grad` back on for active adapters. Nested in
    one for the same denoiser and parameters (the featurization loop around its per-batch calls) it does
    nothing: the state is already that one, and the outer block restores it.
    """
    chosen = frozenset(id(p) for p in parameters.values())
    if _ACTIVE.get(id(denoiser)) == chosen:
        yield
        return
    saved_flags = {name: p.requires_grad for name, p in denoiser.named_parameters()}
    saved_training = {name: m.training for name, m in denoiser.named_modules()}
    outer = _ACTIVE.get(id(denoiser))
    try:
        denoiser.eval()
        for p in denoiser.parameters():
            p.requires_grad_(id(p) in chosen)
        _ACTIVE[id(denoiser)] = chosen
        yield
    finally:
        if outer is None:
            _ACTIVE.pop(id(denoiser), None)
        else:
            _ACTIVE[id(denoiser)] = outer
        for name, p in denoiser.named_parameters():
            p.requires_grad_(saved_flags[name])
        for name, module in denoiser.named_modules():
            module.training = saved_training[name]
