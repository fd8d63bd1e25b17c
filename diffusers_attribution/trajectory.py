"""Per-step attribution of a sampling trajectory: Journey-TRAK (Georgiev et al., "The Journey, Not the Destination", 2023).

Run the sampler and record, at every step s (timestep t_s), the scheduler's prediction of the clean sample
x̂0^(s) (`pred_original_sample` of its step output; if the scheduler gives none, x̂0 is derived from the
model output with the DDPM formulas: ε → (x_t - sqrt(1-ᾱ_t) ε̂)/sqrt(ᾱ_t), v → sqrt(ᾱ_t) x_t - sqrt(1-ᾱ_t) v̂;
flow matching (SD3, Flux): x̂0 = x_σ - σ v̂, at the training index whose σ is nearest the step's).
Step s is attributed as a query with the output

    f_s(θ) = (1/R) Σ_r loss(ε_θ(add_noise(x̂0^(s), ε_r, t_s), t_s, c), ε_r)      ε_r fresh, r < R

(R = `config.query_noise_draws`), projected like the training features (for a store whose method normalizes
each pair, DAS's, each pair's ψ / ‖ψ‖), and scored with the store's own method's scorer (for Journey-TRAK's,
TRAK's and D-TRAK's stores τ_s = φ_s (ΦᵀΦ + λI)⁻¹ Φᵀ; DAS's with its residual weights; the projected Fisher's
with F). Result: scores [S, N]. Noise ε_r of step s: `task.draw_noise` with key
f"step:{s}" in per-example mode, i.e. `seeded_randn(shape, noise_seed, "noise", f"step:{s}", t_s[, r])`.
The training features are ordinary TRAK features (Journey-TRAK's own: 20 random timesteps per example).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any

import torch

from .adapters import ModelInputs
from .config import AttributionConfig
from .featurize import Featurizer
from .gradients.timesteps import timestep_features
from .methods.base import get_method, method_names
from .result import AttributionResult


@dataclass
class JourneyResult(AttributionResult):
    """`scores` [S, N]: row s attributes sampling step s. `timesteps` [S]; `x0_hats` [S, ...] the recorded
    x̂0 in the denoiser's space (latents for latent pipelines); `query_images` [S, C, H, W] x̂0 as images;
    `final_image` [C, H, W] in [-1, 1], the sampler's output."""

    timesteps: torch.Tensor | None = None
    x0_hats: torch.Tensor | None = None
    final_image: torch.Tensor | None = None

    def top_examples(self, k: int = 5, standardize: bool = True) -> torch.Tensor:
        """The k training examples with the highest score at any step (scores divided by their standard
        deviation over the training set at each step when `standardize`), best first."""
        scores = self._curves(standardize)
        return scores.max(dim=0).values.topk(min(k, scores.shape[1])).indices

    def _curves(self, standardize: bool) -> torch.Tensor:
        if not standardize:
            return self.scores
        return self.scores / self.scores.std(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)

    def plot(self, k: int = 5, path: str | os.PathLike | None = None, standardize: bool = True,
             train_dataset: Any = None, title: str | None = None):
        """A matplotlib `Figure` (Agg; no pyplot state): a strip of x̂0 over the steps, and the per-step scores of
        the top-k training examples (`top_examples`) against the step, with their images if `train_dataset`."""
        from matplotlib.figure import Figure

        from .plotting import image_array

        indices = self.top_examples(k, standardize).tolist()
        curves = self._curves(standardize)
        steps = torch.arange(len(self.scores))
        shown = torch.linspace(0, len(steps) - 1, min(8, len(steps))).round().long().tolist()
        extra = 1 if train_dataset is not None else 0
        figure = Figure(figsize=(8, 5.5 + 1.2 * extra))
        grid = figure.add_gridspec(2 + extra, max(len(shown), len(indices)), height_ratios=[1, 3.5] + [1] * extra)
        for column, s in enumerate(shown):
            ax = figure.add_subplot(grid[0, column])
            if self.query_images is not None:
                ax.imshow(image_array(self.query_images[s]), cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"x̂0, t={int(self.timesteps[s])}", fontsize=7)
            ax.axis("off")
        ax = figure.add_subplot(grid[1, :])
        colors = [f"C{i % 10}" for i in range(len(indices))]
        for color, index in zip(colors, indices):
            ax.plot(steps.numpy(), curves[:, index].numpy(), color=color, label=f"train #{index}")
        ax.axhline(0, color="gray", linewidth=0.5)
        ax.set_xticks(shown, [f"{s}\nt={int(self.timesteps[s])}" for s in shown], fontsize=7)
        ax.set_xlabel("sampling step")
        ax.set_ylabel("score / std over training set" if standardize else "score")
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title(title or "Journey-TRAK: per-step attribution of the top training examples", fontsize=9)
        if train_dataset is not None:
            from .data import as_training_data

            data = as_training_data(train_dataset)
            for column, (color, index) in enumerate(zip(colors, indices)):
                thumb = figure.add_subplot(grid[2, column])
                thumb.imshow(image_array(data[index][0]), cmap="gray", vmin=0, vmax=1)
                thumb.set_title(f"#{index}", fontsize=7, color=color)
                thumb.set_xticks([])
                thumb.set_yticks([])
                for spine in thumb.spines.values():
                    spine.set_edgecolor(color)
                    spine.set_linewidth(2)
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=120)
        return figure


