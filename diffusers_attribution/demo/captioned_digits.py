"""Captioned, styled digits and a tiny Stable Diffusion pipeline built from configs: the LoRA LDS benchmark's data.

scikit-learn's 8x8 digits become RGB images (upsampled to `size`) with a foreground colour and a dark or light
background drawn from a seed, and a caption that names all three, so that the text matters for generation:

    data = captioned_digits(500, seed=0)          # [(image [3, 16, 16] in [-1, 1], "a red digit 3 on a dark background"), ...]
    pipe = tiny_captioned_sd_pipeline(seed=0)     # a StableDiffusionPipeline of random weights, 16x16 RGB, offline

The pipeline's tokenizer is word-level over `CAPTION_WORDS`; nothing is downloaded.
"""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["COLOURS", "BACKGROUNDS", "CAPTION_WORDS", "captioned_digits", "caption_of", "word_tokenizer",
           "tiny_captioned_sd_pipeline"]

# Foreground colours (RGB in [0, 1]) and backgrounds; each example draws one of each from its seed.
COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.75, 0.25), "blue": (0.2, 0.35, 0.95),
           "yellow": (0.95, 0.85, 0.15), "white": (1.0, 1.0, 1.0), "purple": (0.6, 0.2, 0.8)}
BACKGROUNDS = {"dark": (0.05, 0.05, 0.1), "light": (0.85, 0.85, 0.8)}
CAPTION_WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "digit", "on", "background", *COLOURS, *BACKGROUNDS,
                 *[str(d) for d in range(10)]]
MAX_TOKENS = 10


def caption_of(digit: int, colour: str, background: str) -> str:
    return f"a {colour} digit {int(digit)} on a {background} background"


def captioned_digits(n: int | None = None, seed: int = 0, size: int = 16, style_seed: int | None = None,
                     offset: int = 0) -> list[tuple[torch.Tensor, str]]:
    """`n` styled digits as (image float32 [3, size, size] in [-1, 1], caption) pairs.

    The digits are `load_digits_images(offset + n, seed)[offset:]` (a seeded permutation of the 1797: the first
    `offset` are left to another set, e.g. the training set); each example's colour and background are drawn
    from `style_seed` (default `seed`) and its position in the permutation, so a prefix keeps its styles.
    """
    from .digits import NUM_DIGITS, load_digits_images

    total = NUM_DIGITS if n is None else offset + n
    images, labels = load_digits_images(total, seed=seed, return_labels=True)
    images, labels = images[offset:], labels[offset:]
    generator = torch.Generator().manual_seed(seed if style_seed is None else style_seed)
    styles = torch.randint(0, len(COLOURS) * len(BACKGROUNDS), (total,), generator=generator)[offset:]
    ink = ((images + 1) / 2).clamp(0, 1)  # [n, 1, 8, 8] in [0, 1]
    ink = torch.nn.functional.interpolate(ink, size=(size, size), mode="nearest")
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    out = []
    for pixels, label, style in zip(ink, labels.tolist(), styles.tolist()):
        colour, background = colours[style % len(colours)], backgrounds[style // len(colours)]
        fg = torch.tensor(COLOURS[colour]).view(3, 1, 1)
        bg = torch.tensor(BACKGROUNDS[background]).view(3, 1, 1)
        rgb = bg + pixels * (fg - bg)  # [3, size, size] in [0, 1]
        out.append(((rgb * 2 - 1).contiguous(), caption_of(label, colour, background)))
    return out


def word_tokenizer(words: Sequence[str] = tuple(CAPTION_WORDS), max_length: int = MAX_TOKENS):
    """A CLIP-style word-level tokenizer (`<bos> words <eos>`, padded with `<pad>`), built without downloads.
    `words` must start with `<pad>`, `<unk>`, `<bos>`, `<eos>`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=max_length, pad_token="<pad>",
                                   unk_token="<unk>", bos_token="<bos>", eos_token="<eos>")


def tiny_captioned_sd_pipeline(seed: int = 0, size: int = 16, block_out_channels: Sequence[int] = (32, 64),
                               text_dim: int = 32):
    """A `StableDiffusionPipeline` of random weights for `captioned_digits`: size x size RGB images, 4 x size/2 x
    size/2 latents, a 2-layer CLIP text encoder of `text_dim` over `CAPTION_WORDS`, DDIM with SD's betas.
    The weights are a function of `seed` only (drawn on a fork of torch's RNG; the caller's RNG is untouched)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = word_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(CAPTION_WORDS), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=MAX_TOKENS, pad_token_id=0, bos_token_id=2, eos_token_id=3))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                            layers_per_block=1, norm_num_groups=4, sample_size=size,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
        unet = UNet2DConditionModel(
            sample_size=size // 2, in_channels=4, out_channels=4, block_out_channels=tuple(block_out_channels),
            layers_per_block=1, norm_num_groups=8, attention_head_dim=8, cross_attention_dim=text_dim,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    for module in (vae, text_encoder, unet):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
