"""Stable Diffusion 1.x with peft LoRA adapters: `parameters="lora"` features are the autograd gradients of
exactly one adapter's LoRA weights, chosen by name when several are loaded."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_attribution import AttributionConfig, enable_attribution
from diffusers_attribution.seeding import seeded_randn
from tiny_pipelines import save_tiny_lora, tiny_stable_diffusion_pipeline

K = 2
CAPTIONS = ["a red cat", "a blue dog", None]



@pytest.fixture(scope="module")
def images():
    torch.manual_seed(5)
    return torch.rand(3, 3, 16, 16) * 2 - 1


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    pipe = tiny_stable_diffusion_pipeline()
    root = tmp_path_factory.mktemp("loras")
    return {name: save_tiny_lora(pipe, root / name, seed=seed) for name, seed in (("a", 0), ("b", 1))}


def lora_weights(unet, adapter):
    """The LoRA parameters of `adapter`, in `named_parameters` order."""
    named = [(n, p) for n, p in unet.named_parameters() if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n]
    assert named
    return [p for _, p in named]


def hand_gradient(pipe, image, caption, key, params, seed=0):
    """(1/K) Σ_t ∇θ mean((ε_θ(x_t, t, c) - ε)²) for θ = `params`: DDPM noising of VAE latents, by hand."""
    with torch.no_grad():
        dist = pipe.vae.encode(image[None]).latent_dist
        eta = seeded_randn(dist.mean.shape[1:], seed, "latent", key)[None]
        x0 = (dist.mean + dist.std * eta) * pipe.vae.config.scaling_factor
        emb, _ = pipe.encode_prompt(caption or "", "cpu", 1, False)
    abar = DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod
    total = [torch.zeros_like(p) for p in params]
    for k in range(K):
        t = k * (1000 // K)
        eps = seeded_randn(x0.shape[1:], seed, "noise", t)[None]
        x_t = abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * eps
        prediction = pipe.unet(x_t, torch.tensor([t]), encoder_hidden_states=emb).sample
        loss = ((prediction - eps) ** 2).mean()
        for acc, g in zip(total, torch.autograd.grad(loss, params)):
            acc += g / K
    return torch.cat([g.flatten() for g in total])


def lora_config(**kwargs):
    return AttributionConfig(method="trak", projector="identity", num_timesteps=K, parameters="lora", batch_size=2,
                             **kwargs)


def test_lora_features_equal_autograd_of_lora_weights_only(images, lora_dirs):
    pipe = tiny_stable_diffusion_pipeline()
    pipe.load_lora_weights(lora_dirs["a"], adapter_name="a")
    enable_attribution(pipe)
    base_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters() if ".lora_" not in n}
    flags_before = {n: p.requires_grad for n, p in pipe.unet.named_parameters()}
    store = pipe.featurize(list(zip(images, CAPTIONS)), lora_config(), progress=False)
    params = lora_weights(pipe.unet, "a")
    assert store.features.shape == (3, sum(p.numel() for p in params))
    expected = torch.stack([hand_gradient(pipe, x, c, i, params) for i, (x, c) in enumerate(zip(images, CAPTIONS))])
    assert expected.abs().sum(1).min() > 0
    torch.testing.assert_close(store.features, expected, rtol=1e-4, atol=1e-6)
    # featurizing left the model as it was: weights and requires_grad flags
    assert {n: p.requires_grad for n, p in pipe.unet.named_parameters()} == flags_before
    for name, p in pipe.unet.named_parameters():
        if name in base_before:
            assert torch.equal(p, base_before[name])
    # a query scored against the store: its own LoRA gradient, with its prompt
    result = pipe.attribute(images[:1], store, prompts="a green bird")
    assert result.scores.shape == (1, 3) and torch.isfinite(result.scores).all()


def test_choosing_one_of_two_loaded_adapters(images, lora_dirs):
    pipe = tiny_stable_diffusion_pipeline()
    pipe.load_lora_weights(lora_dirs["a"], adapter_name="a")
    pipe.load_lora_weights(lora_dirs["b"], adapter_name="b")  # diffusers makes the last one loaded active
    enable_attribution(pipe)
    data = list(zip(images[:2], CAPTIONS[:2]))
    with pytest.raises(ValueError, match="'a' is loaded but not active"):
        pipe.featurize(data, lora_config(adapter_name="a"), progress=False)
    with pytest.raises(ValueError, match="no LoRA weights for adapter 'c'.*\\['a', 'b'\\]"):
        pipe.featurize(data, lora_config(adapter_name="c"), progress=False)

    pipe.set_adapters(["a", "b"], [1.0, 0.5])  # both in the forward pass
    with pytest.raises(ValueError, match="several adapters are active"):
        pipe.featurize(data, lora_config(), progress=False)
    for adapter in ("a", "b"):
        store = pipe.featurize(data, lora_config(adapter_name=adapter), progress=False)
        params = lora_weights(pipe.unet, adapter)
        expected = torch.stack([hand_gradient(pipe, x, c, i, params) for i, (x, c) in enumerate(data)])
        torch.testing.assert_close(store.features, expected, rtol=1e-4, atol=1e-6)
    assert pipe.unet.active_adapters() == ["a", "b"]  # featurizing does not change the active set
    pipe.disable_lora()
    with pytest.raises(ValueError, match="disabled"):
        pipe.featurize(data, lora_config(adapter_name="a"), progress=False)
