"""Recipes for the retraining harness: how to train one model on a training subset.

A recipe is anything with `train(data, seed) -> pipeline` and, optionally, `describe() -> dict` (recorded in
harness.json, so that a rerun with another recipe is refused). `as_recipe` turns a `demo.digits.DigitsRecipe`
or a plain training function into one. `LoraTextToImageRecipe` fine-tunes a LoRA on a fixed text-to-image base
pipeline the way diffusers' examples/text_to_image/train_text_to_image_lora.py does.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Mapping

import torch


@dataclass(frozen=True)
class DigitsTrainingRecipe:
    """`digits.DigitsRecipe` as a harness recipe: `train(images, seed)` = `train_digits_ddpm` with that seed."""

    recipe: Any = None  # digits.DigitsRecipe; None = the default recipe
    progress: bool = False

    def _recipe(self):
        from ..demo.digits import DigitsRecipe

        return self.recipe if self.recipe is not None else DigitsRecipe()

    def train(self, data: torch.Tensor, seed: int):
        from ..demo.digits import train_digits_ddpm

        return train_digits_ddpm(torch.as_tensor(data), replace(self._recipe(), seed=int(seed)), progress=self.progress)

    def describe(self) -> dict[str, Any]:
        recipe = asdict(self._recipe())
        recipe.pop("seed")  # the harness's seeds replace it
        return {"kind": "digits-ddpm", **recipe}


@dataclass(frozen=True)
class LoraTextToImageRecipe:
    """A LoRA fine-tune of a text-to-image pipeline's UNet, as diffusers' `train_text_to_image_lora.py` does it.

    `train(data, seed)`: a copy of the base pipeline (built once by `base()`, never modified: every retraining
    starts from the same base weights) with `unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank,
    init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))`; only the LoRA weights
    train (float32), with AdamW and `diffusers.optimization.get_scheduler(lr_scheduler)`. Each step: a batch of
    `batch_size` examples (reshuffled every epoch, last partial batch dropped), latents
    `(vae.encode(x).latent_dist.sample() - shift) * scaling_factor`, noise, uniform timesteps,
    `DDPMScheduler.add_noise`, the text encoder's hidden states of the caption, MSE of the UNet's output to the
    epsilon (or v) target of the scheduler's `prediction_type`, gradients clipped to `max_grad_norm`.

    `data`: anything `data.TrainingData` reads with a caption per example: a list of `(image, caption)` pairs
    (image tensors in [-1, 1] or PIL images at the base's resolution), a `datasets.Dataset` with image and
    text columns, ... The model is a pure function of (base weights, data, seed): the LoRA initialisation, the
    batches, latents, noise and timesteps are all drawn from generators seeded by `seed`. Not implemented from the
    script: random flips / crops (the images are used as given), `noise_offset`, `snr_gamma`, mixed precision.

    base: a callable returning the base pipeline (default: `demo.captioned_digits.tiny_captioned_sd_pipeline`);
    it must be deterministic (same weights every call): `describe()` records a digest of its weights.
    """

    base: Any = None
    rank: int = 8
    learning_rate: float = 1e-3
    batch_size: int = 16
    num_steps: int = 200
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    prediction_type: str | None = None  # None: the base scheduler's
    adapter_name: str = "default"
    progress: bool = False

    def base_pipeline(self):
        """The base pipeline (built on first use, then kept: retrainings copy its UNet, share the rest)."""
        cached = self.__dict__.get("_base")
        if cached is None:
            if self.base is None:
                from ..demo.captioned_digits import tiny_captioned_sd_pipeline

                cached = tiny_captioned_sd_pipeline()
            else:
                cached = self.base()
            object.__setattr__(self, "_base", cached)
        return cached

    def train(self, data: Any, seed: int):
        import torch.nn.functional as F
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig

        from ..data import TrainingData
        from ..demo.digits import epoch_batches

        base = self.base_pipeline()
        unet = copy.deepcopy(base.unet)
        unet.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # peft's gaussian init draws from the global RNG
            torch.manual_seed(int(seed))
            unet.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.rank, init_lora_weights="gaussian",
                                        target_modules=["to_k", "to_q", "to_v", "to_out.0"]),
                             adapter_name=self.adapter_name)
        params = [p for name, p in unet.named_parameters() if ".lora_" in name]
        for p in params:
            p.data = p.data.float()
            p.requires_grad_(True)
        components = {**base.components, "unet": unet,
                      "scheduler": type(base.scheduler).from_config(base.scheduler.config)}
        pipe = type(base)(**components)
        pipe.set_progress_bar_config(disable=True)

        vae, text_encoder, tokenizer = base.vae, base.text_encoder, base.tokenizer
        device = unet.device
        examples = TrainingData(data)
        images, captions = examples.batch(range(len(examples)))
        if any(caption is None for caption in captions):
            raise ValueError("LoraTextToImageRecipe needs a caption for every training example")
        with torch.no_grad():  # frozen encoders: the latent distributions and caption states, computed once
            posterior = vae.encode(images.to(device, vae.dtype)).latent_dist
            mean, std = posterior.mean.float(), posterior.std.float()
            ids = tokenizer(list(captions), max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="pt").input_ids.to(device)
            states = text_encoder(ids, return_dict=False)[0].to(unet.dtype)
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        scale = vae.config.scaling_factor
        noise_scheduler = DDPMScheduler.from_config(base.scheduler.config)
        prediction_type = self.prediction_type or noise_scheduler.config.prediction_type
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, betas=(self.adam_beta1, self.adam_beta2),
                                      weight_decay=self.adam_weight_decay, eps=self.adam_epsilon)
        schedule = get_scheduler(self.lr_scheduler, optimizer=optimizer, num_warmup_steps=self.lr_warmup_steps,
                                 num_training_steps=self.num_steps)
        generator = torch.Generator().manual_seed(int(seed))
        batches = epoch_batches(len(examples), self.batch_size, generator)
        unet.train()
        for step in range(self.num_steps):
            index = next(batches)
            sample = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator).to(device)
            latents = (sample - shift) * scale
            noise = torch.randn(latents.shape, generator=generator).to(device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(index),),
                                      generator=generator).to(device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if prediction_type == "epsilon":
                target = noise
            elif prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                raise ValueError(f"unsupported prediction_type {prediction_type!r} (epsilon or v_prediction)")
            prediction = unet(noisy.to(unet.dtype), timesteps, states[index], return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if self.progress and (step % 50 == 0 or step == self.num_steps - 1):
                print(f"  LoRA step {step + 1}/{self.num_steps}: loss {loss.item():.4f}", flush=True)
        unet.eval()
        unet.requires_grad_(False)
        return pipe

    def describe(self) -> dict[str, Any]:
        from ..fingerprint import tensor_digest

        base = self.base_pipeline()
        named = [(f"{part}.{name}", p) for part in ("unet", "text_encoder", "vae")
                 for name, p in getattr(base, part).named_parameters()]
        fields = {name: value for name, value in asdict(self).items() if name not in ("base", "progress")}
        return {"kind": "lora-text-to-image", "base": _callable_name(self.base), "base_weights": tensor_digest(named),
                **fields}


def _callable_name(fn: Any) -> str:
    """`module.qualname` of a base builder (with a `functools.partial`'s arguments); no memory addresses."""
    if fn is None:
        return "diffusers_attribution.demo.captioned_digits.tiny_captioned_sd_pipeline"
    func = getattr(fn, "func", None)
    if func is not None and hasattr(fn, "keywords"):  # functools.partial
        arguments = [repr(a) for a in fn.args] + [f"{k}={v!r}" for k, v in sorted(fn.keywords.items())]
        return f"{_callable_name(func)}({', '.join(arguments)})"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


class FunctionRecipe:
    """A user training function as a recipe: `fn(data, seed) -> pipeline` (or `fn(data)`: then `seed` is ignored
    and all training seeds give the same model — pass one seed). `description` is recorded in harness.json."""

    def __init__(self, fn: Callable, description: Mapping[str, Any] | None = None):
        self.fn = fn
        self.description = dict(description or {})
        try:
            parameters = inspect.signature(fn).parameters
            self._takes_seed = len(parameters) >= 2 or "seed" in parameters or any(
                p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters.values())
        except (TypeError, ValueError):
            self._takes_seed = True

    def train(self, data: Any, seed: int):
        return self.fn(data, seed) if self._takes_seed else self.fn(data)

    def describe(self) -> dict[str, Any]:
        name = f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', type(self.fn).__name__)}"
        return {"kind": "function", "function": name, **self.description}


def as_recipe(recipe: Any):
    """A harness recipe from a recipe object (`.train`), a `digits.DigitsRecipe`, or a training function."""
    from ..demo.digits import DigitsRecipe

    if isinstance(recipe, DigitsRecipe):
        return DigitsTrainingRecipe(recipe)
    if hasattr(recipe, "train") and callable(recipe.train):
        return recipe
    if callable(recipe):
        return FunctionRecipe(recipe)
    raise TypeError(f"a recipe needs a train(data, seed) method or must be callable, got {type(recipe).__name__}")


def describe_recipe(recipe: Any) -> dict[str, Any]:
    describe = getattr(recipe, "describe", None)
    if callable(describe):
        return dict(describe())
    return {"kind": type(recipe).__qualname__}
