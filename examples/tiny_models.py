"""Tiny offline stand-ins for the examples' default run: a text-to-image Stable Diffusion pipeline built from
configs (random weights, a word-level tokenizer, 16x16 RGB images) and a captioned toy dataset of coloured
shapes. They make every example run anywhere in seconds; pass `--model` / `--dataset` for real checkpoints
(`load_training_set` reads a `--dataset`).
"""

from __future__ import annotations

import numpy as np
import torch

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("square", "circle", "cross")
WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "an", "of", "photo", "shape", *COLOURS, *SHAPES]
MAX_TOKENS = 12


def load_training_set(spec: str, num: int | None = None, shuffle: bool = False):
    """A `--dataset`: a `save_to_disk` directory or a Hub dataset id (split "train"); its first `num` rows
    (after a seeded shuffle if `shuffle`)."""
    from pathlib import Path

    import datasets

    dataset = datasets.load_from_disk(spec) if Path(spec).is_dir() else datasets.load_dataset(spec, split="train")
    if shuffle:
        dataset = dataset.shuffle(seed=0)
    return dataset if num is None else dataset.select(range(min(num, len(dataset))))


def word_tokenizer():
    """A CLIP-style tokenizer over `WORDS` (a `transformers.PreTrainedTokenizerFast`, nothing downloaded)."""
    from diffusers_attribution.demo.captioned_digits import word_tokenizer as words_tokenizer

    return words_tokenizer(WORDS, MAX_TOKENS)


def tiny_text_to_image_pipeline(seed: int = 0):
    """A `StableDiffusionPipeline` of ~0.2M random parameters: 16x16 RGB images, 4x8x8 latents, 32-dim text."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_tokenizer()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    vae = AutoencoderKL.from_config(dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 16], layers_per_block=1,
        norm_num_groups=4, sample_size=16, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2))
    unet = UNet2DConditionModel.from_config(dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=[16, 32], layers_per_block=1,
        norm_num_groups=8, attention_head_dim=8, cross_attention_dim=32,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"]))
    torch.random.set_rng_state(generator_state)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def shapes_dataset(n: int = 24, size: int = 16, seed: int = 0):
    """A `datasets.Dataset` of `n` coloured shapes on white ("image": PIL RGB, "text": "a red circle")."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, captions = [], []
    yy, xx = np.mgrid[:size, :size]
    for index in range(n):
        colour = list(COLOURS)[index % len(COLOURS)]
        shape = SHAPES[(index // len(COLOURS)) % len(SHAPES)]
        cy, cx = rng.integers(size // 3, size - size // 3, 2)
        radius = int(rng.integers(size // 5, size // 3))
        if shape == "square":
            mask = (abs(yy - cy) <= radius) & (abs(xx - cx) <= radius)
        elif shape == "circle":
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
        else:
            mask = ((abs(yy - cy) <= radius // 3) | (abs(xx - cx) <= radius // 3)) & \
                   (abs(yy - cy) <= radius) & (abs(xx - cx) <= radius)
        pixels = np.full((size, size, 3), 255, dtype=np.uint8)
        pixels[mask] = COLOURS[colour]
        images.append(Image.fromarray(pixels, mode="RGB"))
        captions.append(f"a {colour} {shape}")
    return datasets.Dataset.from_dict({"image": images, "text": captions},
                                      features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")}))