class StepRecorder:
    """Inside `with StepRecorder(pipe) as steps:`, every `pipe.scheduler.step` call appends (t, x̂0) to `steps`."""

    def __init__(self, pipe, adapter):
        self.pipe = pipe
        self.adapter = adapter
        self.records: list[tuple[int, torch.Tensor]] = []

    def __enter__(self) -> list[tuple[int, torch.Tensor]]:
        scheduler = self.pipe.scheduler
        original = scheduler.step

        def step(model_output, timestep, sample, *args, **kwargs):
            output = original(model_output, timestep, sample, *args, **kwargs)
            if self.adapter.prediction_type == "flow":
                self.records.append(self.flow_x0(model_output, float(timestep), sample))
                return output
            if isinstance(output, tuple):
                x0 = output[1] if len(output) > 1 else None
            else:
                x0 = getattr(output, "pred_original_sample", None)
            if x0 is None:
                x0 = self.derive_x0(model_output, int(round(float(timestep))), sample)
            self.records.append((int(round(float(timestep))), x0.detach().clone()))
            return output

        scheduler.step = step
        return self.records

    def __exit__(self, *exc) -> None:
        self.pipe.scheduler.__dict__.pop("step", None)

    def flow_x0(self, velocity: torch.Tensor, timestep: float, sample: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Rectified flow: x_σ = (1 - σ) x0 + σ ε and v = ε - x0, so x̂0 = x_σ - σ v̂, with σ = timestep / T (the
        flow-matching schedulers' timesteps are σ·T); recorded at the training index t whose σ_t is nearest."""
        sigma = timestep / self.adapter.num_train_timesteps
        index = int((self.adapter.sigmas - sigma).abs().argmin())
        x0 = sample.float() - sigma * velocity[:, : sample.shape[1]].float()
        return index, x0.to(sample.dtype).detach().clone()

    def derive_x0(self, model_output: torch.Tensor, t: int, sample: torch.Tensor) -> torch.Tensor:
        model_output = model_output[:, : sample.shape[1]]
        abar = self.adapter.noise_scheduler.alphas_cumprod[t].to(sample.device, sample.dtype)
        kind = self.adapter.prediction_type
        if kind == "epsilon":
            return (sample - (1 - abar).sqrt() * model_output) / abar.sqrt()
        if kind == "v_prediction":
            return abar.sqrt() * sample - (1 - abar).sqrt() * model_output
        return model_output


def attribute_trajectory(
    pipe,
    prompt_or_seed: str | int,
    train_data: Any,
    config: AttributionConfig | None = None,
    num_inference_steps: int = 50,
    *,
    seed: int = 0,
    progress: bool = True,
    **pipeline_kwargs,
) -> JourneyResult:
    """Per-step attribution of one sample: scores [num steps, N] (module docstring).

    Args:
        prompt_or_seed: a prompt (text-conditioned pipelines; sampled with `seed`), or an int seed
            (unconditional pipelines, or an empty prompt).
        train_data: a `FeatureStore` (or its directory) of a kernel method, or a training set to featurize.
        config: default `AttributionConfig(method="journey-trak")`; with a store, the store's config is used.
        pipeline_kwargs: passed to `pipe(...)` (e.g. `guidance_scale`, `height`, `width`).
    """
    from .api import featurize_and_store

    featurizer, store = featurize_and_store(pipe, train_data, config or AttributionConfig(method="journey-trak"),
                                            given_config=config is not None, progress=progress)
    config = store.config
    method = get_method(config.method)
    if not method.per_step_queries:
        accepted = [name for name in method_names() if get_method(name).per_step_queries]
        raise ValueError(f"per-step attribution scores gradient features of one sampling step; the store's method "
                         f"{config.method!r} does not take them (methods that do: {accepted})")

    prompt = prompt_or_seed if isinstance(prompt_or_seed, str) else None
    seed = seed if prompt is not None else int(prompt_or_seed)
    final, records = _sample(pipe, featurizer.adapter, prompt, seed, num_inference_steps, pipeline_kwargs, progress)
    timesteps = torch.tensor([t for t, _ in records], dtype=torch.long)
    x0_hats = torch.cat([x0[:1] for _, x0 in records])
    conditioning = _conditioning(featurizer, prompt)
    inputs = ModelInputs(
        x0_hats.to(featurizer.adapter.device), {k: v.expand(len(records), *v.shape[1:]) for k, v in conditioning.items()}
    )
    draws = config.query_noise_draws or 1
    keys = [f"step:{s}" for s in range(len(records))]
    normalize = (method.query_reduction or method.reduction) == "unit-pairs"  # DAS: each pair's ψ / ‖ψ‖
    phi = timestep_features(featurizer, inputs, keys, timesteps[:, None], draws, normalize=normalize,
                            noise_mode="per-example").features
    scorer = method.scorer(store)
    return JourneyResult(
        scores=scorer.scores(phi),
        config=config,
        query_images=_to_images(featurizer.adapter, x0_hats),
        metadata={**scorer.metadata, "prompt": prompt, "seed": seed, "num_inference_steps": num_inference_steps,
                  "noise_draws": draws, "example_hashes": store.example_hashes},
        timesteps=timesteps,
        x0_hats=x0_hats.float().cpu(),
        final_image=final,
    )


def _sample(pipe, adapter, prompt, seed, steps, pipeline_kwargs, progress) -> tuple[torch.Tensor, list]:
    takes_prompt = "prompt" in inspect.signature(pipe.__call__).parameters
    if prompt is not None and not takes_prompt:
        raise ValueError(f"{type(pipe).__name__} is unconditional: pass an int seed, not a prompt")
    kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(seed), "output_type": "pt",
              **pipeline_kwargs}
    if takes_prompt:
        kwargs["prompt"] = prompt or ""
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    if not progress:
        pipe.set_progress_bar_config(disable=True)
    try:
        with StepRecorder(pipe, adapter) as records:
            output = pipe(**kwargs)
    finally:
        pipe._progress_bar_config = saved
    images = output.images if hasattr(output, "images") else output[0]
    final = torch.as_tensor(images[0]).float().cpu()
    if final.ndim == 3 and final.shape[-1] in (1, 3) and final.shape[0] not in (1, 3):  # HWC
        final = final.permute(2, 0, 1)
    return final * 2 - 1, records


def _conditioning(featurizer: Featurizer, prompt: str | None) -> dict[str, torch.Tensor]:
    """The conditioning tensors of `prompt` as the adapter builds them for a training example."""
    adapter = featurizer.adapter
    blank = torch.zeros(1, *adapter.expected_image_shape())
    return adapter.encode(blank, [prompt], ["journey"], featurizer.config.noise_seed).conditioning


@torch.no_grad()
def _to_images(adapter, x0_hats: torch.Tensor) -> torch.Tensor:
    """x̂0 → images [S, C, H, W] in [-1, 1] (decoded with the VAE for latent pipelines)."""
    vae = getattr(adapter.pipe, "vae", None)
    if vae is None:
        return x0_hats.float().clamp(-1, 1).cpu()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = x0_hats.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
    return torch.cat([vae.decode(latents[i : i + 8]).sample for i in range(0, len(latents), 8)]).float().clamp(-1, 1).cpu()
