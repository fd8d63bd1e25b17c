"""Tiny, randomly initialised diffusers pipelines built fully offline.

Every builder constructs its models from Python configs (no hub access, safe under
``HF_HUB_OFFLINE=1``), seeds each model with ``torch.manual_seed(seed)`` on a fork of torch's RNG
(the caller's global RNG state is left as it was) so the same seed gives the same weights, puts all modules in eval mode and disables progress
bars. Tokenizers are byte-level and built from files written to a temporary directory.

Default image sizes (all VAEs here have ``vae_scale_factor == 2``):

=====================  ==================  ===========  =====================================
builder                denoiser attribute  image        notes
=====================  ==================  ===========  =====================================
tiny_ddpm_pipeline     ``unet``            8x8, C=1     pixel space; C = ``in_channels``
tiny_stable_diffusion  ``unet``            16x16 RGB    latents 4x8x8
tiny_sdxl_pipeline     ``unet``            16x16 RGB    latents 4x8x8
tiny_dit_pipeline      ``transformer``     16x16 RGB    class-conditional, learned sigma
tiny_pixart_pipeline   ``transformer``     16x16 RGB    pass ``use_resolution_binning=False``
tiny_sd3_pipeline      ``transformer``     16x16 RGB    flow matching
tiny_flux_pipeline     ``transformer``     16x16 RGB    pass ``height=16, width=16``
=====================  ==================  ===========  =====================================
"""

from __future__ import annotations

import copy
import functools
import json
import os
import string
import tempfile

import torch

__all__ = [
    "denoiser_name",
    "save_tiny_lora",
    "tiny_clip_tokenizer",
    "tiny_ddpm_pipeline",
    "tiny_dit_pipeline",
    "tiny_flux_pipeline",
    "tiny_pixart_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_stable_diffusion_pipeline",
    "tiny_t5_tokenizer",
]

SD_SCHEDULER_KWARGS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
# What real Stable Diffusion scheduler configs set (avoids diffusers' deprecation warnings).
_SD_EXTRA = {
    "ddim": dict(clip_sample=False, set_alpha_to_one=False),
    "ddpm": dict(clip_sample=False),
    "pndm": dict(skip_prk_steps=True),
    "euler": {},
}
TEXT_DIM = 32  # hidden size of every tiny text encoder


def _own_rng(builder):
    """Run `builder` on a fork of torch's CPU RNG: its per-model `torch.manual_seed(seed)` calls fix the weights
    without changing the global RNG state the caller sees."""
    @functools.wraps(builder)
    def wrapped(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            return builder(*args, **kwargs)
    return wrapped


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = [b for b in range(256) if b not in bs]
    bs += extra
    cs += [256 + n for n in range(len(extra))]
    return dict(zip(bs, map(chr, cs)))


def tiny_clip_tokenizer(model_max_length: int = 77):
    """Byte-level CLIP tokenizer: 256 bytes (+ ``</w>`` forms), BOS/EOS, no merges.

    Ids: 0-255 bytes, 256-511 end-of-word bytes, 512 ``<|startoftext|>``,
    513 ``<|endoftext|>`` (also pad and unk).
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
        with open(os.path.join(tmp, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=model_max_length)


def tiny_t5_tokenizer(model_max_length: int = 512):
    """Character-level T5 tokenizer (Unigram, sentencepiece-free) from a ``tokenizer.json``.

    Ids: 0 ``<pad>``, 1 ``</s>``, 2 ``<unk>``, then ``▁`` and ASCII characters.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    with tempfile.TemporaryDirectory() as tmp:
        backend.save(os.path.join(tmp, "tokenizer.json"))
        return T5TokenizerFast.from_pretrained(
            tmp,
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            extra_ids=0,
            model_max_length=model_max_length,
        )


# --------------------------------------------------------------------------- components


def _clip_text_encoder(tokenizer, seed: int, with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=37,
        projection_dim=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config)


def _t5_text_encoder(tokenizer, seed: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_DIM,
        d_ff=37,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return T5EncoderModel(config)


def _tiny_vae(seed: int, latent_channels: int = 4, flow: bool = False):
    """RGB AutoencoderKL with two blocks, i.e. ``vae_scale_factor == 2``."""
    from diffusers import AutoencoderKL

    extra = {}
    if flow:  # SD3/Flux read shift_factor and have no quant convs
        extra = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=latent_channels,
        sample_size=16,
        **extra,
    )


def _sd_scheduler(kind: str):
    """A scheduler with Stable Diffusion's beta schedule."""
    return _scheduler(kind, **SD_SCHEDULER_KWARGS, **_SD_EXTRA.get(kind, {}))


def _scheduler(kind: str, **kwargs):
    from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}
    if kind not in classes:
        raise ValueError(f"scheduler must be one of {sorted(classes)}, got {kind!r}")
    return classes[kind](num_train_timesteps=1000, **kwargs)


