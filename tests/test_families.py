"""Every pipeline family (SDXL, DiT, PixArt, SD3, Flux) against a hand-written objective.

For each family the features of a few captioned training images and the score of a captioned query are
compared with an independent computation: the conditioning built here through the pipeline's own
`encode_prompt` / labels, the noising formula written out (DDPM ᾱ_t, or flow matching's
x_σ = (1-σ) x0 + σ ε with σ from the scheduler's own table), the denoiser called by hand, the objective,
and `torch.autograd.grad`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable

import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_attribution import (
    AttributionConfig,
    InvalidImageError,
    UnsupportedPipelineError,
    enable_attribution,
    get_adapter,
)
from diffusers_attribution.data import to_image_tensor
from diffusers_attribution.seeding import seeded_randn
from tiny_pipelines import (
    save_tiny_lora,
    tiny_dit_pipeline,
    tiny_flux_pipeline,
    tiny_pixart_pipeline,
    tiny_sd3_pipeline,
    tiny_sdxl_pipeline,
)

K = 2  # timesteps {0, 500}
T = 1000
DAMPING = 0.1


# --------------------------------------------------------------------------- the hand-written references


def vae_latent(pipe, image, key, seed):
    """(μ + σ η - shift) · scale, η drawn from the example's own seed (the library's documented convention)."""
    dist = pipe.vae.encode(image[None]).latent_dist
    eta = seeded_randn(dist.mean.shape[1:], seed, "latent", key)[None]
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return (dist.mean + dist.std * eta - shift) * pipe.vae.config.scaling_factor


def ddpm_noising(pipe, x0, eps, t):
    assert pipe.scheduler.config.prediction_type == "epsilon"
    abar = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[t]
    return abar.sqrt() * x0 + (1 - abar).sqrt() * eps, eps


def flow_sigma(pipe, t):
    """σ of timestep index t: the scheduler's training table (stored from σ = 1 down), read from the low end."""
    sigmas = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).sigmas
    return float(sigmas[len(sigmas) - 1 - t])


def flow_noising(pipe, x0, eps, t):
    sigma = flow_sigma(pipe, t)
    return (1 - sigma) * x0 + sigma * eps, eps - x0


def sdxl_condition(pipe, caption, size, extra):
    caption = "" if caption is None else caption  # no caption: the empty prompt
    emb, _, pooled, _ = pipe.encode_prompt(caption, device="cpu", do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids(
        size, (0, 0), size, dtype=emb.dtype, text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim
    )
    return dict(encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})


def sdxl_forward(pipe, x0, eps, t, cond):
    x_t, target = ddpm_noising(pipe, x0, eps, t)
    return pipe.unet(x_t, torch.tensor([t]), **cond).sample, target


def dit_condition(pipe, label, size, extra):
    ids = [label] if isinstance(label, int) else pipe.get_label_ids([label])
    return dict(class_labels=torch.tensor(ids))


def dit_forward(pipe, x0, eps, t, cond):
    x_t, target = ddpm_noising(pipe, x0, eps, t)
    out = pipe.transformer(x_t, timestep=torch.tensor([t]), **cond).sample
    assert out.shape[1] == 2 * x0.shape[1]  # learned variance: ε is the first half
    return out[:, : x0.shape[1]], target


