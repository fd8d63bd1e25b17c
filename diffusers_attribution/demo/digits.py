"""Embedded real-data default: the sklearn 8x8 handwritten digits and a tiny DDPM.

``sklearn.datasets.load_digits`` ships with scikit-learn (1797 images, no
download), so the demo, tests and benchmarks can train a real diffusion model
on real data in about a minute on a laptop CPU.

    images = load_digits_images()                  # [1797, 1, 8, 8] in [-1, 1]
    pipe = load_or_train_digits_ddpm()             # trains once, then cached
    samples = generate_digits(pipe, n=16, seed=0)  # [16, 1, 8, 8] in [-1, 1]
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.optimization import get_cosine_schedule_with_warmup
from tqdm.auto import tqdm

__all__ = [
    "DigitsRecipe",
    "load_digits_images",
    "load_digits_dataset",
    "train_digits_ddpm",
    "load_or_train_digits_ddpm",
    "load_digits_ddpm",
    "shipped_digits_ddpm_path",
    "generate_digits",
    "save_digit_grid",
    "default_cache_root",
]

NUM_DIGITS = 1797


# --------------------------------------------------------------------------- data


def _digit_indices(n: int | None, seed: int) -> np.ndarray:
    """All indices in dataset order when ``n`` is None, else a seeded random subset."""
    if n is None or n >= NUM_DIGITS:
        return np.arange(NUM_DIGITS)
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    perm = torch.randperm(NUM_DIGITS, generator=torch.Generator().manual_seed(seed))
    return perm[:n].numpy()


def load_digits_images(
    n: int | None = None, seed: int = 0, return_labels: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The sklearn digits as a float32 tensor [N, 1, 8, 8] scaled from 0..16 to [-1, 1].

    ``n=None`` gives all 1797 images in dataset order; otherwise a random subset of
    ``n`` chosen with ``seed``. With ``return_labels`` also returns the int64 labels.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = _digit_indices(n, seed)
    images = torch.from_numpy(digits.images[idx]).float()
    images = (images / 8.0 - 1.0).unsqueeze(1).contiguous()
    if return_labels:
        return images, torch.from_numpy(digits.target[idx]).long()
    return images


def load_digits_dataset(n: int | None = None, seed: int = 0):
    """The same images as a ``datasets.Dataset`` with "image" (PIL 'L') and "label" columns."""
    import datasets
    from PIL import Image

    images, labels = load_digits_images(n, seed, return_labels=True)
    pixels = ((images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": labels.tolist()},
        features=features,
    )


# ------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class DigitsRecipe:
    """Training recipe for the digits DDPM (UNet2DModel ~164k params, epsilon prediction)."""

    # UNet2DModel
    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    down_block_types: tuple[str, ...] = ("DownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "UpBlock2D")
    add_attention: bool = True  # the single attention block sits in the mid block
    attention_head_dim: int = 8
    norm_num_groups: int = 8
    # DDPMScheduler
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    # optimisation
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    lr_warmup_steps: int = 50
    batch_size: int = 128
    num_steps: int = 1200
    ema_decay: float | None = None  # e.g. 0.999; None disables EMA
    seed: int = 0

    def make_unet(self) -> UNet2DModel:
        return UNet2DModel(
            sample_size=8,
            in_channels=1,
            out_channels=1,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            down_block_types=tuple(self.down_block_types),
            up_block_types=tuple(self.up_block_types),
            add_attention=self.add_attention,
            attention_head_dim=self.attention_head_dim,
            norm_num_groups=self.norm_num_groups,
        )

    def make_scheduler(self) -> DDPMScheduler:
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type="epsilon",
        )

    def cache_key(self, n_train: int | None = None) -> str:
        """Short stable hash of the recipe (and training-set size)."""
        payload = json.dumps({**asdict(self), "n_train": n_train}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------- training


def epoch_batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches, reshuffled every epoch (last partial batch dropped)."""
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield perm[start : start + batch_size]


def train_digits_ddpm(
    images: torch.Tensor,
    recipe: DigitsRecipe = DigitsRecipe(),
    progress: bool = True,
    losses: list[float] | None = None,
) -> DDPMPipeline:
    """Train a DDPM on ``images`` [N, 1, 8, 8] in [-1, 1]; deterministic given ``recipe.seed``.

    Per-step training losses are appended to ``losses`` when a list is passed.
    """
    images = images.float()
    with torch.random.fork_rng(devices=[]):  # seed the init without touching global RNG
        torch.manual_seed(recipe.seed)
        unet = recipe.make_unet()
    scheduler = recipe.make_scheduler()
    generator = torch.Generator().manual_seed(recipe.seed)

    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay
    )
    lr_schedule = get_cosine_schedule_with_warmup(optimizer, recipe.lr_warmup_steps, recipe.num_steps)
    ema = [p.detach().clone() for p in unet.parameters()] if recipe.ema_decay else None

    unet.train()
    batches = epoch_batches(len(images), recipe.batch_size, generator)
    bar = tqdm(range(recipe.num_steps), desc="train digits DDPM", disable=not progress)
    running = None
    for step in bar:
        x0 = images[next(batches)]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)

        loss = F.mse_loss(unet(noisy, t).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()

        if ema is not None:
            decay = min(recipe.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, unet.parameters()):
                    e.lerp_(p, 1 - decay)

        value = loss.item()
        if losses is not None:
            losses.append(value)
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 20 == 0 or step == recipe.num_steps - 1:
            bar.set_postfix(loss=f"{running:.4f}")

    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, unet.parameters()):
                p.copy_(e)
    unet.eval()
    return DDPMPipeline(unet=unet, scheduler=scheduler)