def _finish(pipe):
    """Eval mode for every module and a silent progress bar."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- pipelines


@_own_rng
def tiny_ddpm_pipeline(
    prediction_type: str = "epsilon",
    sample_size: int = 8,
    in_channels: int = 1,
    seed: int = 0,
    scheduler: str = "ddpm",
    attention: bool = True,
):
    """Pixel-space DDPMPipeline (``scheduler="ddpm"``) or DDIMPipeline (``"ddim"``).

    The UNet2DModel has two resolutions (8 and 16 channels); ``attention=True`` adds a
    single self-attention block in the mid block. Images: ``in_channels x sample_size^2``.
    """
    from diffusers import DDIMPipeline, DDPMPipeline, UNet2DModel

    if scheduler not in ("ddpm", "ddim"):
        raise ValueError(f"scheduler must be 'ddpm' or 'ddim', got {scheduler!r}")
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=8,
        add_attention=attention,
    )
    sched = _scheduler(scheduler, prediction_type=prediction_type)
    cls = DDPMPipeline if scheduler == "ddpm" else DDIMPipeline
    return _finish(cls(unet=unet, scheduler=sched))


@_own_rng
def tiny_stable_diffusion_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """StableDiffusionPipeline: 8x8x4 latents, 16x16 RGB images, cross_attention_dim 32.

    ``scheduler`` is one of "ddim", "ddpm", "pndm", "euler", with SD's scaled-linear betas.
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=TEXT_DIM,
    )
    tokenizer = tiny_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(seed),
        text_encoder=_clip_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sd_scheduler(scheduler),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