def pixart_condition(pipe, caption, size, extra):
    emb, mask, _, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False, device="cpu")  # 120 tokens
    return dict(encoder_hidden_states=emb, encoder_attention_mask=mask,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def pixart_forward(pipe, x0, eps, t, cond):
    x_t, target = ddpm_noising(pipe, x0, eps, t)
    out = pipe.transformer(x_t, timestep=torch.tensor([t]), **cond).sample
    return out[:, : x0.shape[1]], target


def sd3_condition(pipe, caption, size, extra):
    emb, _, pooled, _ = pipe.encode_prompt(caption, caption, caption, device="cpu", do_classifier_free_guidance=False,
                                           max_sequence_length=extra["max_sequence_length"])
    return dict(encoder_hidden_states=emb, pooled_projections=pooled)


def sd3_forward(pipe, x0, eps, t, cond):
    x_t, target = flow_noising(pipe, x0, eps, t)
    timestep = torch.tensor([flow_sigma(pipe, t) * 1000])  # SD3 reads scheduler.timesteps = σ · 1000
    return pipe.transformer(hidden_states=x_t, timestep=timestep, **cond).sample, target


def flux_pack(pipe, latent):
    """[1, C, h, w] → [1, (h/2)(w/2), 4C]: 2×2 patches, channel-major inside a patch."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def flux_condition(pipe, caption, size, extra):
    emb, pooled, txt_ids = pipe.encode_prompt(caption, prompt_2=None, device="cpu",
                                              max_sequence_length=extra.get("max_sequence_length", 512))
    h, w = size[0] // pipe.vae_scale_factor // 2, size[1] // pipe.vae_scale_factor // 2
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    guidance = torch.tensor([extra.get("guidance_scale", 3.5)]) if pipe.transformer.config.guidance_embeds else None
    return dict(encoder_hidden_states=emb, pooled_projections=pooled, txt_ids=txt_ids,
                img_ids=img_ids.reshape(-1, 3), guidance=guidance)


def flux_forward(pipe, x0, eps, t, cond):
    x_t, target = flow_noising(pipe, x0, eps, t)
    timestep = torch.tensor([flow_sigma(pipe, t)])  # Flux's transformer takes σ (it multiplies by 1000)
    return pipe.transformer(hidden_states=x_t, timestep=timestep, **cond).sample, target


@dataclass
class Family:
    family: str
    build: Callable
    condition: Callable
    forward: Callable
    parameters: list[str]
    captions: list
    query_caption: object
    other_caption: object  # for the check that conditioning reaches the gradient
    output: str = "loss"
    prepare: Callable = lambda pipe, latent: latent
    column: str | None = None  # a `datasets.Dataset` with this caption/label column; None: (image, caption) tuples
    extra: dict = field(default_factory=dict)  # AttributionConfig.adapter_options: the family's options


def sd3_with_shift():
    pipe = tiny_sd3_pipeline()
    pipe.register_modules(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    return pipe


def with_transformer(pipe, **changes):
    """`pipe` with a freshly initialised transformer of the same config, changed by `changes`."""
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    transformer = type(pipe.transformer)(**{**config, **changes}).eval()
    assert all(transformer.config[k] == v for k, v in changes.items())
    pipe.register_modules(transformer=transformer)
    return pipe


def flux_with_guidance():
    return with_transformer(tiny_flux_pipeline(), guidance_embeds=True)


FAMILIES = {
    "sdxl": Family(
        "stable-diffusion-xl", tiny_sdxl_pipeline, sdxl_condition, sdxl_forward,
        ["conv_out.*", "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight"],
        ["a red cat", "a blue dog", None], "a green bird", "a yellow fish", output="squared-norm",
    ),
    "dit": Family(
        "dit", tiny_dit_pipeline, dit_condition, dit_forward,
        ["proj_out_2.*", "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight"],
        [1, 0, 3], "bird", 0, column="label",  # integer labels in a dataset column; a label name for the query
    ),
    "pixart": Family(
        "pixart", tiny_pixart_pipeline, pixart_condition, pixart_forward,
        ["proj_out.*", "transformer_blocks.0.attn2.to_k.weight", "caption_projection.linear_1.weight"],
        ["a red cat", "a blue dog", "a bird"], "a green bird", "a yellow fish", column="text",
    ),
    "sd3": Family(
        "stable-diffusion-3", sd3_with_shift, sd3_condition, sd3_forward,
        ["proj_out.*", "transformer_blocks.0.attn.add_k_proj.weight", "time_text_embed.text_embedder.linear_1.weight"],
        ["a red cat", "a blue dog", ""], "a green bird", "a yellow fish", extra={"max_sequence_length": 16},
    ),
    "flux": Family(  # Flux-dev-like: with a guidance embedding
        "flux", flux_with_guidance, flux_condition, flux_forward,
        ["proj_out.*", "transformer_blocks.0.attn.add_k_proj.weight", "time_text_embed.guidance_embedder.*1.weight"],
        ["a red cat", "a blue dog", "a bird"], "a green bird", "a yellow fish", prepare=flux_pack,
        extra={"max_sequence_length": 16, "guidance_scale": 5.0},
    ),
}


def selected(denoiser, patterns):
    return [p for n, p in denoiser.named_parameters() if any(fnmatch.fnmatchcase(n, q) for q in patterns)]


def hand_gradient(pipe, fam: Family, image, caption, key, config, params):
    """(1/K) Σ_t ∇θ f(z, t, ε_t) with ε_t shared across examples (noise_mode="shared")."""
    with torch.no_grad():
        x0 = fam.prepare(pipe, vae_latent(pipe, image, key, config.noise_seed))
        cond = fam.condition(pipe, caption, tuple(image.shape[-2:]), config.adapter_options)
    total = [torch.zeros_like(p) for p in params]
    for k in range(config.num_timesteps):
        t = k * (T // config.num_timesteps)
        eps = seeded_randn(x0.shape[1:], config.noise_seed, "noise", t)[None]
        prediction, target = fam.forward(pipe, x0, eps, t, cond)
        f = ((prediction - target) ** 2).mean() if config.output == "loss" else (prediction**2).mean()
        for acc, g in zip(total, torch.autograd.grad(f, params, allow_unused=True)):
            if g is not None:
                acc += g / config.num_timesteps
    return torch.cat([g.flatten() for g in total])


def training_data(fam: Family, images):
    """(training set, the image tensors the library reads from it)."""
    if fam.column is None:
        return list(zip(images, fam.captions)), images
    datasets = pytest.importorskip("datasets")
    pil = [PIL.Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for x in images]
    dataset = datasets.Dataset.from_dict({"image": pil, fam.column: fam.captions})
    return dataset, torch.stack([to_image_tensor(image) for image in pil])



@pytest.fixture(scope="module")
def images():
    torch.manual_seed(3)
    return torch.rand(4, 3, 16, 16) * 2 - 1  # 3 training images + 1 query


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(FAMILIES))
def test_features_and_scores_equal_hand_written_autograd(name, images):
    fam = FAMILIES[name]
    pipe = enable_attribution(fam.build())
    assert get_adapter(pipe).family == fam.family
    assert name != "flux" or pipe.transformer.config.guidance_embeds
    config = AttributionConfig(
        method="trak", output=fam.output, projector="identity", num_timesteps=K, parameters=fam.parameters,
        batch_size=2, damping=DAMPING, caption_column=fam.column, adapter_options=fam.extra,
    )
    data, train_images = training_data(fam, images[:3])
    store = pipe.featurize(data, config, progress=False)
    params = selected(get_adapter(pipe).denoiser, fam.parameters)
    examples = enumerate(zip(train_images, fam.captions))
    G = torch.stack([hand_gradient(pipe, fam, x, c, i, config, params) for i, (x, c) in examples])
    assert G.abs().sum(1).min() > 0
    torch.testing.assert_close(store.features, G, rtol=1e-4, atol=1e-6)
    # not vacuous: the caption changes the denoiser's output
    with torch.no_grad():
        x0 = fam.prepare(pipe, vae_latent(pipe, train_images[0], 0, 0))
        eps = torch.randn_like(x0)
        a, b = (fam.forward(pipe, x0, eps, 500, fam.condition(pipe, c, (16, 16), fam.extra))[0]
                for c in (fam.captions[0], fam.other_caption))
    assert (a - b).abs().max() > 1e-4

    result = pipe.attribute(images[3:], store, prompts=[fam.query_caption])
    q = hand_gradient(pipe, fam, images[3], fam.query_caption, "query:0", config, params).double()
    G = G.double()
    expected = q @ G.T @ torch.linalg.inv(G @ G.T + DAMPING * torch.eye(len(G), dtype=torch.float64))
    torch.testing.assert_close(result.scores[0].double(), expected, rtol=2e-3, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_lora_only_attribution_on_transformers(name, images, tmp_path):
    fam = FAMILIES[name]
    pipe = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[name]()  # stock fixtures (Flux without guidance)
    save_tiny_lora(pipe, tmp_path / "lora", adapter_name="ignored", seed=1)
    pipe.load_lora_weights(str(tmp_path / "lora"), adapter_name="style")
    enable_attribution(pipe)
    config = AttributionConfig(method="d-trak", output="squared-norm", projector="identity", num_timesteps=K,
                               parameters="lora", batch_size=2, adapter_options=fam.extra)
    store = pipe.featurize(list(zip(images[:2], fam.captions[:2])), config, progress=False)
    named = [(n, p) for n, p in pipe.transformer.named_parameters() if ".lora_" in n]
    assert named and all(".style." in n for n, _ in named)
    params = [p for _, p in named]
    assert store.features.shape == (2, sum(p.numel() for p in params))
    expected = torch.stack([hand_gradient(pipe, fam, images[i], fam.captions[i], i, config, params) for i in range(2)])
    assert expected.abs().sum(1).min() > 0
    torch.testing.assert_close(store.features, expected, rtol=1e-4, atol=1e-6)


def test_flow_matching_sigmas_follow_the_scheduler_shift():
    from diffusers_attribution.adapters import FlowMatchingAdapter

    pipe = sd3_with_shift()
    adapter = get_adapter(pipe)
    assert isinstance(adapter, FlowMatchingAdapter) and adapter.shift == 3.0
    t = torch.tensor([0, 250, 500, 999])
    s = (t + 1).double() / T
    float64 = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(adapter.sigma(t, float64), 3 * s / (1 + 2 * s))
    scheduler_sigmas = torch.tensor([flow_sigma(pipe, int(i)) for i in t], dtype=torch.float64)
    torch.testing.assert_close(adapter.sigma(t, float64), scheduler_sigmas, rtol=1e-6, atol=0)
    x0, eps = torch.randn(4, 4, 2, 2), torch.randn(4, 4, 2, 2)
    sigma = adapter.sigma(t, x0).view(-1, 1, 1, 1)
    torch.testing.assert_close(adapter.add_noise(x0, eps, t), (1 - sigma) * x0 + sigma * eps)
    torch.testing.assert_close(adapter.target(x0, eps, t), eps - x0)
    # Flux-dev's dynamic shifting: the training table is unshifted (σ = s)
    pipe.register_modules(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True))
    torch.testing.assert_close(get_adapter(pipe).sigma(t, float64), s)


def test_family_errors_are_clear(images):
    sd3 = enable_attribution(tiny_sd3_pipeline())
    with pytest.raises(ValueError, match="weighted-mse.*flow-matching"):
        sd3.featurize(images[:1], AttributionConfig(output="weighted-mse", projector="identity",
                                                    parameters=["proj_out.*"], num_timesteps=1), progress=False)
    with pytest.raises(InvalidImageError, match="divisible by 2"):
        sd3.featurize(images[:1, :, :15, :15], AttributionConfig(projector="identity", parameters=["proj_out.*"]),
                      progress=False)
    flux = enable_attribution(tiny_flux_pipeline())
    with pytest.raises(InvalidImageError, match="divisible by 4"):
        flux.featurize(images[:1, :, :, :14], AttributionConfig(projector="identity", parameters=["proj_out.*"]),
                       progress=False)
    # a transformer that reads extra image-condition channels (Flux Fill/Depth/Canny)
    fill = with_transformer(tiny_flux_pipeline(), in_channels=32, out_channels=16)
    with pytest.raises(UnsupportedPipelineError, match="not 4 × 4 packed latent channels"):
        enable_attribution(fill)
    sdxl = enable_attribution(tiny_sdxl_pipeline())
    with pytest.raises(TypeError, match="captions must be strings"):
        sdxl.featurize([(images[0], 3)], AttributionConfig(projector="identity", parameters=["conv_out.*"]),
                       progress=False)
    dit = enable_attribution(tiny_dit_pipeline())
    adapter = get_adapter(dit)
    assert adapter.label_ids([2, "dog", "3", None]).tolist() == [2, 1, 3, 1000]  # None: the null class
    with pytest.raises(ValueError, match="does not exist"):
        adapter.label_ids(["unicorn"])
    with pytest.raises(ValueError, match="outside 0..999"):
        adapter.label_ids([1000])


def test_adapter_options_a_family_does_not_take_are_refused():
    from diffusers_attribution.featurize import Featurizer
    from tiny_pipelines import tiny_ddpm_pipeline

    with pytest.raises(ValueError, match=r"adapter_options \['max_sequence_length'\] do not apply to DDPMPipeline"):
        Featurizer(tiny_ddpm_pipeline(), AttributionConfig(adapter_options={"max_sequence_length": 16}))


# --------------------------------------------------------------------------- finding a family

BUILT_IN_ORDER = ["stable-diffusion-xl", "stable-diffusion", "stable-diffusion-3", "flux", "pixart", "dit",
                  "unconditional"]


def test_families_are_tried_most_specific_first():
    """The package's families by `priority`; one registered from outside the package before all of them."""
    from diffusers_attribution.adapters import UnconditionalAdapter, adapter_classes, register_adapter, registry

    assert [cls.family for cls in adapter_classes()] == BUILT_IN_ORDER
    assert get_adapter(tiny_sdxl_pipeline()).family == "stable-diffusion-xl"

    @register_adapter
    class MyPixels(UnconditionalAdapter):
        family = "my-pixels"
        priority = -100  # a family registered from outside the package goes first whatever its priority

    try:
        from tiny_pipelines import tiny_ddpm_pipeline

        assert [cls.family for cls in adapter_classes()] == ["my-pixels", *BUILT_IN_ORDER]
        assert get_adapter(tiny_ddpm_pipeline()).family == "my-pixels"
    finally:
        registry._ADAPTERS.remove(MyPixels)
    assert [cls.family for cls in adapter_classes()] == BUILT_IN_ORDER


TOY_FAMILY = '''
from pathlib import Path

from .registry import register_adapter
from .unconditional import UnconditionalAdapter

with open(Path(__file__).with_suffix(".log"), "a") as log:  # one line per import
    log.write("imported\\n")


@register_adapter
class ToyAdapter(UnconditionalAdapter):
    family = "toy"
    priority = UnconditionalAdapter.priority + 1
'''


def test_a_family_file_added_to_the_package_is_found(tmp_path):
    """One new file, adapters/toy.py (here in a folder appended to the package's __path__), and nothing else."""
    import sys

    import diffusers_attribution.adapters as adapters
    from diffusers_attribution import discovery
    from diffusers_attribution.adapters import registry
    from tiny_pipelines import tiny_ddpm_pipeline

    pipe = tiny_ddpm_pipeline()
    assert get_adapter(pipe).family == "unconditional"  # the package's own modules are imported by now
    (tmp_path / "toy.py").write_text(TOY_FAMILY)
    adapters.__path__.append(str(tmp_path))
    name = "diffusers_attribution.adapters.toy"
    try:
        assert get_adapter(pipe).family == "toy"
        assert get_adapter(pipe).family == "toy"
        assert (tmp_path / "toy.log").read_text() == "imported\n"  # imported once
        assert type(get_adapter(pipe)).__module__ == name
    finally:
        adapters.__path__.remove(str(tmp_path))
        registry._ADAPTERS[:] = [cls for cls in registry._ADAPTERS if cls.__module__ != name]
        sys.modules.pop(name, None)
        vars(adapters).pop("toy", None)
        discovery._imported[adapters.__name__].discard("toy")
    assert get_adapter(pipe).family == "unconditional"