# -------------------------------------------------------------------------- cache


def default_cache_root() -> Path:
    return Path("~/.cache/diffusers_attribution").expanduser()


def load_or_train_digits_ddpm(
    cache_dir: str | os.PathLike | None = None,
    recipe: DigitsRecipe = DigitsRecipe(),
    n_train: int | None = None,
    progress: bool = True,
) -> DDPMPipeline:
    """Load the digits DDPM from ``<cache_dir>/digits-ddpm-<hash>``, training it on a miss.

    ``cache_dir`` defaults to ``~/.cache/diffusers_attribution``; the hash covers the
    recipe and ``n_train`` (trained on ``load_digits_images(n_train)``). The pipeline is
    written to a temporary directory and moved into place atomically.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    target = root / f"digits-ddpm-{recipe.cache_key(n_train)}"
    if (target / "model_index.json").exists():
        return DDPMPipeline.from_pretrained(target)

    pipe = train_digits_ddpm(load_digits_images(n_train), recipe, progress=progress)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    try:
        pipe.save_pretrained(tmp)
        (tmp / "digits_recipe.json").write_text(
            json.dumps({**asdict(recipe), "n_train": n_train}, indent=2)
        )
        os.replace(tmp, target)
    except OSError:
        if not (target / "model_index.json").exists():  # a concurrent writer may have won
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return DDPMPipeline.from_pretrained(target)


def shipped_digits_ddpm_path() -> Path:
    """The digits DDPM shipped with the package (`assets/digits-ddpm`, safetensors + JSON configs, ~0.7 MB):
    `train_digits_ddpm(load_digits_images(), DigitsRecipe())` on one CPU thread (tests/test_shipped_weights.py
    retrains it and compares)."""
    from importlib.resources import files

    return Path(str(files("diffusers_attribution") / "assets" / "digits-ddpm"))


def load_digits_ddpm(retrain: bool = False, cache_dir: str | os.PathLike | None = None,
                     progress: bool = True) -> DDPMPipeline:
    """The demo's digits DDPM: the shipped weights (no training), or with `retrain=True` the recipe's own
    training run (`load_or_train_digits_ddpm`, cached in `cache_dir`)."""
    if retrain:
        return load_or_train_digits_ddpm(cache_dir=cache_dir, progress=progress)
    path = shipped_digits_ddpm_path()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"the shipped digits DDPM is missing from {path} (a broken install?): "
                                "reinstall the package, or retrain it with retrain=True (demo --retrain)")
    return DDPMPipeline.from_pretrained(path)


# ------------------------------------------------------------------------ sampling


@torch.no_grad()
def generate_digits(
    pipe: DDPMPipeline, n: int, seed: int = 0, num_inference_steps: int = 50
) -> torch.Tensor:
    """Sample ``n`` digits with deterministic DDIM (eta=0); returns [n, 1, 8, 8] in [-1, 1]."""
    unet = pipe.unet
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    cfg = unet.config
    x = torch.randn(
        (n, cfg.in_channels, cfg.sample_size, cfg.sample_size),
        generator=torch.Generator().manual_seed(seed),
    ).to(device=unet.device, dtype=unet.dtype)
    was_training = unet.training
    unet.eval()
    for t in scheduler.timesteps:
        eps = unet(x, t).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    unet.train(was_training)
    return x.float().clamp(-1, 1).cpu()


def save_digit_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 4):
    """Save [N, 1, 8, 8] images in [-1, 1] as a PNG grid (white digits on black)."""
    from PIL import Image

    imgs = ((images[:, 0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    n, h, w = imgs.shape
    ncol = min(nrow, n)
    rows = (n + ncol - 1) // ncol
    grid = torch.zeros(rows * (h + 1) + 1, ncol * (w + 1) + 1, dtype=torch.uint8) + 64
    for i, img in enumerate(imgs):
        r, c = divmod(i, ncol)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w] = img
    pil = Image.fromarray(grid.numpy(), mode="L")
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    pil.save(path)
    return path