@_own_rng
def tiny_sdxl_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """StableDiffusionXLPipeline: two CLIP encoders (32 + 32 dims), 16x16 RGB images.

    ``scheduler`` as for :func:`tiny_stable_diffusion_pipeline`.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    time_dim = 8
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + TEXT_DIM,
    )
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(seed),
        text_encoder=_clip_text_encoder(tokenizer, seed),
        text_encoder_2=_clip_text_encoder(tokenizer_2, seed + 1, with_projection=True),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_sd_scheduler(scheduler),
        image_encoder=None,
        feature_extractor=None,
    )
    return _finish(pipe)


@_own_rng
def tiny_dit_pipeline(seed: int = 0, scheduler: str = "ddim"):
    """Class-conditional DiTPipeline with learned variance (out_channels = 2 * 4).

    8x8x4 latents -> 16x16 RGB images. The label table has 1000 classes (DiT uses class
    1000 as the null label); ``id2label`` names the first four ("cat", "dog", ...).
    """
    from diffusers import DiTPipeline, DiTTransformer2DModel

    if scheduler not in ("ddpm", "ddim"):
        raise ValueError(f"scheduler must be 'ddpm' or 'ddim', got {scheduler!r}")
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    id2label = {0: "cat", 1: "dog", 2: "bird", 3: "fish"}
    pipe = DiTPipeline(
        transformer=transformer, vae=_tiny_vae(seed), scheduler=_scheduler(scheduler), id2label=id2label
    )
    return _finish(pipe)


@_own_rng
def tiny_pixart_pipeline(seed: int = 0):
    """PixArtAlphaPipeline with a tiny T5 encoder; 16x16 RGB images.

    Call with ``use_resolution_binning=False`` (binning only knows real PixArt sizes) and
    ideally ``clean_caption=False`` and a small ``max_sequence_length``.
    """
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,
        caption_channels=TEXT_DIM,
        in_channels=4,
        cross_attention_dim=24,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    tokenizer = tiny_t5_tokenizer()
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5_text_encoder(tokenizer, seed),
        vae=_tiny_vae(seed),
        transformer=transformer,
        scheduler=DDIMScheduler(),
    )
    return _finish(pipe)


@_own_rng
def tiny_sd3_pipeline(seed: int = 0):
    """StableDiffusion3Pipeline (two CLIP-with-projection + T5); 16x16 RGB images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=TEXT_DIM,  # T5 width; CLIP embeds are cropped/padded to it
        pooled_projection_dim=2 * TEXT_DIM,
    )
    tokenizer, tokenizer_2, tokenizer_3 = tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(seed, flow=True),
        text_encoder=_clip_text_encoder(tokenizer, seed, with_projection=True),
        tokenizer=tokenizer,
        text_encoder_2=_clip_text_encoder(tokenizer_2, seed + 1, with_projection=True),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_text_encoder(tokenizer_3, seed),
        tokenizer_3=tokenizer_3,
    )
    return _finish(pipe)


@_own_rng
def tiny_flux_pipeline(seed: int = 0):
    """FluxPipeline (CLIP + T5); 4-channel latents packed 2x2 into 16-channel tokens.

    Images are 16x16 RGB but Flux defaults to 1024px: pass ``height=16, width=16``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        axes_dims_rope=(4, 4, 8),
    )
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_t5_tokenizer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_tiny_vae(seed, flow=True),
        text_encoder=_clip_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        text_encoder_2=_t5_text_encoder(tokenizer_2, seed),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    return _finish(pipe)


# --------------------------------------------------------------------------- LoRA


def denoiser_name(pipe) -> str:
    """Name of the pipeline's denoiser component: ``"unet"`` or ``"transformer"``."""
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise ValueError(f"{type(pipe).__name__} has neither a unet nor a transformer")


def save_tiny_lora(
    pipe,
    directory: str | os.PathLike,
    rank: int = 4,
    adapter_name: str = "tiny_lora",
    seed: int = 0,
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
    std: float = 0.1,
) -> str:
    """Save a random peft LoRA for ``pipe``'s denoiser with ``save_lora_weights``.

    The adapter is added to a deep copy of the denoiser, so ``pipe`` is left untouched.
    Both LoRA matrices are drawn from N(0, std^2) with a generator seeded by ``seed``
    (``lora_alpha == rank``, scale 1), so loading it changes the denoiser output. Load
    with ``pipe.load_lora_weights(directory, adapter_name=...)``. Returns ``directory``.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    if not hasattr(type(pipe), "save_lora_weights"):
        raise TypeError(f"{type(pipe).__name__} does not support LoRA loading/saving")
    name = denoiser_name(pipe)
    model = copy.deepcopy(getattr(pipe, name))
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(target_modules), init_lora_weights=True)
    model.add_adapter(config, adapter_name=adapter_name)

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if f".{adapter_name}." in param_name and ("lora_A" in param_name or "lora_B" in param_name):
                param.copy_(torch.randn(param.shape, generator=generator) * std)

    state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    os.makedirs(directory, exist_ok=True)
    type(pipe).save_lora_weights(directory, **{f"{name}_lora_layers": state_dict})
    return str(directory)
